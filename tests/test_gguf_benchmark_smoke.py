"""Smoke test of benchmarks/gguf_requant.py on a tiny GGUF file and synthetic text (numbers mean nothing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
from gguf_files import write_tiny_gguf  # noqa: E402

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "gguf_requant.py"


def test_gguf_benchmark_writes_its_results_file(tmp_path):
    spec = importlib.util.spec_from_file_location("lorp_bench_gguf_requant", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    source = write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=6)
    text = tmp_path / "text.txt"
    text.write_text(" the river town was built north of the first song . " * 400)
    out = tmp_path / "results.md"
    module.main([
        "--source", str(source), "--calib-file", str(text), "--eval-file", str(text), "--calib-samples", "4",
        "--calib-len", "32", "--eval-samples", "2", "--eval-len", "32", "--budgets", "2", "--out", str(out),
    ])
    report = out.read_text()
    assert "| 2 |" in report and "GGUF compensated" in report and "tiny.gguf" in report
    assert not list(tmp_path.glob("*.partial"))
