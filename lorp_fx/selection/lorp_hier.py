"""A LoRP variant: hierarchical clustering of 1 - S and Ward-increment removal.

Described elsewhere for the same method (REFERENCE.md); offered as a variant, not as
the published selector (that is `lorp-paper`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from lorp_fx.core.errors import BudgetError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.core.stats import LayerStatistics
from lorp_fx.selection.common import (
    Protected,
    block_names,
    cluster_members,
    clustered_plan,
    eligible_for,
    renumber_by_depth,
)
from lorp_fx.selection.registry import register
from lorp_fx.selection.rls import paper_k, relative_layer_similarity, resolve_k


def hierarchical_clusters(S: np.ndarray, n_clusters: int) -> list[int]:
    """Average-linkage agglomerative clustering of the distance 1 - S, cut into `n_clusters`.

    Average linkage needs no Euclidean embedding (1 - S is not one), unlike Ward.
    """
    S = np.asarray(S, dtype=np.float64)
    n = S.shape[0]
    if n_clusters <= 1 or n < 2:
        return [0] * n
    distance = np.clip(1.0 - (S + S.T) / 2.0, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average")
    return renumber_by_depth(fcluster(tree, t=n_clusters, criterion="maxclust"))


def ward_increment(S: np.ndarray, members: Sequence[int], layer: int) -> float:
    """Representation variance that cluster `members` gains when `layer` is removed.

    Estimator: with x_i the unit-normalised input of layer i at one token, the
    cluster's variance is V(C) = sum over i in C of ||x_i - mean_C||^2, averaged over
    tokens. Removing l leaves its representation to the other members; what that adds
    is Ward's merge cost, V(C) - V(C minus l) = (m-1)/m * ||x_l - mean_O||^2 with O the
    m - 1 others: how far l lies from what its cluster-mates already carry. In cosines,
    ||x_l - mean_O||^2 = 1 - 2 mean_{j in O} S_lj + mean_{i,j in O} S_ij, linear in the
    per-token cosines, so the token average is exact from S alone. A layer with no
    cluster-mates left adds an unbounded amount (inf).
    """
    others = [m for m in members if m != layer]
    m = len(others) + 1
    if not others:
        return math.inf
    gap = 1.0 - 2.0 * float(S[layer, others].mean()) + float(S[np.ix_(others, others)].mean())
    return (m - 1) / m * max(gap, 0.0)


def proportional_quotas(sizes: Sequence[int], n: int) -> list[int]:
    """Split n removals over groups in proportion to their sizes (largest remainder).

    Group g gets floor(n * size_g / total), and the removals left go to the largest
    remainders (ties: larger group, then earlier group). No group gets more than its size.
    """
    total = sum(sizes)
    if not 0 <= n <= total:
        raise BudgetError(f"cannot split {n} removals over groups holding {total} candidates")
    exact = [n * size / total if total else 0.0 for size in sizes]
    quotas = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda g: (-(exact[g] - quotas[g]), -sizes[g], g))
    for g in by_remainder[: n - sum(quotas)]:
        quotas[g] += 1
    return quotas


def lorp_hier_order(
    S: np.ndarray, n_remove: int, n_clusters: int | None = None, eligible: Sequence[int] | None = None
) -> tuple[list[int], list[float], list[int]]:
    """Hierarchical clusters, a proportional budget, then smallest Ward increment first.

    Budget allocation: each cluster gets a share of the removals proportional to its
    number of eligible layers (`proportional_quotas`), so small clusters may get none.
    Increments are not compared across clusters: a tight cluster has small increments
    everywhere and a global greedy would empty it first, which is how the published
    per-cluster quota fails on SmolLM2's last cluster (REFERENCE.md). Inside a cluster,
    the eligible layer with the smallest `ward_increment` against the cluster's
    remaining members (removed layers leave it, protected ones stay) is removed, and the
    increments are recomputed, until the cluster's quota is met; clusters go in depth
    order. Returns (layers in removal order, their increments, cluster labels).
    """
    S = np.asarray(S, dtype=np.float64)
    n = S.shape[0]
    k = resolve_k(n, n_clusters, relative_layer_similarity(S))
    labels = hierarchical_clusters(S, k)
    allowed = set(range(1, n - 1) if eligible is None else eligible)  # the paper keeps the first and last
    clusters = cluster_members(labels)
    candidates = [[m for m in members if m in allowed] for members in clusters]
    quotas = proportional_quotas([len(c) for c in candidates], n_remove)
    removed: list[int] = []
    increments: list[float] = []
    for members, quota in zip(clusters, quotas):
        remaining = list(members)
        for _ in range(quota):
            scored = [(ward_increment(S, remaining, m), m) for m in remaining if m in allowed]
            value, layer = min(scored)
            remaining.remove(layer)
            removed.append(layer)
            increments.append(value)
    return removed, increments, labels


@register("lorp-hier", summary="LoRP variant: hierarchical clusters of 1 - S, least Ward increment first")
def lorp_hier(stats: LayerStatistics, n_remove: int, *, protected: Protected = None,
              n_clusters: int | None = None) -> PruningPlan:
    """Variant of LoRP: hierarchical clustering of 1 - S, Ward-increment removal.

    Not the published method (that is `lorp-paper`); the rule is `lorp_hier_order`.
    K follows the published RLS policy unless `n_clusters` forces it. Each block's
    score is its `ward_increment` in its whole cluster before any removal, lower =
    more redundant (a block alone in its cluster is scored against all blocks).
    """
    eligible = eligible_for(stats, n_remove, protected)
    S, rls, k = paper_k(stats, n_clusters)
    order, increments, labels = lorp_hier_order(S, n_remove, k, eligible)
    everyone = list(range(stats.n_blocks))
    scores = {}
    for b in everyone:
        mates = [i for i in everyone if labels[i] == labels[b]]
        scores[b] = ward_increment(S, mates if len(mates) > 1 else everyone, b)
    details = {
        "linkage": "average",
        "removal_order": block_names(stats, order),
        "increments": [float(v) if math.isfinite(v) else None for v in increments],
    }
    return clustered_plan(stats, order, "lorp-hier", scores, rls=rls, k=k, n_clusters=n_clusters, labels=labels,
                          details=details)
