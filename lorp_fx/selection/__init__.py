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

Importing this package registers every method, in the order `SELECTORS` lists them:
the default first, then LoRP as published, its variant, and the baselines.

The numerical cores (`lorp_paper_order`, `lorp_hier_order`, `spectral_clustering`,
`uniform_positions`, ...) take numpy arrays and block indices, so they are testable
without statistics. Definitions and reference numbers: ../shared/REFERENCE.md.
"""

# Registration, in the order SELECTORS lists them (the order of these imports, which sorting must not change).
# isort: off
from lorp_fx.selection import lorp  # noqa: F401
from lorp_fx.selection import lorp_paper  # noqa: F401
from lorp_fx.selection import lorp_hier  # noqa: F401
from lorp_fx.selection import baselines  # noqa: F401
# isort: on
