"""Smoke test of benchmarks/gguf_requant.py on a tiny GGUF file and synthetic text (numbers mean nothing)."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")
from benchmark_modules import load_benchmark  # noqa: E402
from gguf_files import write_tiny_gguf  # noqa: E402


def test_gguf_benchmark_writes_its_results_file(tmp_path):
    module = load_benchmark("gguf_requant")
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
