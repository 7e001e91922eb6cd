"""`lorp`, the default selector: hand-made statistics with known answers, fake losses,
properties, and a replay of the calibration losses measured on SmolLM2-135M."""

from __future__ import annotations

import importlib
from dataclasses import replace
import json
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from lorp_fx.errors import BudgetError
from lorp_fx.selectors import SELECTORS, select
from lorp_fx.stats import LayerStatistics
from shared_data import require_shared_data

# `lorp_fx.selectors.lorp` is the function once the package is imported; the module:
lorp_module = importlib.import_module("lorp_fx.selectors.lorp")
default_evaluations = lorp_module.default_evaluations
run_cost = lorp_module.run_cost
run_surrogate = lorp_module.run_surrogate
runs_of = lorp_module.runs_of
step_allocation = lorp_module.step_allocation


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

    def __call__(self, removed: list[str]) -> float:
        self.calls.append(list(removed))
        idx = {int(name.split(".")[1]) for name in removed}
        value = self.base + sum(self.costs[b] for b in idx)
        return value + sum(v for (a, b), v in self.pairs.items() if a in idx and b in idx)


def indices(plan) -> list[int]:
    return [int(name.split(".")[1]) for name in plan.remove]


EIGHT = [0.5, 0.04, 0.02, 0.03, 0.01, 0.05, 0.02, 0.5]  # blocks 0 and 7 protected by default


# --------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------


def test_registered_under_its_name():
    assert SELECTORS["lorp"].run is lorp_module.lorp
    assert select(chain_stats(EIGHT), 1, method="lorp").method == "lorp"


@pytest.mark.parametrize("n, expected", [(1, [4]), (2, [2, 4]), (3, [2, 4, 6]), (4, [2, 3, 4, 6])])
def test_without_a_loss_it_removes_the_lowest_own_cost(n, expected):
    stats = chain_stats(EIGHT)
    plan = select(stats, n, method="lorp")
    assert indices(plan) == expected  # ties (2 and 6): the shallower first
    assert plan.remove == select(stats, n, method="shortgpt").remove
    assert plan.scores["layers.4"] == pytest.approx(0.01)
    assert "statistics" in plan.details["objective"]


def test_the_loss_overrules_a_statistics_trap():
    """Block 2 looks cheap to the statistics but is catastrophic to remove (like SmolLM2's
    layer 11): with enough measurements to look at it, lorp keeps it."""
    stats = chain_stats(EIGHT)
    loss = Recorder({1: 0.3, 2: 5.0, 3: 0.35, 4: 0.2, 5: 0.4, 6: 0.25})
    plan = select(stats, 2, method="lorp", loss_fn=loss, evaluations=4)
    assert indices(plan) == [4, 6]  # the true optimum, 0.45 above base
    assert indices(select(stats, 2, method="shortgpt")) == [2, 4]
    assert plan.details["loss"] == pytest.approx(3.45)
    assert len(loss.calls) == plan.details["evaluations"] <= 4
    # the first step measures one block, the best estimated: the lowest Block Influence
    assert loss.calls[0] == ["layers.4"]
    assert plan.details["steps"][1]["candidates"]["layers.2,layers.4".split(",")[0]] if False else True


def test_the_context_model_finds_a_cheap_run():
    """Re-measuring after a removal: once block 3 is gone, removing its neighbour 4 costs
    little (the run 3..4 skips almost nothing, and the loss agrees); other blocks cost
    what they cost alone. A context-free ranking (Block Influence, or stale increments)
    would measure the shallower ties 1 and 2 instead and miss the run."""
    costs = [0.5, 0.03, 0.03, 0.01, 0.03, 0.03, 0.03, 0.5]
    stats = chain_stats(costs, joins={(3, 5): 0.012})
    loss = Recorder({1: 0.30, 2: 0.32, 3: 0.25, 4: 0.40, 5: 0.33, 6: 0.31}, pairs={(3, 4): -0.35})
    plan = select(stats, 2, method="lorp", loss_fn=loss, evaluations=3)
    assert indices(plan) == [3, 4]
    assert loss.calls == [["layers.3"], ["layers.3", "layers.4"], ["layers.1", "layers.3"]]
    assert plan.details["loss"] == pytest.approx(3.30)
    assert indices(select(stats, 2, method="shortgpt")) == [1, 3]


def test_a_measured_increment_is_carried_not_remeasured():
    """A block measured as expensive keeps its measured increment as its estimate, so a
    later step does not spend a measurement on it while its context is unchanged."""
    stats = chain_stats([0.5, 0.01, 0.011, 0.03, 0.03, 0.03, 0.03, 0.03, 0.5])
    # block 2 is the statistics' second choice but costs 2.0; far blocks cost 0.3
    loss = Recorder({1: 0.2, 2: 2.0, 3: 0.3, 4: 0.31, 5: 0.32, 6: 0.33, 7: 0.34})
    plan = select(stats, 3, method="lorp", loss_fn=loss, evaluations=5)
    measured_with_2 = [c for c in loss.calls if "layers.2" in c]
    assert len(measured_with_2) == 1
    assert "layers.2" not in plan.remove


def test_nan_loss_is_never_preferred():
    stats = chain_stats(EIGHT)

    def loss(removed):
        return math.nan if "layers.2" in removed else 3.0 + 0.01 * len(removed)

    plan = select(stats, 2, method="lorp", loss_fn=loss, evaluations=4)
    assert "layers.2" not in plan.remove


def test_measurement_budget():
    stats = chain_stats([0.5] + [0.01 * (1 + (i * 7) % 5) for i in range(12)] + [0.5])  # 12 eligible
    for n in (1, 2, 3, 5):
        loss = Recorder({b: 0.1 * ((b * 3) % 7) for b in range(1, 13)})
        plan = select(stats, n, method="lorp", loss_fn=loss)
        sleb = sum(12 - i for i in range(n))
        assert default_evaluations(12, n) == max(n, sleb // 10)
        assert len(loss.calls) <= default_evaluations(12, n) == plan.details["budget"]
        assert len({tuple(c) for c in loss.calls}) == len(loss.calls)  # nothing measured twice
    with pytest.raises(BudgetError, match="evaluations"):
        select(stats, 3, method="lorp", loss_fn=Recorder({b: 0.1 for b in range(1, 13)}), evaluations=2)


@pytest.mark.parametrize(
    "budget, n, expected",
    [(8, 3, [1, 2, 5]), (15, 6, [1, 2, 2, 2, 2, 6]), (21, 9, [1] + [2] * 7 + [6]), (2, 1, [2]),
     (3, 3, [1, 1, 1]), (4, 3, [1, 2, 1]), (5, 2, [1, 4])],
)
def test_step_allocation(budget, n, expected):
    assert step_allocation(budget, n) == expected
    assert sum(expected) == budget


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
# SmolLM2-135M: the authors' S and the calibration losses lorp measures there
# --------------------------------------------------------------------------------------

# Mean token NLL on the first 8 x 256 tokens of WikiText-2 valid.txt (SLEB's calibration
# amount) of SmolLM2-135M-Instruct Q4_1, fp32, without the listed layers; measured by
# research/default_selector_v1.py. Exactly the sets lorp asks for at 3, 6, 9.
SMOLLM2_LOSSES = {
    "13": 3.36617, "12,13": 3.49636, "13,14": 3.48329, "12,13,14": 3.63486, "13,14,15": 3.72653,
    "13,14,17": 3.63967, "13,14,25": 3.67189, "13,14,26": 3.61368, "12,13,14,17": 3.79379,
    "12,13,14,25": 3.82527, "12,13,14,16,17": 3.99666, "12,13,14,17,26": 3.90549,
    "11,12,13,14,17,26": 5.50004, "12,13,14,17,18,26": 4.34016, "12,13,14,17,25,26": 4.05681,
    "3,12,13,14,17,26": 4.15053, "7,12,13,14,17,26": 4.18477, "9,12,13,14,17,26": 4.24465,
    "3,12,13,14,17,25,26": 4.27122, "3,4,12,13,14,17,26": 4.44692, "2,3,12,13,14,17,25,26": 5.32718,
    "3,12,13,14,17,18,25,26": 4.66511, "3,12,13,14,15,17,18,25,26": 4.99841,
    "3,12,13,14,16,17,18,25,26": 4.60012, "3,12,13,14,17,18,19,25,26": 5.00833,
    "3,6,12,13,14,17,18,25,26": 5.05897, "3,7,12,13,14,17,18,25,26": 4.93783,
    "3,9,12,13,14,17,18,25,26": 5.00238,
}


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


@pytest.mark.parametrize(
    "n, expected, evaluations",
    [
        (3, [13, 14, 26], 8),  # SLEB's sets (REFERENCE.md), from a tenth of its 81/153/216 measurements
        (6, [12, 13, 14, 17, 25, 26], 15),
        (9, [3, 12, 13, 14, 16, 17, 18, 25, 26], 21),
    ],
)
def test_smollm2_replay_matches_sleb_with_a_tenth_of_the_measurements(smollm2_stats, n, expected, evaluations):
    calls = []

    def loss(removed):
        key = ",".join(str(i) for i in sorted(int(r.rsplit(".", 1)[1]) for r in removed))
        calls.append(key)
        return SMOLLM2_LOSSES[key]

    plan = select(smollm2_stats, n, method="lorp", loss_fn=loss)
    assert [int(r.rsplit(".", 1)[1]) for r in plan.remove] == expected
    assert len(calls) == evaluations == plan.details["evaluations"]
    assert evaluations <= sum(28 - i for i in range(n)) / 10


def test_smollm2_without_a_loss_is_shortgpt(smollm2_stats):
    for n, expected in ((3, [13, 14, 25]), (9, [3, 12, 13, 14, 15, 16, 17, 25, 26])):
        plan = select(smollm2_stats, n, method="lorp")
        assert [int(r.rsplit(".", 1)[1]) for r in plan.remove] == expected


# --------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------


def random_walk_stats(n_blocks: int, seed: int, dim: int = 6) -> LayerStatistics:
    rng = np.random.default_rng(seed)
    h = np.cumsum(rng.normal(size=(n_blocks + 1, dim)) * rng.uniform(0.2, 1.5, size=(n_blocks + 1, 1)), axis=0)
    h += rng.normal(size=dim) * 2
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    return LayerStatistics.from_similarity(h @ h.T)


@st.composite
def scenarios(draw):
    n = draw(st.integers(3, 14))
    stats = random_walk_stats(n, draw(st.integers(0, 2**32 - 1)))
    stats = replace(stats, removable=draw(st.lists(st.booleans() | st.just(True), min_size=n, max_size=n)))
    protected = draw(st.none() | st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    guarded = {0, n - 1} if protected is None else set(protected)
    eligible = [b for b in range(n) if stats.removable[b] and b not in guarded]
    assume(eligible)
    n_remove = draw(st.integers(1, min(len(eligible), n - 2)))
    names = None if protected is None else [stats.blocks[b] for b in protected]
    weights = draw(st.lists(st.floats(0.0, 2.0), min_size=n, max_size=n))
    pair = draw(st.floats(-0.5, 0.5))
    return stats, n_remove, names, eligible, weights, pair


@settings(max_examples=60, deadline=None)
@given(scenario=scenarios(), with_loss=st.booleans(), extra=st.integers(0, 6))
def test_lorp_properties(scenario, with_loss, extra):
    stats, n_remove, protected, eligible, weights, pair = scenario
    options = {"protected": protected}
    loss = None
    if with_loss:
        # per-block costs plus an interaction between neighbours: not additive
        loss = Recorder(dict(enumerate(weights)), {(b, b + 1): pair for b in range(stats.n_blocks - 1)})
        options.update(loss_fn=loss, evaluations=default_evaluations(len(eligible), n_remove) + extra)
    plan = select(stats, n_remove, method="lorp", **options)
    chosen = [int(b.split(".")[1]) for b in plan.remove]
    assert len(chosen) == len(set(chosen)) == n_remove  # exact budget, no duplicates
    assert set(chosen) <= set(eligible)  # protected and non-removable blocks never chosen
    assert chosen == sorted(chosen)
    assert set(plan.scores) <= set(stats.blocks) and plan.scores
    json.dumps(plan.to_dict())
    if loss is not None:
        calls = list(loss.calls)
        assert len(calls) <= options["evaluations"]
        assert len(calls) == plan.details["evaluations"]
        assert plan.details["loss"] == pytest.approx(loss(plan.remove))
        assert plan.details["loss"] <= min(loss(c) for c in calls if len(c) == n_remove) + 1e-12
        loss.calls.clear()
    again = select(stats, n_remove, method="lorp", **options)
    assert again.remove == plan.remove and again.details == plan.details  # deterministic


@settings(max_examples=30, deadline=None)
@given(scenario=scenarios())
def test_with_every_candidate_measured_a_single_step_is_exact(scenario):
    """One block to remove and a budget covering every candidate: the best block by loss."""
    stats, _, protected, eligible, weights, _ = scenario
    loss = Recorder(dict(enumerate(weights)))
    plan = select(stats, 1, method="lorp", protected=protected, loss_fn=loss, evaluations=len(eligible))
    best = min(eligible, key=lambda b: (weights[b], b))
    assert loss(plan.remove) == pytest.approx(3.0 + weights[best])
