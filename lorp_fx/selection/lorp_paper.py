"""LoRP, as published (arXiv 2605.27786): RLS, the K policy, spectral clustering, two stages."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lorp_fx.core.errors import BudgetError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.core.stats import LayerStatistics
from lorp_fx.selection.common import (
    Protected,
    block_names,
    cluster_members,
    clustered_plan,
    eligible_for,
)
from lorp_fx.selection.registry import register
from lorp_fx.selection.rls import paper_k, relative_layer_similarity, resolve_k
from lorp_fx.selection.spectral import spectral_clustering


def cluster_redundancy(S: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """r(l) = mean of S[l, m] over the other members m of l's cluster (0 for a singleton)."""
    r = np.zeros(len(labels))
    for members in cluster_members(labels):
        for layer in members:
            others = [m for m in members if m != layer]
            r[layer] = S[layer, others].mean() if others else 0.0
    return r


def _mean_pairwise(S: np.ndarray, members: Sequence[int]) -> float:
    if len(members) < 2:
        return -math.inf  # nothing left to be redundant with
    block = S[np.ix_(members, members)]
    return float(block[np.triu_indices(len(members), 1)].mean())


def lorp_paper_stages(
    S: np.ndarray, n_remove: int, labels: Sequence[int], eligible: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """The published two-stage selection, given cluster labels (renumbered by depth).

    Stage 1 (coverage): in cluster order, remove the most redundant eligible layer
    of each cluster. Stage 2 (residual allocation): until the budget is met, take the
    cluster whose remaining members (removed ones excluded, protected ones included)
    have the largest mean pairwise S and remove its most redundant eligible layer.
    Redundancy r is computed once (`cluster_redundancy`) and never updated. A cluster
    with one member left has no pairwise mean and comes last. Ties go to the shallower
    layer and the lower cluster. Returns (layers in removal order, stage of each).

    Counting protected members among the "remaining" ones, or only eligible ones,
    gives the same choices on the authors' SmolLM2 matrix; we count all members, as
    the paper's wording says.
    """
    S = np.asarray(S, dtype=np.float64)
    allowed = set(range(1, S.shape[0] - 1) if eligible is None else eligible)  # the paper keeps the first and last
    r = cluster_redundancy(S, labels)
    clusters = cluster_members(labels)
    removed: list[int] = []
    stages: list[int] = []

    def most_redundant(candidates: list[int]) -> int:
        return max(candidates, key=lambda layer: (r[layer], -layer))

    for members in clusters:
        if len(removed) == n_remove:
            break
        candidates = [m for m in members if m in allowed]
        if candidates:
            removed.append(most_redundant(candidates))
            stages.append(1)
    while len(removed) < n_remove:
        best = None
        for members in clusters:
            remaining = [m for m in members if m not in removed]
            candidates = [m for m in remaining if m in allowed]
            if candidates:
                density = _mean_pairwise(S, remaining)
                if best is None or density > best[0]:
                    best = (density, candidates)
        if best is None:
            raise BudgetError(f"only {len(removed)} layers are eligible, {n_remove} were asked for")
        removed.append(most_redundant(best[1]))
        stages.append(2)
    return removed, stages


def lorp_paper_order(
    S: np.ndarray, n_remove: int, n_clusters: int | None = None, eligible: Sequence[int] | None = None
) -> list[int]:
    """Layers the published LoRP removes from the N x N input similarity S, in removal order.

    K comes from the RLS policy unless `n_clusters` forces it; `eligible` defaults to
    every layer but the first and the last.
    """
    S = np.asarray(S, dtype=np.float64)
    k = resolve_k(S.shape[0], n_clusters, relative_layer_similarity(S))
    labels = spectral_clustering(S, k)
    return lorp_paper_stages(S, n_remove, labels, eligible)[0]






@register("lorp-paper", summary="LoRP as published: RLS picks K, spectral clusters, coverage then density", source="arXiv 2605.27786")
def lorp_paper(stats: LayerStatistics, n_remove: int, *, protected: Protected = None,
               n_clusters: int | None = None) -> PruningPlan:
    """LoRP as published (arXiv 2605.27786), step for step.

    S = similarity of the blocks' inputs; RLS = -log2(mean_{i<j} S_ij); K = 2 / 3 / 4
    for RLS >= 1.0 / in [0.7, 1.0) / below 0.7 unless `n_clusters` forces it;
    spectral clustering of (S + 1) / 2 (random state 0: the paper fixes it); then Stage 1 coverage and Stage 2 residual allocation
    (`lorp_paper_stages`). Scores are the redundancies r(l).
    """
    eligible = eligible_for(stats, n_remove, protected)
    S, rls, k = paper_k(stats, n_clusters)
    labels = spectral_clustering(S, k)
    order, stages = lorp_paper_stages(S, n_remove, labels, eligible)
    scores = dict(enumerate(cluster_redundancy(S, labels)))
    details = {"removal_order": block_names(stats, order), "stage": {stats.blocks[b]: s for b, s in zip(order, stages)}}
    return clustered_plan(stats, order, "lorp-paper", scores, rls=rls, k=k, n_clusters=n_clusters, labels=labels,
                          details=details)
