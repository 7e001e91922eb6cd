"""The judge's cheaper measurements (issue 27): the head in chunks of positions, states kept in float16 where the
loss allows it, and the compensation check asked once. Each is checked against what it replaces, on tiny models."""

from __future__ import annotations

import pytest
import torch
from test_candidate_loss import names, setup

from lorp_fx.judge import states as judge_states
from lorp_fx.judge.candidates import CandidateLoss
from lorp_fx.judge.head import head_loss
from lorp_fx.judge.loss import next_token_cross_entropy
from lorp_fx.judge.states import pack, packed_bytes, unpack
from lorp_fx.selection.registry import select

# The chunked head computes every position's logits with the same dot products as the whole head; a kernel may
# block a matrix of fewer rows differently and round a logit differently (float32), which moves a position's loss
# by about one rounding of it; the mean of such losses moves by as much. 8 roundings of the loss bound it.
LOSS_REL = 8 * 2.0**-24


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
def test_the_head_in_chunks_gives_the_whole_heads_loss(family, chunk):
    _, graph, batches = setup(family)
    judge = CandidateLoss(graph, batches, loss_windows=2, half_states=False)
    runner, final = judge.runner, len(judge.runner.units)
    batch = dict(batches[0])
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][1, -4:] = 0  # padding at the end of one row: excluded alike
    for removed in (frozenset(), runner.units_of(names(family, [2, 3]))):
        state = runner.run(batch, removed, record=True, stop=final)[1][final]
        whole = float(next_token_cross_entropy(runner.run(batch, removed), batch))
        assert abs(head_loss(runner, batch, state, chunk) - whole) <= LOSS_REL * abs(whole)


def test_packed_states_round_to_float16_and_keep_what_does_not_fit():
    state = torch.randn(2, 7, 16) * 100
    packed = pack(state, True)
    assert packed.dtype == torch.float16 and packed_bytes([{0: packed}]) == state.numel() * 2
    # round to nearest: within half a unit in the last place of 11 significant bits, relative
    assert (unpack(packed, torch.float32) - state).abs().le(state.abs() * 2.0**-11).all()
    too_large = state.clone()
    too_large[0, 0, 0] = 1e6  # beyond float16's 65,504
    assert pack(too_large, True) is too_large and pack(state, False) is state


def test_half_states_are_used_only_where_the_loss_matches_float32(monkeypatch):
    _, graph, batches = setup("llama")
    monkeypatch.setattr(judge_states, "LOSS_TOLERANCE", 0.0)  # any difference at all: float32
    strict = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine")
    assert not strict.half_states
    assert all(s.dtype == torch.float32 for window in strict._fit_states for s in window.values())
    monkeypatch.setattr(judge_states, "LOSS_TOLERANCE", 1.0)
    loose = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine")
    assert loose.half_states
    assert all(s.dtype == torch.float16 for window in loose._fit_states for s in window.values())
    assert packed_bytes(loose._fit_states) * 2 == packed_bytes(strict._fit_states)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_half_states_make_the_same_decisions_with_losses_within_the_tolerance(family, monkeypatch):
    """The same plan and the same measured sets, each loss within the measured float16 effect: the check's
    tolerance per window (the loss is a mean of windows)."""
    _, graph, batches = setup(family, layers=6, windows=12)
    monkeypatch.setattr(judge_states, "LOSS_TOLERANCE", 1.0)  # force float16, to compare it with float32
    plans, judges = [], []
    for half in (False, True):
        judge = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine", half_states=half)
        assert judge.half_states == half
        plans.append(select(judge.statistics(), 3, method="lorp", loss_fn=judge))
        judges.append(judge)
    assert plans[0].remove == plans[1].remove
    assert set(judges[0].memo) == set(judges[1].memo)
    # the float16 rounding's effect on a window's loss, measured as the check measures it, bounds the means
    measured = max(abs(a - b) for key in judges[0].window_losses
                   for a, b in zip(judges[0].window_losses[key], judges[1].window_losses[key]))
    assert measured < 2e-3
    for key, value in judges[0].memo.items():
        assert abs(judges[1].memo[key] - value) <= measured + 1e-7


def test_statistics_are_read_before_the_states_are_halved(monkeypatch):
    _, graph, batches = setup("llama")
    monkeypatch.setattr(judge_states, "LOSS_TOLERANCE", 1.0)
    half = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine").statistics()
    full = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine", half_states=False).statistics()
    for name in ("similarity", "angular", "last_token_angular"):
        assert abs(getattr(half, name) - getattr(full, name)).max() == 0


def test_the_compensation_check_of_a_set_is_measured_once():
    _, graph, batches = setup("llama")
    judge = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine")
    first = judge.compensation_report(names("llama", [2, 3]))
    measured = judge.measurements
    again = judge.compensation_report(names("llama", [3, 2]))
    assert again == first and judge.measurements == measured
    again["kept"].append("x")  # a caller's copy: the judge's answer stays
    assert judge.compensation_report(names("llama", [2, 3])) == first


def test_the_guard_windows_dense_losses_come_with_the_caching_pass():
    _, graph, batches = setup("llama")
    sources = ["file"] * 8 + ["own"] * 4
    judge = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine", sources=sources, held_only=["own"],
                          half_states=False)
    assert len(judge.guard_batches) == 4
    measured = judge.measurements
    assert judge._guard_losses(frozenset(), {}) == judge._losses_on(judge.guard_batches, judge._guard_states,
                                                                    frozenset(), {})
    assert judge.measurements == measured


def test_after_a_runners_first_chunk_every_chunk_is_sized_from_its_vocabulary(monkeypatch):
    from lorp_fx.judge import head

    _, graph, batches = setup("llama")
    judge = CandidateLoss(graph, batches, loss_windows=2, half_states=False)
    runner, final = judge.runner, len(judge.runner.units)
    state = runner.run(batches[0], record=True, stop=final)[1][final]
    assert head._VOCABULARY[runner] > 0  # the caching pass computed a head: the vocabulary is known
    monkeypatch.setattr(head, "CHUNK_BYTES", 4 * head._VOCABULARY[runner] * 4 * 3)  # 3 positions of 4 rows
    calls = []
    original = runner.run
    monkeypatch.setattr(runner, "run", lambda *a, **k: calls.append(a[0]["input_ids"].shape[1]) or original(*a, **k))
    whole = float(next_token_cross_entropy(original(batches[0]), batches[0]))
    assert abs(head_loss(runner, batches[0], state) - whole) <= LOSS_REL * abs(whole)
    assert calls and max(calls) == 3


def test_a_plain_judges_dense_losses_come_with_its_caching_pass(monkeypatch):
    """The calibration-mismatch check (pipeline/mismatch.py) reads the dense loss per source from a judge without
    maps too, instead of a forward with a batch's whole logits; it is the loss the model gives on those windows."""
    from types import SimpleNamespace

    from lorp_fx.pipeline import mismatch

    model, graph, batches = setup("llama")
    windows = torch.cat([b["input_ids"] for b in batches])
    text = SimpleNamespace(windows=windows, sources=["file"] * len(windows))
    judge = CandidateLoss(graph, batches, loss_windows=4, half_states=False, sources=text.sources)
    measured = mismatch.dense_losses(model, None, text, per_source=4)["file"]  # the first 4 windows, measured
    monkeypatch.setattr(mismatch, "next_token_loss", lambda *a, **k: pytest.fail("measured again"))
    found = mismatch.dense_losses(model, judge, text)
    assert set(found) == {"file"}
    # The judge's head runs in chunks of positions, the model's whole: LOSS_REL (equal to the bit with either
    # kernel set, ATEN_CPU_CAPABILITY=default and avx2, on this tiny Llama).
    assert abs(found["file"] - measured) <= LOSS_REL * abs(measured)
