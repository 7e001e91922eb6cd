"""Smoke tests of benchmarks/cost.py and benchmarks/scaling.py on tiny models: they run and write what they promise.

The numbers mean nothing here (a tiny random Llama, a few windows); the SmolLM2
figures are in benchmarks/results/.
"""

import sys

from benchmark_modules import load_benchmark
from saved_models import saved_tiny


def test_cost_runs_the_command_and_writes_passes_and_memory(tmp_path, monkeypatch):
    model = saved_tiny(tmp_path, layers=12)
    cost = load_benchmark("cost")
    monkeypatch.setattr(sys, "argv", ["cost.py", "--runs", "defaults", "--model", str(model), "--tag", "tiny",
                                      "--threads", "1", "--extra", "--seq-len 16 --calib-samples 8", "--out-dir", str(tmp_path)])
    cost.main()
    text = (tmp_path / "cost-tiny.md").read_text()
    for phrase in ("| calibration_text |", "| selection |", "| compensation |", "| save |", "whole run after loading",
                   "peak RSS after loading", "pass unit", "8 x 16 tokens", "in processor time", "decisions: greedy order", "tokens/s", "cached states at the end"):
        assert phrase in text


def test_scaling_writes_each_sweep(tmp_path, monkeypatch):
    scaling = load_benchmark("scaling")
    monkeypatch.setattr(scaling, "SWEEPS", {"depth": [dict(layers=4, hidden=32, windows=4, seq_len=8)]})
    monkeypatch.setattr(scaling, "LARGE", {"two-layer": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=512)})
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--out-dir", str(tmp_path)])
    scaling.main()
    text = (tmp_path / "scaling-tiny.md").read_text()
    assert "## depth" in text and "| 4 | 32 | 4 x 8 |" in text and "| two-layer | 2 |" in text
