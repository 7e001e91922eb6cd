"""Selectors: hand-made similarity matrices with known answers, properties, and the
authors' SmolLM2 numbers (../shared/data/reference/smollm2-lorp-paper.json)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import require_shared_data
from strategies import random_walk_stats, selection_scenarios, stats_over_inputs

from lorp_fx.core.budget import budget_from_ratio
from lorp_fx.core.errors import BudgetError, SelectorError, UnknownBlockError
from lorp_fx.core.stats import LayerStatistics, SimilarityAccumulator
from lorp_fx.selection.baselines import uniform_positions
from lorp_fx.selection.lorp_hier import (
    hierarchical_clusters,
    lorp_hier_order,
    proportional_quotas,
    ward_increment,
)
from lorp_fx.selection.lorp_paper import (
    cluster_redundancy,
    lorp_paper_order,
    lorp_paper_stages,
)
from lorp_fx.selection.registry import SELECTORS, options_for, select
from lorp_fx.selection.rls import (
    clusters_for_rls,
    paper_clusters,
    relative_layer_similarity,
)
from lorp_fx.selection.spectral import spectral_clustering

CONTIGUOUS = {"uidl", "streamline"}


# --------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reference() -> dict:
    """The authors' intermediate results on SmolLM2-135M (REFERENCE.md)."""
    return json.loads(require_shared_data("reference", "smollm2-lorp-paper.json").read_text())


def layer_indices(names: list[str]) -> list[int]:
    return [int(name.split(".")[1]) for name in names]


def block_diagonal(sizes: list[int], within: list[float], between: float) -> np.ndarray:
    n = sum(sizes)
    S = np.full((n, n), between)
    start = 0
    for size, value in zip(sizes, within):
        S[start : start + size, start : start + size] = value
        start += size
    np.fill_diagonal(S, 1.0)
    return S


# --------------------------------------------------------------------------------------
# The authors' SmolLM2 numbers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4])
def test_spectral_clustering_reproduces_the_authors_labels(smollm2_reference, k):
    S = np.array(smollm2_reference["similarity"])
    assert spectral_clustering(S, k) == smollm2_reference[f"labels_k{k}"]


@pytest.mark.parametrize("n", [3, 6, 9])
def test_lorp_paper_reproduces_the_authors_selection(smollm2_reference, n):
    S = np.array(smollm2_reference["similarity"])
    assert sorted(lorp_paper_order(S, n)) == smollm2_reference[f"removed_k{n}"]

    plan = select(stats_over_inputs(S), n, method="lorp-paper")
    assert layer_indices(plan.remove) == smollm2_reference[f"removed_k{n}"]
    assert plan.rls == pytest.approx(smollm2_reference["rls"], abs=1e-12)
    assert plan.details["K"] == 4 and plan.details["K_forced"] is False
    assert plan.details["labels"] == smollm2_reference["labels_k4"]
    clusters = [layer_indices(c) for c in plan.clusters]
    assert clusters == [[0], list(range(1, 11)), list(range(11, 25)), list(range(25, 30))]
    # Stage 1 covers the three clusters that have eligible layers ({0} has none)
    assert sorted(s for s in plan.details["stage"].values()) == [1, 1, 1] + [2] * (n - 3)


def test_lorp_paper_forced_k_on_smollm2(smollm2_reference):
    S = np.array(smollm2_reference["similarity"])
    plan = select(stats_over_inputs(S), 3, method="lorp-paper", n_clusters=3)
    assert plan.details["K"] == 3 and plan.details["K_forced"] is True
    assert plan.details["labels"] == smollm2_reference["labels_k3"]


@pytest.mark.parametrize(
    "method, expected",
    [
        # REFERENCE.md's table: the authors' code (ShortGPT, Streamline) or the published rule on our statistics
        ("shortgpt", {3: [13, 14, 25], 6: [12, 13, 14, 17, 25, 26], 9: [3, 12, 13, 14, 15, 16, 17, 25, 26]}),
        ("streamline", {3: [13, 14, 15], 6: list(range(13, 19)), 9: list(range(10, 19))}),
        ("uidl", {3: [13, 14, 15], 6: list(range(13, 19)), 9: list(range(10, 19))}),
        ("uniform", {9: [1, 4, 8, 11, 14, 18, 21, 25, 28]}),
        ("last-n", {9: list(range(20, 29))}),
    ],
)
def test_baselines_match_the_reference_table(smollm2_reference, method, expected):
    # The 30 x 30 matrix holds the inputs of layers 0..29: blocks 0..28 are fully
    # described. Layer 29 is protected in the real model, so protecting only layer 0
    # here leaves the same candidates (1..28).
    stats = LayerStatistics.from_similarity(np.array(smollm2_reference["similarity"]))
    for n, layers in expected.items():
        plan = select(stats, n, method=method, protected=["layers.0"])
        assert layer_indices(plan.remove) == layers, (method, n)


# --------------------------------------------------------------------------------------
# LoRP (published): RLS and the K policy at their edges
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rls, k",
    [
        (5.0, 2), (1.0, 2), (np.nextafter(1.0, 0.0), 3), (0.85, 3),
        (0.7, 3), (np.nextafter(0.7, 0.0), 4), (0.0, 4), (-1.0, 4),
    ],
)
def test_k_policy_edges(rls, k):
    assert clusters_for_rls(rls) == k


def test_rls_definition():
    S = block_diagonal([3, 3], [0.5, 0.5], 0.5)  # every off-diagonal entry 0.5
    assert relative_layer_similarity(S) == 1.0
    S = np.full((4, 4), 0.25)
    np.fill_diagonal(S, 1.0)
    assert relative_layer_similarity(S) == 2.0
    S = np.full((4, 4), -0.1)
    np.fill_diagonal(S, 1.0)
    assert relative_layer_similarity(S) == math.inf


@pytest.mark.parametrize("off, k", [(0.5, 2), (0.6, 3), (2**-0.7, 3), (0.62, 4), (0.9, 4)])
def test_lorp_paper_k_follows_rls(off, k):
    n = 10
    S = np.full((n, n), off)
    np.fill_diagonal(S, 1.0)
    plan = select(stats_over_inputs(S), 2, method="lorp-paper")
    assert plan.rls == pytest.approx(-math.log2(off))
    assert plan.details["K"] == k


def test_forced_k_is_checked():
    stats = random_walk_stats(8, 0)
    with pytest.raises(SelectorError, match="n_clusters"):
        select(stats, 2, method="lorp-paper", n_clusters=0)
    with pytest.raises(SelectorError, match="n_clusters"):
        select(stats, 2, method="lorp-hier", n_clusters=9)
    assert select(stats, 2, method="lorp-paper", n_clusters=5).details["K"] == 5


# --------------------------------------------------------------------------------------
# LoRP (published) and the hierarchical variant on block-diagonal S
# --------------------------------------------------------------------------------------


BLOCKS = block_diagonal([4, 5, 3], within=[0.8, 0.95, 0.9], between=0.1)
BLOCK_LABELS = [0] * 4 + [1] * 5 + [2] * 3


def test_both_clusterings_find_the_blocks():
    assert spectral_clustering(BLOCKS, 3) == BLOCK_LABELS
    assert hierarchical_clusters(BLOCKS, 3) == BLOCK_LABELS
    assert spectral_clustering(BLOCKS, 1) == [0] * 12


def test_lorp_paper_stages_on_blocks():
    # Stage 1: one per cluster, the most redundant (all tie: the shallowest eligible).
    order, stages = lorp_paper_stages(BLOCKS, 3, BLOCK_LABELS)
    assert order == [1, 4, 9] and stages == [1, 1, 1]
    # Stage 2: the densest cluster (0.95) gives the next layer.
    order, stages = lorp_paper_stages(BLOCKS, 5, BLOCK_LABELS)
    assert order == [1, 4, 9, 5, 6] and stages == [1, 1, 1, 2, 2]
    # A budget below K stops Stage 1 in cluster order.
    assert lorp_paper_stages(BLOCKS, 2, BLOCK_LABELS)[0] == [1, 4]


def test_lorp_paper_redundancy_is_fixed_and_within_cluster():
    S = BLOCKS.copy()
    S[2, 1] = S[1, 2] = 0.85  # layers 1 and 2 more alike than the rest of cluster 0
    r = cluster_redundancy(S, BLOCK_LABELS)
    assert r[1] == pytest.approx((0.85 + 0.8 + 0.8) / 3)
    assert r[5] == pytest.approx(0.95)
    order, _ = lorp_paper_stages(S, 4, BLOCK_LABELS)
    assert order[0] == 1  # tie between 1 and 2 broken towards depth


def test_lorp_paper_selector_on_blocks():
    plan = select(stats_over_inputs(BLOCKS), 4, method="lorp-paper", n_clusters=3)
    assert layer_indices(plan.remove) == [1, 4, 5, 9]
    assert [layer_indices(c) for c in plan.clusters] == [[0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11]]
    assert plan.details["stage"] == {"layers.1": 1, "layers.4": 1, "layers.9": 1, "layers.5": 2}
    assert plan.details["removal_order"] == ["layers.1", "layers.4", "layers.9", "layers.5"]
    assert set(plan.scores) == set(plan.statistics.blocks)


def test_proportional_quotas():
    assert proportional_quotas([3, 5, 2], 3) == [1, 1, 1]  # exact 0.9, 1.5, 0.6
    assert proportional_quotas([0, 23, 4, 1], 9) == [0, 8, 1, 0]  # exact 0, 7.39, 1.29, 0.32
    assert proportional_quotas([2, 2], 1) == [1, 0]  # tie: the earlier group
    assert proportional_quotas([1, 3], 1) == [0, 1]
    assert proportional_quotas([3, 5, 2], 10) == [3, 5, 2]
    with pytest.raises(BudgetError):
        proportional_quotas([1, 1], 3)


def test_ward_increment_is_the_change_in_within_cluster_sum_of_squares():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    S = x @ x.T

    def sse(rows):
        pts = x[rows]
        return float(((pts - pts.mean(axis=0)) ** 2).sum())

    members = [0, 2, 3, 5]
    for layer in members:
        rest = [m for m in members if m != layer]
        assert ward_increment(S, members, layer) == pytest.approx(sse(members) - sse(rest))
    assert ward_increment(S, [4], 4) == math.inf


def test_lorp_hier_on_blocks():
    S = BLOCKS.copy()
    S[6, 4:9] = S[4:9, 6] = 0.97  # layer 6 is the centre of cluster 1
    S[6, 6] = 1.0
    S[2, 1] = S[1, 2] = S[2, 3] = S[3, 2] = 0.9  # layer 2 is the centre of cluster 0
    order, increments, labels = lorp_hier_order(S, 3, n_clusters=3)
    assert labels == BLOCK_LABELS
    assert order == [2, 6, 9]  # quotas [1, 1, 1]; cluster 2's eligible layers tie: shallower
    assert all(v >= 0 for v in increments)
    plan = select(stats_over_inputs(S), 3, method="lorp-hier", n_clusters=3)
    assert layer_indices(plan.remove) == [2, 6, 9]
    assert plan.details["linkage"] == "average"
    assert min(plan.scores, key=plan.scores.get) == "layers.6"


def test_lorp_hier_does_not_empty_a_tight_small_cluster(smollm2_reference):
    # SmolLM2's last cluster (25..29) is tight but matters (REFERENCE.md): a budget in
    # proportion to cluster size leaves it mostly alone.
    S = np.array(smollm2_reference["similarity"])
    for n in (3, 6, 9):
        order, _, labels = lorp_hier_order(S, n)
        assert sum(1 for layer in order if layer >= 25) <= max(1, n // 6)


# --------------------------------------------------------------------------------------
# Baselines on hand-made S
# --------------------------------------------------------------------------------------


def disagreement_stats() -> LayerStatistics:
    """9 points / 8 blocks. Blocks 2 and 5 barely change the stream (lowest BI); the run
    3..4 has the most similar ends (S[3, 5] high) though neither block is lowest BI."""
    idx = np.arange(9)
    S = 0.9 ** np.abs(idx[:, None] - idx[None, :])
    for i, j, v in [(2, 3, 0.99), (5, 6, 0.99), (3, 5, 0.97)]:
        S[i, j] = S[j, i] = v
    return LayerStatistics.from_similarity(S)


def test_shortgpt_and_uidl_disagree():
    stats = disagreement_stats()
    assert layer_indices(select(stats, 2, method="shortgpt").remove) == [2, 5]
    assert layer_indices(select(stats, 2, method="uidl").remove) == [3, 4]
    assert layer_indices(select(stats, 2, method="streamline").remove) == [3, 4]
    plan = select(stats, 2, method="shortgpt")
    assert plan.scores["layers.2"] == pytest.approx(0.01)


def test_uidl_reads_last_token_angles_and_streamline_token_means():
    stats = disagreement_stats()
    # the last tokens say the run 1..2 is the most redundant one
    last = np.full_like(stats.last_token_angular, 0.3)
    last[1, 3] = last[3, 1] = 0.01
    stats = replace(stats, last_token_angular=last)
    assert layer_indices(select(stats, 2, method="uidl").remove) == [1, 2]
    assert layer_indices(select(stats, 2, method="streamline").remove) == [3, 4]
    plan = select(stats, 2, method="uidl")
    assert plan.scores["layers.1"] == pytest.approx(0.01)
    assert plan.details["run_start"] == "layers.1"


def test_uidl_always_keeps_the_last_block():
    last = np.full_like(disagreement_stats().last_token_angular, 0.3)
    last[6, 8] = last[8, 6] = 0.0  # run 6..7 looks free
    stats = replace(disagreement_stats(), last_token_angular=last)
    plan = select(stats, 2, method="uidl", protected=[])
    assert "layers.7" not in plan.remove
    assert "layers.7" in select(stats, 1, method="last-n", protected=[]).remove


def two_stream_stats() -> LayerStatistics:
    """Encoder blocks e0..e2 on points 0..3, decoder blocks d0..d2 on points 4..7."""
    S = np.full((8, 8), 0.5)
    np.fill_diagonal(S, 1.0)
    S[2, 5] = S[5, 2] = 0.999  # would make e2 + d0 the best run, were they one stream
    S[4, 6] = S[6, 4] = 0.9  # the best run that is really contiguous: d0, d1
    angle = np.arccos(S) / np.pi
    blocks = ["enc.0", "enc.1", "enc.2", "dec.0", "dec.1", "dec.2"]
    return LayerStatistics(
        points=[f"p{i}" for i in range(8)],
        blocks=blocks,
        block_points=[(0, 1), (1, 2), (2, 3), (4, 5), (5, 6), (6, 7)],
        similarity=S,
        angular=angle,
        last_token_angular=angle,
        token_count=1,
        sequence_count=1,
    )


@pytest.mark.parametrize("method", sorted(CONTIGUOUS))
def test_contiguous_runs_stay_on_one_stream(method):
    stats = two_stream_stats()
    S_crossing = stats.similarity[2, 5]
    assert S_crossing > stats.similarity[4, 6]
    assert select(stats, 2, method=method, protected=[]).remove == ["dec.0", "dec.1"]


def test_sublayers_are_blocks_like_any_other():
    # 3 layers as 6 sublayers; the MLPs change the stream a lot, attention barely
    n = 6
    bi = [0.02, 0.3, 0.01, 0.3, 0.03, 0.3]
    S = np.eye(n + 1)
    for i, b in enumerate(bi):
        S[i, i + 1] = S[i + 1, i] = 1 - b
    S[S == 0] = 0.5
    names = [f"layers.{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}" for i in range(n)]
    stats = replace(LayerStatistics.from_similarity(S, blocks=names), block_kinds=["attention", "mlp"] * 3)
    plan = select(stats, 2, method="shortgpt")
    assert plan.granularity == "sublayer"
    assert plan.remove == ["layers.1.attn", "layers.2.attn"]
    assert select(LayerStatistics.from_similarity(S), 2, method="shortgpt").granularity == "layer"


def test_sleb_is_greedy_and_recomputes():
    stats = random_walk_stats(6, 1)
    calls = []
    base = {f"layers.{i}": v for i, v in enumerate([9, 1.0, 1.1, 1.2, 5.0, 9])}

    def loss(removed):
        calls.append(list(removed))
        value = sum(base[b] for b in removed)
        if "layers.1" in removed and "layers.2" in removed:
            value += 10  # removing both neighbours hurts: a greedy that recomputes sees it
        return value

    plan = select(stats, 2, method="sleb", loss_fn=loss)
    assert plan.remove == ["layers.1", "layers.3"]
    assert len(calls) == 4 + 3  # 4 candidates, then 3
    assert all(c == sorted(c, key=lambda b: int(b.split(".")[1])) for c in calls)
    assert plan.scores == {"layers.1": 1.0, "layers.2": 1.1, "layers.3": 1.2, "layers.4": 5.0}
    assert [s["removed"] for s in plan.details["steps"]] == ["layers.1", "layers.3"]
    assert plan.details["steps"][1]["candidates"]["layers.2"] == pytest.approx(12.1)


def test_sleb_needs_a_loss():
    with pytest.raises(SelectorError, match="loss_fn"):
        select(random_walk_stats(6, 1), 2, method="sleb")


def test_sleb_nan_loss_is_never_preferred():
    stats = random_walk_stats(5, 1)
    plan = select(stats, 1, method="sleb", loss_fn=lambda removed: math.nan if "layers.1" in removed else 3.0)
    assert plan.remove == ["layers.2"]


def test_last_n_uniform_random_rules():
    stats = random_walk_stats(10, 0)
    stats = replace(stats, removable=[i != 7 for i in range(10)])
    assert layer_indices(select(stats, 3, method="last-n").remove) == [5, 6, 8]
    eligible = [1, 2, 3, 4, 5, 6, 8]
    expected = [eligible[p] for p in uniform_positions(7, 3)]
    assert layer_indices(select(stats, 3, method="uniform").remove) == expected
    assert uniform_positions(7, 3) == [0, 3, 6]
    assert uniform_positions(28, 9) == [0, 3, 7, 10, 13, 17, 20, 24, 27]
    assert uniform_positions(5, 1) == [2]
    assert uniform_positions(4, 4) == [0, 1, 2, 3]
    a = select(stats, 3, method="random", seed=7)
    assert a.remove == select(stats, 3, method="random", seed=7).remove
    assert set(a.remove) <= set(select(stats, 5, method="random", seed=7).remove)
    assert any(select(stats, 3, method="random", seed=s).remove != a.remove for s in range(8, 20))


# --------------------------------------------------------------------------------------
# Budgets, options, dispatch
# --------------------------------------------------------------------------------------


def test_an_option_the_method_does_not_take_is_refused_with_the_valid_ones():
    stats = random_walk_stats(6, 0)
    with pytest.raises(SelectorError, match=r"'shortgpt' takes no option 'n_clusters'; its options are: protected"):
        select(stats, 2, method="shortgpt", n_clusters=3)
    with pytest.raises(SelectorError, match="'random' takes no option 'loss_fn'; its options are: protected, seed"):
        select(stats, 2, method="random", loss_fn=len)
    with pytest.raises(SelectorError, match="'sleb' needs loss_fn"):
        select(stats, 2, method="sleb")
    assert SELECTORS["lorp-paper"].options == ("protected", "n_clusters")
    assert SELECTORS["sleb"].required == ("loss_fn",) and SELECTORS["sleb"].judges_by_loss


@pytest.mark.parametrize("method", sorted(SELECTORS))
def test_every_plan_carries_the_papers_diagnostics_and_scores_every_eligible_block(method):
    stats = random_walk_stats(9, 3)
    plan = select(stats, 3, method=method, **options_for(method, loss_fn=toy_loss(stats)))
    expected_rls, expected_clusters = paper_clusters(stats)
    assert plan.rls is not None and plan.clusters
    assert sorted(b for c in plan.clusters for b in c) == sorted(stats.blocks)
    if method not in ("lorp-paper", "lorp-hier"):
        assert plan.rls == pytest.approx(expected_rls) and plan.clusters == expected_clusters
    eligible = set(stats.blocks[1:-1])
    assert eligible <= set(plan.scores)


def test_budget_errors_name_the_problem():
    stats = random_walk_stats(6, 0)
    with pytest.raises(BudgetError, match="at least 1"):
        select(stats, 0)
    with pytest.raises(BudgetError, match="whole number"):
        select(stats, 1.5)
    with pytest.raises(BudgetError, match="only 3 of 6"):
        select(stats, 4, method="last-n", protected=[0, 1, 5])
    with pytest.raises(BudgetError, match="at least 2 must stay"):
        select(stats, 5, method="last-n", protected=[])
    with pytest.raises(BudgetError, match="exactly one budget"):
        select(stats)
    with pytest.raises(BudgetError, match="exactly one budget"):
        select(stats, 2, ratio=0.3)
    with pytest.raises(BudgetError, match="between 0 and 1"):
        select(stats, ratio=1.2)
    stats = replace(stats, removable=[True, False, True, False, True, True])
    with pytest.raises(BudgetError, match="contiguous"):
        select(stats, 2, method="streamline")


def test_ratio_rounds_to_nearest_and_is_at_least_one():
    assert budget_from_ratio(30, 0.3) == 9
    assert budget_from_ratio(30, 0.25) == 8  # 7.5 rounds up
    assert budget_from_ratio(30, 0.01) == 1
    stats = random_walk_stats(30, 0)
    assert len(select(stats, ratio=0.3, method="uniform").remove) == 9


def test_protected_blocks_by_name_or_index():
    stats = random_walk_stats(6, 0)
    plan = select(stats, 4, method="last-n", protected=["layers.0", -1])
    assert plan.remove == [f"layers.{i}" for i in range(1, 5)]
    assert select(stats, 1, method="last-n", protected=[5, 4]).remove == ["layers.3"]
    assert select(stats, 1, method="last-n", protected="layers.5").remove == ["layers.4"]
    with pytest.raises(UnknownBlockError, match="layers.9"):
        select(stats, 1, protected=["layers.9"])
    with pytest.raises(UnknownBlockError, match="out of range"):
        select(stats, 1, protected=[6])


def test_registry_and_dispatch():
    assert set(SELECTORS) == {
        "lorp", "lorp-paper", "lorp-hier", "shortgpt", "uidl", "streamline", "sleb", "last-n", "uniform", "random"
    }
    with pytest.raises(SelectorError, match="unknown selection method 'lorp-v2'"):
        select(random_walk_stats(6, 0), 1, method="lorp-v2")
    assert select(random_walk_stats(6, 0), 1).method == "lorp"


# --------------------------------------------------------------------------------------
# Graph view
# --------------------------------------------------------------------------------------


def toy_loss(stats: LayerStatistics):
    bi = dict(zip(stats.blocks, stats.block_influence()))

    def loss(removed: list[str]) -> float:
        return sum(bi[b] for b in removed) + 0.05 * len(removed) ** 2

    return loss


def has_run(stats: LayerStatistics, n: int, allowed: set[int]) -> bool:
    return any(
        all(b in allowed for b in range(s, s + n)) and stats.is_contiguous(s, s + n - 1)
        for s in range(stats.n_blocks - n + 1)
    )


@pytest.mark.parametrize("method", sorted(SELECTORS))
@settings(max_examples=40, deadline=None)
@given(scenario=selection_scenarios(), seed=st.integers(0, 1000))
def test_selector_properties(method, scenario, seed):
    stats, n_remove, protected, eligible = scenario
    options = options_for(method, protected=protected, seed=seed, loss_fn=toy_loss(stats))
    allowed = set(eligible)
    if method == "uidl":
        allowed.discard(stats.n_blocks - 1)
    if method in CONTIGUOUS and not has_run(stats, n_remove, allowed):
        with pytest.raises(BudgetError):
            select(stats, n_remove, method=method, **options)
        return

    plan = select(stats, n_remove, method=method, **options)
    index = {b: i for i, b in enumerate(stats.blocks)}
    chosen = [index[b] for b in plan.remove]
    assert len(plan.remove) == n_remove  # exact budget
    assert len(set(plan.remove)) == n_remove  # no duplicates
    assert set(chosen) <= allowed  # neither protected nor non-removable
    assert chosen == sorted(chosen)  # depth order
    assert plan.method == method and plan.statistics is stats
    assert set(plan.scores) <= set(stats.blocks) and plan.scores
    json.dumps(plan.to_dict())  # the plan is serialisable
    again = select(stats, n_remove, method=method, **options)
    assert again.remove == plan.remove and again.details == plan.details  # deterministic
    if method in CONTIGUOUS:
        assert stats.is_contiguous(chosen[0], chosen[-1]) and chosen[-1] - chosen[0] == n_remove - 1
    if method in {"lorp-paper", "lorp-hier"}:
        assert sorted(b for c in plan.clusters for b in c) == sorted(stats.blocks)
        assert plan.rls is not None


@pytest.mark.parametrize("method", sorted(SELECTORS))
def test_selection_does_not_depend_on_batch_order(method):
    """Statistics accumulated from the same batches in another order select the same blocks."""
    torch.manual_seed(0)
    n_points, n_blocks = 9, 8
    drift = torch.randn(n_points, 1, 1, 16).cumsum(0)
    batches = [drift + 0.7 * torch.randn(n_points, 2, 5, 16) for _ in range(4)]
    names = [f"layers.{i}" for i in range(n_blocks)]
    points = [f"p{i}" for i in range(n_points)]
    block_points = [(i, i + 1) for i in range(n_blocks)]
    plans = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        acc = SimilarityAccumulator(n_points)
        for i in order:
            acc.update(batches[i])
        stats = acc.statistics(points, names, block_points)
        options = options_for(method, loss_fn=toy_loss(stats))
        plans.append(select(stats, 3, method=method, **options))
    assert plans[0].remove == plans[1].remove
