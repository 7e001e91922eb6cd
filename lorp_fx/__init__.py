"""lorp-fx: training-free depth pruning of residual networks on torch.fx graphs.

The pipeline, one module a step: `trace` -> `find_blocks` -> statistics
(`collect_statistics`, `LoRPCallback`) -> selection (`select`) -> `prune` (graph
rewrite) or `remove_layers` (checkpoint surgery) -> `compensate` -> save. The whole
of it is one call: `prune_model(model, calibration, PruneConfig(remove=6))`.
"""

from importlib.metadata import PackageNotFoundError, version

from .blocks import ResidualBlock, find_blocks
from .budget import budget_from_ratio, check_budget
from .callback import LoRPCallback
from .compensation import Compensated, GapFit, apply_compensation, compensate, fit_compensation
from .config import PruneConfig
from .errors import (
    BudgetError,
    CalibrationError,
    CallError,
    CompensationError,
    ConfigError,
    DeviceError,
    DistributedError,
    FixedArgumentError,
    GGUFError,
    InputMismatchError,
    LoRPError,
    ModelLoadError,
    NoResidualBlocksError,
    NotRemovableError,
    OutputDirError,
    PlanError,
    SelectorError,
    TraceError,
    UnknownBlockError,
)
from .evaluate import perplexity
from .families import FAMILIES, Family, family_of, layer_stacks
from .candidate_loss import CandidateLoss
from .loss import calibration_loss
from .models import load_model
from .observe import ResidualObserver, collect_statistics
from .output import save_pretrained_atomic
from .pipeline import PruneResult, prune_model
from .plan import PruningPlan
from .rewrite import PruneBlocks, prune
from .selectors import DEFAULT_METHOD, SELECTORS, select
from .stats import LayerStatistics, SimilarityAccumulator
from .surgery import Surgery, count_parameters, remove_layers
from .trace import trace

try:
    __version__ = version("lorp-fx")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BudgetError", "CalibrationError", "CallError", "Compensated", "CompensationError", "ConfigError", "DEFAULT_METHOD", "DeviceError", "DistributedError", "FixedArgumentError", "GGUFError",
    "FAMILIES", "Family", "GapFit", "InputMismatchError", "LayerStatistics", "LoRPCallback", "LoRPError",
    "ModelLoadError", "NoResidualBlocksError", "NotRemovableError", "OutputDirError", "PlanError", "PruneBlocks",
    "PruneConfig", "PruneResult", "PruningPlan", "ResidualBlock", "ResidualObserver", "SELECTORS", "SelectorError",
    "SimilarityAccumulator", "Surgery", "TraceError", "UnknownBlockError", "__version__", "apply_compensation",
    "CandidateLoss", "budget_from_ratio", "calibration_loss", "check_budget", "collect_statistics", "compensate", "count_parameters",
    "family_of", "find_blocks", "fit_compensation", "layer_stacks", "load_model", "perplexity", "prune",
    "prune_model", "remove_layers", "save_pretrained_atomic", "select", "trace",
]
