"""`CandidateLoss` and `GraphRunner`: the fast measurements equal the slow ones they replace
(`loss.calibration_loss`, `compensation.compensate` / `fit_compensation`), on tiny models."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from tiny_models import VOCAB, tiny_model, trace_inputs

from lorp_fx.calibration.batches import one_window_each
from lorp_fx.compensation.fit import compensate, eager_fits, fit_compensation
from lorp_fx.compensation.gap_fit import cv_errors
from lorp_fx.compensation.solver import RIDGE_GRID, GapStatistics
from lorp_fx.core import errors as lorp_fx_errors
from lorp_fx.core.errors import ConfigError
from lorp_fx.graph.runner import GraphRunner
from lorp_fx.graph.trace import trace
from lorp_fx.judge.candidates import CandidateLoss
from lorp_fx.judge.loss import calibration_loss, next_token_loss
from lorp_fx.selection.registry import select

PREFIX = {"llama": "model.layers", "gpt2": "transformer.h", "mixtral": "model.layers", "gemma3": "model.layers",
          "qwen3": "model.layers"}


@functools.lru_cache(maxsize=None)
def setup(family: str, layers: int = 6, windows: int = 12):
    """(model, graph, batches); shared by the tests (nothing here modifies them)."""
    torch.manual_seed(0)
    model = tiny_model(family, layers=layers)
    ids = torch.randint(2, VOCAB, (windows, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in ids.split(4)]
    graph = trace(model, dict(trace_inputs(family), use_cache=False))
    return model, graph, batches


def names(family, layers):
    return [f"{PREFIX[family]}.{i}" for i in layers]


SETS = [[], [2], [2, 3], [1, 4], [3], [1, 2, 4], [4], [2, 3, 4]]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_plain_loss_equals_calibration_loss_exactly_in_any_order(family):
    """Measured in an order that makes most measurements resume from a cached model."""
    _, graph, batches = setup(family)
    reference = calibration_loss(graph, one_window_each(batches[:2]))
    fast = CandidateLoss(graph, batches, loss_windows=8)
    for removed in SETS:
        assert fast(names(family, removed)) == reference(names(family, removed))
    assert fast.measurements == len(SETS) - 1  # the dense loss came with the caching pass
    assert fast(names(family, [2, 3])) == reference(names(family, [2, 3])) and fast.measurements == len(SETS) - 1


def folded_loss(model, removed, windows, method) -> float:
    """The loss the judge must report: compensate()'s folded model on the first 4 windows, one at a time like the
    judge (the same float32 mean per window, averaged)."""
    pruned = compensate(model, removed, windows, method).model
    with torch.no_grad():
        return sum(next_token_loss(lambda **kw: pruned(**kw, use_cache=False), w) for w in windows[:4]) / 4


# The judge applies each map to its unit's branch output, the folded model has it in the projection's weights:
# the same function, rounded to float32 in other places, which moves the loss by about one float32 rounding of
# it (at most 1.5 measured under ATEN_CPU_CAPABILITY=default, avx2 and avx512); 8 bound it.
LOSS_REL = 8 * 2.0**-24


@pytest.mark.numeric
@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "gemma3"])
def test_compensated_loss_equals_the_folded_model(family):
    """fit_on='all', no rejection: the maps and the loss are compensate()'s (Gemma: the
    per-channel form, folded into the sandwich norm's weight). compensate() gets the judge's windows, one
    per call: a batch of 4 rounds the states otherwise (a mixture of experts groups its tokens by expert),
    which moved the maps by 1e-7 and could tip the cross-validated ridge."""
    model, graph, batches = setup(family)
    windows = one_window_each(batches)
    fast = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine", fit_on="all",
                         reject_unhelpful_maps=False)
    for removed in ([2], [2, 3], [1, 4], [1, 2, 4]):
        layer_names = names(family, removed)
        assert fast(layer_names) == pytest.approx(folded_loss(model, layer_names, windows, "cosine"), rel=LOSS_REL)
        reference = fit_compensation(model, layer_names, windows, "cosine")
        mine = fast.fits(layer_names)
        assert [f.fold_into for f in mine] == [f.fold_into for f in reference]
        assert [f.ridge for f in mine] == [f.ridge for f in reference]
        for a, b in zip(mine, reference):
            assert a.form == b.form
            # The same float32 states on both sides; only the float64 sums may add up in another order.
            torch.testing.assert_close(a.transform, b.transform, rtol=0, atol=1e-10)
        assert [f.projections for f in eager_fits(model, mine)] == [f.projections for f in reference]


@pytest.mark.numeric
def test_sublayer_removals_are_compensated_like_compensate():
    model, graph, batches = setup("llama")
    fast = CandidateLoss(graph, batches, loss_windows=4, compensation="lstsq", fit_on="all",
                         reject_unhelpful_maps=False)
    removed = ["model.layers.2.mlp", "model.layers.3.self_attn", "model.layers.4"]
    expected = folded_loss(model, removed, one_window_each(batches), "lstsq")
    assert fast(removed) == pytest.approx(expected, rel=LOSS_REL)
    assert [f.fold_into for f in fast.fits(removed)] == ["model.layers.2.self_attn", "model.layers.3.mlp"]


@pytest.mark.numeric
def test_sequential_fits_equal_compensates():
    model, graph, batches = setup("llama")
    fast = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine", fit_on="all",
                         reject_unhelpful_maps=False)
    removed = names("llama", [1, 3, 4])
    reference = compensate(model, removed, batches, "cosine", sequential=True).fits
    mine = fast.sequential_fits(removed)
    assert len(mine) == len(reference) == 2
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a.transform, b.transform, rtol=0, atol=1e-5)
    assert fast.loss_with(removed, mine) != fast(removed)  # the second gap sees another view


def test_only_layer_entry_states_are_kept_and_the_rest_recomputed_alike():
    """The cache holds the state entering each layer (and the final one), half the states of
    a two-sublayer decoder; a state inside a layer is recomputed equal to a full pass's."""
    _, graph, batches = setup("llama")
    fast = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine")
    runner, layers = fast.runner, len(fast.runner.layers)
    kept = {u for states in [*fast._fit_states, *fast._cache[fast._dense_key]] for u in states}
    assert kept == {group[0] for group in runner.layer_units} | {len(runner.units)} and len(kept) == layers + 1
    fast(names("llama", [2, 3])), fast(names("llama", [2, 3, 5]))
    assert all(set(states) <= kept for model in fast._cache.values() for states in model)
    batch, states = fast.fit_batches[0], fast._fit_states[0]
    full = runner.run(batch, record=True)[1]
    for unit in (1, 3, 2 * layers - 1):
        assert torch.equal(fast._state(states, batch, unit), full[unit])


def test_sandwich_norms_take_only_a_per_channel_map():
    _, graph, batches = setup("gemma3")
    fast = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine", reject_unhelpful_maps=False)
    assert fast.form == "diagonal" and all(fast.runner.branch_normalised(u) for u in range(len(fast.runner.units)))
    removed = names("gemma3", [2, 3])
    assert [f.form for f in fast.fits(removed)] == ["diagonal"]
    full = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine", form="full")
    assert full.fits(removed) == [] and full(removed) == full.loss(removed, compensate=False)
    with pytest.raises(ConfigError, match="form"):
        CandidateLoss(graph, batches, compensation="cosine", form="banded")


def test_maps_are_fitted_on_the_other_windows_and_unhelpful_ones_rejected():
    _, graph, batches = setup("llama")
    kept = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine", reject_unhelpful_maps=False)
    assert kept.fit_on == "others" and len(kept.fit_batches) == 8  # one window per call
    fits = kept.fits(names("llama", [1, 3, 4]))
    assert fits and all(f.tokens == 8 * 16 for f in fits)  # windows 4..11 only
    guarded = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine")
    for removed in ([1], [2], [3], [2, 3], [1, 4], [1, 2, 3, 4]):
        shipped = {f.fold_into for f in guarded.fits(names("llama", removed))}
        for fit in kept.fits(names("llama", removed)):  # a map is kept iff it beats the identity held out
            assert (fit.fold_into in shipped) == (min(fit.cv_errors.values()) < fit.error_before)


@pytest.mark.numeric
def test_fast_cross_validation_equals_the_slow_one():
    generator = torch.Generator().manual_seed(0)
    d = 24
    parts = [GapStatistics(d, "cosine") for _ in range(4)]
    mixing = torch.randn(d, d, generator=generator) / d
    for r in range(12):
        x = 3 * torch.randn(40, d, generator=generator)
        x_out = x + 0.3 * torch.randn(40, d, generator=generator) @ mixing
        parts[r % 4].update(x, x_out, x + 0.2 * torch.randn(40, d, generator=generator))
    total = GapStatistics(d, "cosine")
    for part in parts:
        total.merge(part)
    fast = cv_errors(parts, total)
    for ridge in RIDGE_GRID:
        slow = sum(p.error_sum(total.minus(p).solve(ridge)) for p in parts) / total.target_sum
        assert fast[ridge] == pytest.approx(slow, rel=1e-9)


def test_runner_resumes_anywhere_with_the_same_result():
    _, graph, batches = setup("qwen3")
    runner = GraphRunner(graph)
    batch = {"input_ids": batches[0]["input_ids"]}
    full = graph(**batch).logits
    _, states = runner.run(batch, record=True)
    for start in range(len(runner.units)):
        out = runner.run(batch, resume=(start, states[start]))
        assert torch.equal(out.logits, full)
    removed = runner.units_of(names("qwen3", [2]))
    direct, recorded = runner.run(batch, removed, record=True)
    for start in range(min(removed) + 1):
        assert torch.equal(runner.run(batch, removed, resume=(start, states[start])).logits, direct.logits)
    assert set(recorded) == set(range(len(runner.units) + 1))


def test_costs_are_counted():
    _, graph, batches = setup("llama")
    fast = CandidateLoss(graph, batches, loss_windows=4)
    assert fast.pass_seconds > 0 and fast.seconds == 0
    for removed in itertools.islice(SETS, 1, 4):
        fast(names("llama", removed))
    assert fast.measurements == 3 and fast.passes() > 0


@pytest.mark.parametrize("compensation", [None, "cosine"])
def test_statistics_from_the_caching_pass_equal_collect_statistics(compensation):
    from lorp_fx.calibration.graph_observer import collect_statistics

    model, graph, batches = setup("llama")
    windows = 12 if compensation else 8
    expected, _ = collect_statistics(model, batches[: windows // 4], progress=False)
    fast = CandidateLoss(graph, batches[: windows // 4], loss_windows=8, compensation=compensation)
    got = fast.statistics()
    assert got.points == expected.points and got.blocks == expected.blocks
    assert got.block_points == expected.block_points and got.removable == expected.removable
    for name in ("similarity", "angular", "last_token_angular"):
        assert abs(getattr(got, name) - getattr(expected, name)).max() < 1e-12
    assert (got.token_count, got.sequence_count) == (expected.token_count, expected.sequence_count)


@pytest.mark.numeric
def test_final_fits_use_every_window_like_compensate():
    """Held-out fits for judging, but the maps shipped are fitted on every window."""
    model, graph, batches = setup("llama")
    fast = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine", reject_unhelpful_maps=False)
    removed = names("llama", [1, 3, 4])
    for sequential in (False, True):
        reference = compensate(model, removed, batches, "cosine", sequential=sequential).fits
        mine = fast.final_fits(removed, sequential=sequential)
        assert [f.tokens for f in mine] == [12 * 16] * 2
        for a, b in zip(mine, reference, strict=True):
            torch.testing.assert_close(a.transform, b.transform, rtol=0, atol=1e-5)


def test_compensation_report_says_whether_maps_help():
    _, graph, batches = setup("llama")
    fast = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine", reject_unhelpful_maps=False)
    report = fast.compensation_report(names("llama", [2, 3]))
    assert report["held_out"] and report["apply"] == (report["compensated_loss"] < report["uncompensated_loss"])
    plan = select(fast.statistics(), 2, method="lorp", loss_fn=fast)
    assert plan.details["compensation"]["compensated_loss"] == plan.details["loss"]


def test_bad_arguments_are_one_line_errors():
    _, graph, batches = setup("llama")
    for options, word in (({"compensation": "ridge"}, "compensation method"), ({"fit_on": "test"}, "fit_on")):
        with pytest.raises(ConfigError, match=word) as error:
            CandidateLoss(graph, batches, **options)
        assert "\n" not in str(error.value)
    fast = CandidateLoss(graph, batches, loss_windows=4)
    with pytest.raises(lorp_fx_errors.UnknownBlockError, match="model.layers.99"):
        fast(["model.layers.99"])


def test_a_released_judge_keeps_its_answers_and_refuses_new_measurements():
    _, graph, batches = setup("llama")
    fast = CandidateLoss(graph, batches, loss_windows=4, compensation="cosine")
    kept = fast(names("llama", [2]))
    fast.release()
    assert fast(names("llama", [2])) == kept and not fast._fit_states and not fast._cache
    for after in (lambda: fast(names("llama", [3])), lambda: fast.final_fits(names("llama", [2])),
                  fast.statistics, lambda: fast.loss_with(names("llama", [2]), [])):
        with pytest.raises(lorp_fx_errors.CalibrationError, match="released"):
            after()
