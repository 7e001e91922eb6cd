"""Mistakes that depend only on what the user passed are refused before the work that would reveal them late:
selector option values when the config is made, protected blocks right after the trace (before the calibration
text is sampled or read), a plan that removes nothing, and a plan path in a folder that is not there."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import lorp_fx
import lorp_fx.pipeline.run as run
from lorp_fx.core.errors import ConfigError, SelectorError, UnknownBlockError

WINDOWS = torch.randint(4, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("options, error, message", [
    ({"width": -3}, SelectorError, "width=-3 must be a whole number of candidates"),
    ({"width": 1}, SelectorError, "at least 2"),
    ({"width": 2.5}, SelectorError, "width=2.5"),
    ({"max_evaluations": 0}, SelectorError, "max_evaluations=0"),
    ({"protected": 1.5}, ConfigError, "protected must be a block name or index"),
])
def test_selector_option_values_are_refused_when_the_config_is_made(options, error, message):
    with pytest.raises(error, match=message):
        lorp_fx.PruneConfig(remove=1, selector_options=options)


@pytest.mark.parametrize("protected", [["model.layers.9"], [7], "layers.1"])
def test_an_unknown_protected_block_is_refused_before_any_calibration(monkeypatch, protected):
    def never(*args, **kwargs):
        raise AssertionError("calibration text was read or sampled before the protected blocks were checked")

    monkeypatch.setattr(run, "calibration_windows", never)
    config = lorp_fx.PruneConfig(remove=1, calib_samples=8, seq_len=16, selector_options={"protected": protected})
    with pytest.raises(UnknownBlockError, match="protected block"):
        lorp_fx.prune_model(tiny_model("llama"), WINDOWS, config, progress=False)


def test_known_protected_blocks_are_kept():
    config = lorp_fx.PruneConfig(remove=2, calib_samples=8, seq_len=16, loss_windows=2, compensate="none",
                                 selector_options={"protected": ["model.layers.1", -1]})
    result = lorp_fx.prune_model(tiny_model("llama"), WINDOWS, config, progress=False)
    assert "model.layers.1" not in result.plan.remove and "model.layers.4" not in result.plan.remove
