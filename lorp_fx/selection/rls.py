"""The Representation Locality Score and the paper's clusters: cheap diagnostics from S alone.

Every plan carries them (`registry.complete`), whichever method chose it, and the
published selector builds on them (`lorp_paper.py`).
"""

from __future__ import annotations

import math

import numpy as np

from lorp_fx.core.errors import BudgetError, SelectorError
from lorp_fx.core.stats import LayerStatistics
from lorp_fx.selection.common import (
    cluster_names,
)
from lorp_fx.selection.spectral import spectral_clustering

RLS_THRESHOLDS = (1.0, 0.7)  # RLS >= 1.0 -> K = 2; 0.7 <= RLS < 1.0 -> K = 3; below -> K = 4


def relative_layer_similarity(S: np.ndarray) -> float:
    """RLS = -log2(mean of S_ij over i < j).

    Higher RLS means similarity decays faster with depth. A non-positive mean
    (anti-correlated layers, never seen in real models) gives +inf: as local as it gets.
    """
    S = np.asarray(S, dtype=np.float64)
    if S.shape[0] < 2:
        raise BudgetError("RLS needs at least two layers; the statistics hold fewer")
    off = float(S[np.triu_indices(S.shape[0], 1)].mean())
    return math.inf if off <= 0.0 else -math.log2(off)


def clusters_for_rls(rls: float) -> int:
    """The published K policy: 2 when RLS >= 1.0, 3 when 0.7 <= RLS < 1.0, 4 below 0.7."""
    high, low = RLS_THRESHOLDS
    if rls >= high:
        return 2
    if rls >= low:
        return 3
    return 4


def resolve_k(n_blocks: int, n_clusters: int | None, rls: float) -> int:
    """K from the RLS policy (at most one cluster per block), or the forced `n_clusters`, checked."""
    if n_clusters is None:
        return min(clusters_for_rls(rls), n_blocks)
    whole = isinstance(n_clusters, (int, np.integer)) and not isinstance(n_clusters, bool)
    if not whole or not 1 <= n_clusters <= n_blocks:
        raise SelectorError(
            f"n_clusters={n_clusters!r} must be a whole number between 1 and the number of blocks "
            f"({n_blocks}); leave it unset to choose K from RLS"
        )
    return int(n_clusters)


def paper_clusters(stats: LayerStatistics) -> tuple[float, list[list[str]]]:
    """The paper's diagnostics from S alone: RLS and the spectral clusters for the K it implies."""
    S = stats.input_similarity()
    rls = relative_layer_similarity(S)
    labels = spectral_clustering(S, resolve_k(stats.n_blocks, None, rls))
    return rls, cluster_names(stats, labels)


def paper_k(stats: LayerStatistics, n_clusters: int | None) -> tuple[np.ndarray, float, int]:
    """(S of the blocks' inputs, its RLS, K): the published policy's K, or the forced `n_clusters`, checked."""
    S = stats.input_similarity()
    rls = relative_layer_similarity(S)
    return S, rls, resolve_k(stats.n_blocks, n_clusters, rls)
