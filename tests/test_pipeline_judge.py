"""`prune_model` judges candidates and the final compensation by one calibration loss
(`CandidateLoss`): compensated when compensation is on, and "auto" folds the maps only if
they do not make the held-out calibration loss worse."""

from __future__ import annotations

import functools

import torch
from tiny_models import VOCAB, tiny_model

import lorp_fx
from lorp_fx.arch.surgery import remove_layers
from lorp_fx.judge.loss import calibration_loss
from lorp_fx.pipeline.config import PruneConfig
from lorp_fx.pipeline.report import summary_lines

WINDOWS = torch.randint(2, VOCAB, (12, 16), generator=torch.Generator().manual_seed(3))


@functools.lru_cache(maxsize=None)
def pruned(method: str = "lorp", compensate: str = "auto", remove: int = 2):
    model = tiny_model("llama", layers=6)
    config = PruneConfig(remove=remove, method=method, compensate=compensate, loss_windows=4)
    return model, lorp_fx.prune_model(model, WINDOWS, config, progress=False)


def test_the_default_selector_is_judged_by_the_compensated_loss():
    _, result = pruned()
    compensation = result.report["compensation"]
    loss = compensation["calibration_loss"]
    assert compensation["requested"] == "cosine" and loss["held_out"] and loss["windows"] == 4
    # the loss lorp minimised is the compensated one the final check reads (one memo)
    assert result.plan.details["loss"] == loss["compensated"]
    assert result.plan.details["chosen_from"] in ("greedy", "shortgpt", "uidl", "streamline")


def test_auto_folds_the_maps_only_if_they_do_not_hurt():
    model, result = pruned()
    compensation = result.report["compensation"]
    loss = compensation["calibration_loss"]
    helps = loss["compensated"] <= loss["uncompensated"]
    assert compensation["applied"] == compensation["helps"] == helps >= bool(result.fits) == bool(compensation["gaps"])
    plain = remove_layers(model, result.plan).model
    same = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), result.model.state_dict().values()))
    assert same == (not result.fits)
    summary = "\n".join(summary_lines(result.report, None))
    assert helps or "not applied" in summary


def test_an_explicit_method_is_folded_even_where_it_hurts():
    model, result = pruned(compensate="cosine")
    compensation = result.report["compensation"]
    assert compensation["applied"] and compensation["method"] == "cosine" and result.fits
    assert compensation["helps"] == (compensation["calibration_loss"]["compensated"]
                                     <= compensation["calibration_loss"]["uncompensated"])
    assert all(fit.projections for fit in result.fits)  # named for the GGUF writer and folded_parameters
    assert set(result.folded_parameters()) <= set(result.model.state_dict())


def test_without_compensation_the_plain_loss_judges():
    model, result = pruned(compensate="none")
    assert result.report["compensation"] == {"method": "none"} and not result.fits
    graph = result.graph
    reference = calibration_loss(graph, [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in WINDOWS[:4].split(1)])  # one window per call
    assert result.plan.details["loss"] == reference(result.plan.remove)


def test_the_summary_line_gives_the_guards_evidence():
    from lorp_fx.pipeline.report import _compensation_phrase

    gap = {"error_before": 0.237, "error_after": 0.106}
    loss = {"compensated": 3.4378, "uncompensated": 3.6258, "held_out": True, "windows": 8}
    folded = {"method": "cosine", "gaps": [gap], "applied": True, "calibration_loss": loss}
    assert _compensation_phrase(folded) == ("cosine, 1 gap folded, relative gap error 0.237 -> 0.106; "
                                            "held-out calibration loss 3.6258 -> 3.4378")
    two = {**folded, "gaps": [gap, gap], "calibration_loss": {**loss, "held_out": False}}
    assert _compensation_phrase(two).startswith("cosine, 2 gaps folded") and "held-out" not in _compensation_phrase(two)
    refused = {**folded, "gaps": [], "applied": False, "requested": "cosine",
               "calibration_loss": {**loss, "compensated": 3.7}}
    assert _compensation_phrase(refused) == "none: cosine not applied, it made the calibration loss worse (3.7000 > 3.6258)"


def test_on_given_text_the_statistics_come_from_the_judges_cache_equal_to_the_hooked_pass():
    """No statistics pass where the compensating judge caches every window's layer states; a
    plain-loss judge (loss windows only) leaves them to the hooked pass. Both give the same S."""
    _, judged = pruned()
    _, hooked = pruned(compensate="none")
    assert judged.report["calibration"]["statistics"].startswith("the selection's caching pass")
    assert hooked.report["calibration"]["statistics"].startswith("module hooks")
    difference = torch.tensor(judged.report["similarity"]) - torch.tensor(hooked.report["similarity"])
    assert float(difference.abs().max()) < 1e-9


def test_given_windows_shorter_than_the_configured_length_are_traced_at_their_own_length():
    """GPT-2 has learned positions (64 in the tiny config): the default seq_len of 256 used to
    trace it at 256 tokens, which failed, though the given 16-token windows fit."""
    model = tiny_model("gpt2", layers=6)
    assert model.config.n_positions < PruneConfig(remove=2).seq_len
    result = lorp_fx.prune_model(model, WINDOWS, PruneConfig(remove=2, loss_windows=4), progress=False)
    assert len(result.plan.remove) == 2 and result.report["calibration"]["seq_len"] == WINDOWS.shape[1]


def test_the_summary_says_when_the_model_calibrated_on_its_own_text():
    _, result = pruned()
    report = dict(result.report)
    assert not any("hint" in line for line in summary_lines(report, None))  # given windows: no hint
    report["calibration"] = dict(report["calibration"], source="self-generated by the model (seed 0, temperature 1.0, top-p 0.95)")
    hints = [line for line in summary_lines(report, None) if line.strip().startswith("hint")]
    assert len(hints) == 1 and "--calib-file" in hints[0]


def test_the_shipped_maps_close_exactly_the_gaps_whose_maps_were_checked():
    """The final maps are refitted on every window, but only for the gaps whose held-out maps the
    compensation check measured: on this tiny Llama the held-out fit leaves the gap of layer 4 open
    while cross-validation on every window would keep a map there (an unchecked fold, before)."""
    import itertools

    model = tiny_model("llama", layers=6)
    graph = lorp_fx.trace(model, WINDOWS[:1])
    judge = lorp_fx.CandidateLoss(graph, [{"input_ids": WINDOWS[i : i + 4]} for i in range(0, 12, 4)],
                                  loss_windows=4, compensation="cosine")
    names = [layer.name for layer in judge.runner.layers]
    checked_open = 0
    for removed in itertools.chain(itertools.combinations(names, 1), itertools.combinations(names, 2)):
        checked = {fit.fold_into for fit in judge.fits(removed)}
        assert {fit.fold_into for fit in judge.final_fits(removed)} == checked
        checked_open += len(judge.gaps(judge.runner.units_of(removed))) - len(checked)
    assert checked_open > 0  # some gap was left open by the held-out fit, so the rule was exercised
    result = lorp_fx.prune_model(tiny_model("llama", layers=6), WINDOWS,
                                 PruneConfig(remove=1, method="shortgpt", compensate="auto", loss_windows=4), progress=False)
    gaps = result.report["compensation"]["gaps"]
    assert [g["fold_into"] for g in gaps] == [fit.fold_into for fit in judge.fits(result.plan.remove)]
