"""`lorp`, the default selector: hand-made statistics with known answers, fake losses,
SmolLM2-135M's statistics with a catastrophic layer, and Hypothesis properties over
adversarial losses (the guarantees of the module doc)."""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import require_shared_data
from strategies import selection_scenarios

from lorp_fx.core.errors import BudgetError, SelectorError
from lorp_fx.core.stats import LayerStatistics
from lorp_fx.selection.registry import SELECTORS, select

# `lorp_fx.selection.lorp` is the function once the package is imported; the module:
lorp_module = importlib.import_module("lorp_fx.selection.lorp")
run_cost, run_surrogate, runs_of, free_sets = (
    lorp_module.run_cost, lorp_module.run_surrogate, lorp_module.runs_of, lorp_module.free_sets)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def chain_stats(costs, joins=None) -> LayerStatistics:
    """Single-stream statistics whose block b has Block Influence costs[b].

    Distances add up along depth, D(i, j) = sum of costs[i:j], unless `joins` gives
    D for some pairs of points (i, j) directly (a run that skips less than the sum).
    """
    n = len(costs)
    D = np.zeros((n + 1, n + 1))
    for i in range(n + 1):
        for j in range(i + 1, n + 1):
            D[i, j] = D[j, i] = sum(costs[i:j])
    for (i, j), d in (joins or {}).items():
        D[i, j] = D[j, i] = d
    return LayerStatistics.from_similarity(1.0 - D)


class Recorder:
    """A fake calibration loss: base + sum of per-block costs + pair terms, counting calls."""

    def __init__(self, costs: dict[int, float], pairs: dict[tuple[int, int], float] | None = None, base=3.0):
        self.costs, self.pairs, self.base = costs, pairs or {}, base
        self.calls: list[list[str]] = []

    def value(self, idx: set[int]) -> float:
        value = self.base + sum(self.costs[b] for b in idx)
        return value + sum(v for (a, b), v in self.pairs.items() if a in idx and b in idx)

    def __call__(self, removed: list[str]) -> float:
        self.calls.append(list(removed))
        return self.value({int(name.rsplit(".", 1)[1]) for name in removed})


def indices(plan) -> list[int]:
    return [int(name.split(".")[1]) for name in plan.remove]


def names(idx) -> list[str]:
    return [f"layers.{i}" for i in sorted(idx)]


EIGHT = [0.5, 0.04, 0.02, 0.03, 0.01, 0.05, 0.02, 0.5]  # blocks 0 and 7 protected by default


# --------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------


def test_registered_under_its_name_with_keyword_options():
    assert SELECTORS["lorp"].run is lorp_module.lorp
    assert SELECTORS["lorp"].options == ("protected", "loss_fn", "width", "max_evaluations")
    assert SELECTORS["lorp"].judges_by_loss and list(SELECTORS)[0] == "lorp"  # the default is listed first
    assert select(chain_stats(EIGHT), 1, method="lorp").method == "lorp"
    with pytest.raises(SelectorError, match="evaluations"):  # the old option is refused, naming the valid ones
        select(chain_stats(EIGHT), 1, method="lorp", evaluations=3)


@pytest.mark.parametrize("n, expected", [(1, [4]), (2, [2, 4]), (3, [2, 4, 6]), (4, [2, 3, 4, 6])])
def test_without_a_loss_it_removes_the_lowest_own_cost(n, expected):
    stats = chain_stats(EIGHT)
    plan = select(stats, n, method="lorp")
    assert indices(plan) == expected  # ties (2 and 6): the shallower first
    assert plan.remove == select(stats, n, method="shortgpt").remove
    assert plan.scores["layers.4"] == pytest.approx(0.01)
    assert "statistics" in plan.details["objective"]


def test_free_sets_are_shortgpt_and_the_best_runs():
    stats = chain_stats(EIGHT)
    found = free_sets(stats, 2, None)
    assert found["shortgpt"] == (2, 4)
    assert found["uidl"] == found["streamline"] == (3, 4)  # the run 3..4 skips the least (0.04)
    # no contiguous run of 2 among the eligible blocks: only ShortGPT's set is proposed
    assert set(free_sets(stats, 2, [0, 2, 4, 6, 7])) == {"shortgpt"}


def test_a_catastrophic_block_with_cheap_statistics_is_not_chosen():
    """Block 4 looks the cheapest to the statistics but is catastrophic to remove (like
    SmolLM2's layer 11); two measured candidates per step see it and keep it."""
    stats = chain_stats(EIGHT)
    loss = Recorder({1: 0.3, 2: 0.2, 3: 0.35, 4: 5.0, 5: 0.4, 6: 0.25})
    plan = select(stats, 2, method="lorp", loss_fn=loss)
    assert indices(plan) == [2, 6]  # the true optimum, 0.45 above base
    assert 4 in indices(select(stats, 2, method="shortgpt"))
    assert plan.details["loss"] == pytest.approx(3.45)
    assert plan.details["chosen_from"] == "greedy"


def test_contradicted_estimates_widen_the_step():
    """The statistics rank blocks 4, 2, 6, 3 first, but the first three are catastrophic:
    the step keeps measuring until it finds the cheap block and nothing unmeasured could
    beat it; the first step is marked as widened."""
    stats = chain_stats(EIGHT)
    loss = Recorder({1: 0.6, 2: 4.0, 3: 0.1, 4: 5.0, 5: 0.5, 6: 4.5})
    plan = select(stats, 1, method="lorp", loss_fn=loss)
    assert indices(plan) == [3]
    first = plan.details["steps"][0]
    assert first["widened"] and len(first["candidates"]) >= 4
    assert "layers.3" in first["candidates"]


def test_consistent_estimates_do_not_widen():
    """Losses that follow the statistics exactly: every step measures two candidates."""
    costs = [0.5, 0.04, 0.02, 0.03, 0.01, 0.05, 0.021, 0.5]
    stats = chain_stats(costs, joins={(i, j): sum(costs[i:j]) for i in range(9) for j in range(i + 1, 9)})
    loss = Recorder({b: 10 * costs[b] for b in range(1, 7)})
    plan = select(stats, 3, method="lorp", loss_fn=loss)
    assert indices(plan) == [2, 4, 6]
    assert [len(s["candidates"]) for s in plan.details["steps"]] == [2, 2, lorp_module.LAST_WIDTH]  # the last choice is final
    assert not any(s["widened"] for s in plan.details["steps"])


def test_every_step_compares_two_measured_candidates_even_the_last():
    stats = chain_stats(EIGHT)
    plan = select(stats, 5, method="lorp", loss_fn=Recorder({b: 0.1 * b for b in range(1, 7)}))
    sizes = [len(s["candidates"]) for s in plan.details["steps"]]
    assert sizes[:-1] and min(sizes) >= 2  # five steps, the last with two candidates left


def test_a_free_set_wins_when_the_greedy_path_is_trapped():
    """Removing 3 and 4 together is cheap (an interaction), each alone is expensive: the
    greedy never takes either, the contiguous run 3..4 (UIDL's proposal) is the answer."""
    stats = chain_stats(EIGHT)
    loss = Recorder({1: 0.3, 2: 0.3, 3: 0.5, 4: 0.5, 5: 0.3, 6: 0.3}, pairs={(3, 4): -0.9})
    plan = select(stats, 2, method="lorp", loss_fn=loss)
    assert indices(plan) == [3, 4]
    assert plan.details["chosen_from"] in ("uidl", "streamline")
    assert plan.details["loss"] == pytest.approx(3.1)
    assert plan.details["loss"] < plan.details["greedy"]["loss"]


def test_nan_and_inf_losses_are_that_candidates_loss():
    stats = chain_stats(EIGHT)

    def loss(removed):
        if "layers.2" in removed:
            return math.nan
        if "layers.4" in removed:
            return math.inf
        if "layers.6" in removed:
            raise OverflowError("the loss overflowed")
        return 3.0 + 0.01 * len(removed)

    plan = select(stats, 2, method="lorp", loss_fn=loss)
    assert not {2, 4, 6} & set(indices(plan))
    assert math.isinf(plan.details["free_sets"]["shortgpt"]["loss"])
    json.dumps(plan.to_dict())


def test_every_candidate_catastrophic_still_gives_a_plan():
    stats = chain_stats(EIGHT)
    plan = select(stats, 2, method="lorp", loss_fn=lambda removed: math.nan)
    assert len(plan.remove) == 2 and math.isinf(plan.details["loss"])


def test_max_evaluations_caps_the_widening_only():
    stats = chain_stats(EIGHT)
    loss = Recorder({1: 0.6, 2: 4.0, 3: 0.1, 4: 5.0, 5: 0.5, 6: 4.5})
    plan = select(stats, 2, method="lorp", loss_fn=loss, max_evaluations=4)
    assert [len(s["candidates"]) for s in plan.details["steps"]] == [2, lorp_module.LAST_WIDTH]
    assert not any(s["widened"] for s in plan.details["steps"])  # the cap stopped the widening
    assert plan.details["evaluations"] == len({tuple(c) for c in loss.calls})
    with pytest.raises(BudgetError, match="width"):
        select(stats, 2, method="lorp", loss_fn=loss, width=1)


def test_nothing_is_measured_twice():
    stats = chain_stats([0.5] + [0.01 * (1 + (i * 7) % 5) for i in range(12)] + [0.5])
    loss = Recorder({b: 0.1 * ((b * 3) % 7) for b in range(1, 13)}, pairs={(4, 5): 0.3, (7, 9): -0.2})
    plan = select(stats, 5, method="lorp", loss_fn=loss)
    assert len({tuple(c) for c in loss.calls}) == len(loss.calls) == plan.details["evaluations"]


def test_run_cost_is_the_mean_of_endpoint_distance_and_own_costs():
    stats = chain_stats([0.5, 0.02, 0.04, 0.06, 0.5], joins={(1, 4): 0.05})
    cost = run_cost(stats)
    assert cost(2, 2) == pytest.approx(0.04)  # a single block: its Block Influence
    assert cost(1, 3) == pytest.approx((0.05 + 0.12) / 2)
    assert runs_of(stats, [3, 1, 2]) == [(1, 3)]
    assert run_surrogate(stats, [1, 3]) == pytest.approx(0.02 + 0.06)
    assert run_surrogate(stats, [1, 2, 3]) == pytest.approx(0.085)


def test_runs_never_cross_streams():
    """An encoder-decoder: block 2 starts a second stream, so blocks 1 and 2 are two runs."""
    stats = chain_stats([0.5, 0.02, 0.03, 0.5])
    stats = replace(stats, block_points=[(0, 1), (1, 2), (4, 3), (3, 4)])  # block 2 reads point 4, not 2
    assert runs_of(stats, [1, 2]) == [(1, 1), (2, 2)]


# --------------------------------------------------------------------------------------
# SmolLM2-135M: the authors' S, and a loss where a layer with ordinary statistics is catastrophic
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_stats() -> LayerStatistics:
    """The authors' S over the 30 layer inputs; the final output point (read by no
    eligible block) is a copy of the last input."""
    ref = json.loads(require_shared_data("reference", "smollm2-lorp-paper.json").read_text())
    S = np.array(ref["similarity"])
    n = S.shape[0]
    full = np.ones((n + 1, n + 1))
    full[:n, :n] = S
    full[n, :n] = full[:n, n] = S[n - 1]
    return LayerStatistics.from_similarity(full, blocks=[f"model.layers.{i}" for i in range(n)])


def test_smollm2_without_a_loss_is_shortgpt(smollm2_stats):
    for n, expected in ((3, [13, 14, 25]), (9, [3, 12, 13, 14, 15, 16, 17, 25, 26])):
        plan = select(smollm2_stats, n, method="lorp")
        assert [int(r.rsplit(".", 1)[1]) for r in plan.remove] == expected


@pytest.mark.parametrize("n", [3, 6, 9])
def test_smollm2_a_catastrophic_layer_that_looks_ordinary_is_avoided(smollm2_stats, n):
    """A loss that follows the statistics (10 x Block Influence) except at layer 11, whose
    removal costs +1.4 nats (what removing it added to a 6-layer set on SmolLM2's own
    calibration loss, 5.50 against 4.06). ShortGPT's set at 9 contains 11's neighbours,
    not 11; the result must avoid 11 and be no worse than every free set."""
    bi = smollm2_stats.block_influence()
    costs = {b: 10 * float(bi[b]) for b in range(30)}
    costs[11] = 1.4
    loss = Recorder(costs, base=3.2)
    plan = select(smollm2_stats, n, method="lorp", loss_fn=loss)
    chosen = [int(r.rsplit(".", 1)[1]) for r in plan.remove]
    assert 11 not in chosen
    for name, free in plan.details["free_sets"].items():
        assert plan.details["loss"] <= free["loss"], name
    sleb = sum(28 - i for i in range(n))
    assert plan.details["evaluations"] == len({tuple(c) for c in loss.calls}) < sleb


# --------------------------------------------------------------------------------------
# properties over adversarial losses
# --------------------------------------------------------------------------------------


@st.composite
def adversarial(draw):
    """A selection problem (shared strategy) and a loss built to mislead a statistics-guided search."""
    stats, n_remove, protected, eligible = draw(selection_scenarios(max_blocks=14))
    n = stats.n_blocks
    bi = stats.block_influence()
    kind = draw(st.sampled_from(["interactions", "catastrophe", "contradiction", "nan"]))
    weights = draw(st.lists(st.floats(0.0, 2.0), min_size=n, max_size=n))
    if kind == "contradiction":  # the cheaper a block looks, the more it costs
        weights = [float(5.0 * (bi.max() - bi[b]) + 0.01 * w) for b, w in enumerate(weights)]
    if kind == "catastrophe":  # the block of median Block Influence is catastrophic
        median = sorted(eligible, key=lambda b: bi[b])[len(eligible) // 2]
        weights[median] = draw(st.floats(10.0, 1e6))
    pairs = {}
    for a in range(n):
        for b in range(a + 1, n):
            if draw(st.integers(0, 3)) == 0:
                pairs[(a, b)] = draw(st.floats(-1.0, 1.0))
    poisoned = set(draw(st.lists(st.sampled_from(eligible), max_size=2))) if kind == "nan" else set()
    return stats, n_remove, protected, eligible, Recorder(dict(enumerate(weights)), pairs), poisoned


def loss_with_poison(recorder: Recorder, poisoned: set[int]):
    def loss(removed):
        value = recorder(removed)
        return math.nan if poisoned & {int(r.split(".")[1]) for r in removed} else value

    return loss


def true_loss(recorder: Recorder, poisoned: set[int], idx) -> float:
    return math.inf if poisoned & set(idx) else recorder.value(set(idx))


@settings(max_examples=150, deadline=None)
@given(case=adversarial(), width=st.integers(2, 3))
def test_never_worse_than_the_free_sets_over_adversarial_losses(case, width):
    stats, n_remove, protected, eligible, recorder, poisoned = case
    plan = select(stats, n_remove, method="lorp", protected=protected, loss_fn=loss_with_poison(recorder, poisoned),
                  width=width)
    chosen = indices(plan)
    assert len(chosen) == len(set(chosen)) == n_remove and set(chosen) <= set(eligible)
    final = true_loss(recorder, poisoned, chosen)
    assert plan.details["loss"] == final
    for name, idx in free_sets(stats, n_remove, protected).items():  # the guarantee
        assert final <= true_loss(recorder, poisoned, idx), name
    measured_full = [c for c in recorder.calls if len(c) == n_remove]
    assert final <= min(true_loss(recorder, poisoned, [int(r.split(".")[1]) for r in c]) for c in measured_full)
    for step_index, step in enumerate(plan.details["steps"]):  # two measured candidates per step, four at the last
        left = len(eligible) - step_index
        at_least = width if step_index < n_remove - 1 else max(width, lorp_module.LAST_WIDTH)
        assert len(step["candidates"]) >= min(at_least, left)
    json.dumps(plan.to_dict())


@settings(max_examples=40, deadline=None)
@given(case=adversarial())
def test_deterministic(case):
    stats, n_remove, protected, _, recorder, poisoned = case
    first = select(stats, n_remove, method="lorp", protected=protected, loss_fn=loss_with_poison(recorder, poisoned))
    again = select(stats, n_remove, method="lorp", protected=protected, loss_fn=loss_with_poison(recorder, poisoned))
    assert again.remove == first.remove and again.details == first.details


@settings(max_examples=40, deadline=None)
@given(case=adversarial())
def test_a_single_removal_with_every_candidate_catastrophic_but_one_finds_it(case):
    """One block to remove, every candidate but one catastrophic: the widening finds it."""
    stats, _, protected, eligible, _, _ = case
    good = eligible[-1]
    recorder = Recorder({b: (0.1 if b == good else 100.0) for b in range(stats.n_blocks)})
    plan = select(stats, 1, method="lorp", protected=protected, loss_fn=recorder)
    assert indices(plan) == [good]
