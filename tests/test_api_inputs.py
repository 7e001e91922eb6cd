"""The Python API on the inputs users pass: a model left in train mode, masks and ids of other dtypes, calibration
of a type it does not take, a masked LM, settings it would have ignored. Each gives the right result or one
lorp_fx error naming the problem, never an error from deep inside torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model, tiny_tokenizer

import lorp_fx
from lorp_fx.core.errors import ConfigError, InputMismatchError, LoRPError, PlanError

WINDOWS = torch.randint(4, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))


def config(**options) -> lorp_fx.PruneConfig:
    return lorp_fx.PruneConfig(**{"remove": 1, "calib_samples": 8, "seq_len": 16, "loss_windows": 2, **options})


def test_a_model_in_train_mode_is_calibrated_without_dropout_and_given_back_in_train_mode():
    """GPT-2 has dropout: in train mode its hooked statistics depended on the global RNG, not on the inputs."""
    plain = config(remove=2, compensate="none", method="shortgpt")
    reference = lorp_fx.prune_model(tiny_model("gpt2").eval(), WINDOWS, plain, progress=False).plan.similarity
    for seed in (1, 2):
        model = tiny_model("gpt2").train()
        torch.manual_seed(seed)
        result = lorp_fx.prune_model(model, WINDOWS, plain, progress=False)
        assert np.array_equal(result.plan.similarity, reference)
        assert all(m.training for m in model.modules()) and result.model.training


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int32, torch.uint8])
def test_the_traced_graph_takes_the_masks_the_model_takes(mask_dtype):
    model = tiny_model("llama")
    ids, mask = WINDOWS[:2], torch.ones(2, 16, dtype=torch.long)
    mask[0, :3] = 0
    graph = lorp_fx.trace(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False})
    reference = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(graph(input_ids=ids.int(), attention_mask=mask.to(mask_dtype)).logits, reference)
    pruned = lorp_fx.prune(graph, ["model.layers.1"])
    pruned(input_ids=ids, attention_mask=mask.to(mask_dtype))
    with pytest.raises(InputMismatchError, match="pass attention_mask as int64"):
        graph(input_ids=ids, attention_mask=mask.float() * 0.5)


def test_int32_windows_are_pruned_like_int64_ones():
    ours = lorp_fx.prune_model(tiny_model("llama"), WINDOWS.int(), config(), progress=False,
                               evaluation=WINDOWS[:2].int())
    theirs = lorp_fx.prune_model(tiny_model("llama"), WINDOWS, config(), progress=False, evaluation=WINDOWS[:2])
    assert ours.plan.remove == theirs.plan.remove and ours.report["evaluation"] == theirs.report["evaluation"]


@pytest.mark.parametrize("calibration, message", [
    (WINDOWS[:0], "holds none"),
    ("w1 w2 w3 w4 " * 100, "cannot be a file name"),
    ("w1 w2 w3 w4 w5", "not the text itself"),
    ([WINDOWS[:4], WINDOWS[4:]], "list of Tensor"),
    ({"input_ids": WINDOWS}, "got a dict"),
    (WINDOWS.numpy(), "got a ndarray"),
    (b"valid.txt", "got a bytes"),
    (torch.full((2, 16), -4), "token id -4 is negative"),
])
def test_calibration_the_api_does_not_take_is_one_error(calibration, message):
    with pytest.raises(LoRPError, match=message):
        lorp_fx.prune_model(tiny_model("llama"), calibration, config(), tokenizer=tiny_tokenizer(), progress=False)


def test_a_config_that_is_not_a_prune_config_or_would_be_ignored_is_refused():
    with pytest.raises(ConfigError, match="PruneConfig"):
        lorp_fx.prune_model(tiny_model("llama"), WINDOWS, {"remove": 1}, progress=False)
    with pytest.raises(ConfigError, match="cannot set seed"):
        config(method="random", selector_options={"seed": 5})
    with pytest.raises(ConfigError, match="inplace"):
        config(inplace="yes")


def test_a_masked_lm_is_not_judged_by_a_next_token_loss():
    tokenizer = tiny_tokenizer()
    for options, message in [({}, "self-calibration"), ({"method": "sleb"}, "next-token loss")]:
        with pytest.raises(ConfigError, match=message):
            lorp_fx.prune_model(tiny_model("bert"), None if not options else WINDOWS, config(**options),
                                tokenizer=tokenizer, progress=False)
    with pytest.raises(ConfigError, match="perplexity"):
        lorp_fx.prune_model(tiny_model("bert"), WINDOWS, config(), evaluation=WINDOWS[:2], progress=False)
    with pytest.raises(ConfigError, match="not one"):
        lorp_fx.perplexity(tiny_model("bert"), WINDOWS, progress=False)
    result = lorp_fx.prune_model(tiny_model("bert"), WINDOWS, config(remove=2), progress=False)
    assert "loss" not in result.plan.details  # chosen from the statistics, as for an encoder-decoder


def test_the_dense_graph_is_not_handed_back_once_inplace_compensation_changed_its_weights():
    kept = lorp_fx.prune_model(tiny_model("gpt2", layers=6), WINDOWS, config(remove=2, compensate="cosine"), progress=False)
    assert kept.graph is not None and kept.fits
    model = tiny_model("gpt2", layers=6)
    folded = lorp_fx.prune_model(model, WINDOWS, config(remove=2, compensate="cosine", inplace=True), progress=False)
    assert folded.fits and folded.graph is None and folded.model is model


def test_a_block_named_twice_is_refused_by_the_surgery_as_by_the_graph_pass():
    with pytest.raises(PlanError, match="more than once"):
        lorp_fx.remove_layers(tiny_model("llama"), ["model.layers.1", "model.layers.1"])
