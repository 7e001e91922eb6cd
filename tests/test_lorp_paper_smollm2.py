"""End to end: our statistics of SmolLM2-135M make lorp-paper choose what the authors' code chose."""

import json

import numpy as np
import pytest
import torch
from shared_data import require_shared_data

import lorp_fx
from lorp_fx.calibration.graph_observer import collect_statistics
from lorp_fx.io.text import text_windows


@pytest.mark.slow
def test_lorp_paper_on_smollm2_matches_the_authors(smollm2):
    valid = require_shared_data("wikitext-2", "valid.txt")
    reference = json.loads(require_shared_data("reference", "smollm2-lorp-paper.json").read_text())
    model, tokenizer = smollm2  # the session's one load (conftest.py)
    windows = text_windows(tokenizer, [valid], n_samples=32, seq_len=256)
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(4)]
    stats, _ = collect_statistics(model, batches, progress=False)
    # Same S as the authors' up to accumulation order (they average per-batch means).
    assert np.abs(stats.input_similarity() - np.array(reference["similarity"])).max() < 2e-3
    for k in (3, 6, 9):
        plan = lorp_fx.select(stats, k, method="lorp-paper")
        assert [int(name.rsplit(".", 1)[1]) for name in plan.remove] == reference[f"removed_k{k}"]
    assert plan.rls == pytest.approx(reference["rls"], abs=1e-3)
