"""lorp-fx: training-free depth pruning of residual networks on torch.fx graphs.

The pipeline, one module a step: `trace` -> `find_blocks` -> statistics
(`LoRPCallback`) -> selection (`select`) -> `prune` (graph rewrite).
"""

from .blocks import ResidualBlock, find_blocks
from .callback import LoRPCallback
from .compensate import CompensationError, compensate
from .errors import (
    BudgetError,
    CalibrationError,
    FixedArgumentError,
    InputMismatchError,
    LoRPError,
    NoResidualBlocksError,
    NotRemovableError,
    SelectorError,
    TraceError,
    UnknownBlockError,
)
from .plan import PruningPlan
from .rewrite import PruneBlocks, prune
from .selectors import SELECTORS, select
from .observe import ResidualObserver
from .stats import LayerStatistics, SimilarityAccumulator
from .trace import trace

__all__ = [
    "BudgetError",
    "CalibrationError",
    "CompensationError",
    "FixedArgumentError",
    "InputMismatchError",
    "LayerStatistics",
    "LoRPCallback",
    "LoRPError",
    "NoResidualBlocksError",
    "NotRemovableError",
    "PruneBlocks",
    "PruningPlan",
    "ResidualBlock",
    "ResidualObserver",
    "SELECTORS",
    "SelectorError",
    "SimilarityAccumulator",
    "TraceError",
    "UnknownBlockError",
    "compensate",
    "find_blocks",
    "prune",
    "select",
    "trace",
]
