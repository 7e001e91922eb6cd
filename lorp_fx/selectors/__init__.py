"""Selectors: pure functions from `LayerStatistics` and a budget to a `PruningPlan`.

Every selector has the same signature::

    selector(stats, n_remove, *, protected=None, seed=0, loss_fn=None, n_clusters=None)

and ignores the options its method does not use, so a caller can switch methods by
name (`select(stats, 6, method="uidl")`). `protected=None` protects the first and the
last block; `protected` may name blocks or give their indices. Blocks whose
`stats.removable` flag is False are never chosen. `remove` is in depth order.

Selectors work on whatever blocks the statistics hold: whole layers, or attention
and MLP sublayers (the plan then says `granularity="sublayer"`; FinerCut,
arXiv 2405.18218). Contiguous methods keep their run on one residual stream.

| method       | rule                                                     | paper       |
|--------------|----------------------------------------------------------|-------------|
| `lorp-paper` | published LoRP: RLS -> K, spectral clusters, two stages  | 2605.27786  |
| `lorp-hier`  | LoRP variant: hierarchical clusters, Ward increments     | (variant)   |
| `shortgpt`   | lowest Block Influence                                   | 2403.03853  |
| `uidl`       | contiguous run, smallest last-token angular distance     | 2403.17887  |
| `streamline` | contiguous run, highest mean token cosine between ends   | 2403.19135  |
| `sleb`       | greedy on a caller-supplied calibration loss             | 2402.09025  |
| `last-n`     | deepest blocks                                           |             |
| `uniform`    | evenly spaced blocks                                     |             |
| `random`     | seeded random blocks                                     |             |

The numerical cores (`lorp_paper_order`, `lorp_hier_order`, `spectral_clustering`,
`uniform_positions`, ...) take numpy arrays and block indices, so they are testable
without statistics. Definitions and reference numbers: ../shared/REFERENCE.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import BudgetError
from ..plan import PruningPlan
from ..stats import LayerStatistics
from ._common import LossFn, SelectorError, cluster_members, renumber_by_depth
from .baselines import last_n, random_blocks, shortgpt, sleb, streamline, uidl, uniform, uniform_positions
from .graph import similarity_graph, similarity_regions
from .lorp import lorp
from .lorp_hier import hierarchical_clusters, lorp_hier, lorp_hier_order, proportional_quotas, ward_increment
from .lorp_paper import (
    RLS_THRESHOLDS,
    cluster_redundancy,
    clusters_for_rls,
    lorp_paper,
    lorp_paper_order,
    lorp_paper_stages,
    relative_layer_similarity,
)
from .spectral import kmeans, spectral_clustering, spectral_embedding

SELECTORS: dict[str, Callable[..., PruningPlan]] = {
    "lorp": lorp,
    "lorp-paper": lorp_paper,
    "lorp-hier": lorp_hier,
    "shortgpt": shortgpt,
    "uidl": uidl,
    "streamline": streamline,
    "sleb": sleb,
    "last-n": last_n,
    "uniform": uniform,
    "random": random_blocks,
}


# Measured against every published selector in benchmarks/results/quality-smollm2.md
# and docs/default-selector.md.
DEFAULT_METHOD = "lorp"


def budget_from_ratio(n_blocks: int, ratio: float) -> int:
    """round(ratio * n_blocks), halves up, at least 1."""
    if not 0.0 < ratio < 1.0:
        raise BudgetError(f"ratio must be a fraction of the blocks strictly between 0 and 1, got {ratio!r}")
    return max(1, math.floor(ratio * n_blocks + 0.5))


def select(
    stats: LayerStatistics,
    n_remove: int | None = None,
    *,
    ratio: float | None = None,
    method: str = DEFAULT_METHOD,
    **options,
) -> PruningPlan:
    """Run the selector `method` with a budget of `n_remove` blocks or a `ratio` of the blocks.

    `options` (protected, seed, loss_fn, n_clusters) go to the selector.
    """
    if method not in SELECTORS:
        raise SelectorError(f"unknown selection method {method!r}; choose one of {', '.join(SELECTORS)}")
    if (n_remove is None) == (ratio is None):
        raise BudgetError(
            "give exactly one budget: n_remove (a number of blocks) or ratio (a fraction of them)"
        )
    if n_remove is None:
        n_remove = budget_from_ratio(stats.n_blocks, ratio)
    return SELECTORS[method](stats, n_remove, **options)


__all__ = [
    "DEFAULT_METHOD", "LossFn", "RLS_THRESHOLDS", "SELECTORS", "SelectorError", "budget_from_ratio", "cluster_members",
    "cluster_redundancy", "clusters_for_rls", "hierarchical_clusters", "kmeans", "last_n", "lorp_hier",
    "lorp_hier_order", "lorp_paper", "lorp_paper_order", "lorp_paper_stages", "proportional_quotas",
    "random_blocks", "relative_layer_similarity", "renumber_by_depth", "select", "shortgpt",
    "similarity_graph", "similarity_regions", "sleb", "spectral_clustering", "spectral_embedding",
    "streamline", "uidl", "uniform", "uniform_positions", "ward_increment",
]
