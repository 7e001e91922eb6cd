"""Selectors: pure functions from `LayerStatistics` and a budget to a `PruningPlan`.

Each method is registered with the options it takes (`registry.py`); `select` runs
one by name and refuses options it does not take. `protected=None` protects the
first and the last block; `protected` may name blocks or give their indices.
Blocks whose `stats.removable` flag is False are never chosen. `remove` is in
depth order. Selectors work on whatever blocks the statistics hold: whole layers,
or attention and MLP sublayers (the plan then says `granularity="sublayer"`;
FinerCut, arXiv 2405.18218). Contiguous methods keep their run on one stream.

| method       | rule                                                     | paper       |
|--------------|----------------------------------------------------------|-------------|
| `lorp`       | default: guarded greedy on the calibration loss          | this project|
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

# Import order is registration order: the default first, then LoRP as published, its
# variant, and the baselines (it is the order `SELECTORS` lists them in).
from ..budget import budget_from_ratio
from ._common import LossFn, cluster_members, renumber_by_depth
from .lorp import lorp  # isort: skip
from .lorp_paper import (  # isort: skip
    RLS_THRESHOLDS,
    cluster_redundancy,
    clusters_for_rls,
    lorp_paper,
    lorp_paper_order,
    lorp_paper_stages,
    paper_clusters,
    relative_layer_similarity,
    resolve_k,
)
from .lorp_hier import hierarchical_clusters, lorp_hier, lorp_hier_order, proportional_quotas, ward_increment  # isort: skip
from .baselines import last_n, random_blocks, shortgpt, sleb, streamline, uidl, uniform, uniform_positions  # isort: skip
from .registry import DEFAULT_METHOD, SELECTORS, Method, check_options, method, options_for, register, select
from .spectral import kmeans, spectral_clustering, spectral_embedding

__all__ = [
    "DEFAULT_METHOD", "LossFn", "Method", "RLS_THRESHOLDS", "SELECTORS", "budget_from_ratio", "check_options",
    "cluster_members", "cluster_redundancy", "clusters_for_rls", "hierarchical_clusters", "kmeans", "last_n",
    "lorp", "lorp_hier", "lorp_hier_order", "lorp_paper", "lorp_paper_order", "lorp_paper_stages", "method",
    "options_for", "paper_clusters", "proportional_quotas", "random_blocks", "register", "relative_layer_similarity",
    "renumber_by_depth", "resolve_k", "select", "shortgpt", "sleb", "spectral_clustering", "spectral_embedding",
    "streamline", "uidl", "uniform", "uniform_positions", "ward_increment",
]
