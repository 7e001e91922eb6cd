"""lorp-fx: training-free depth pruning of residual networks on torch.fx graphs.

The pipeline, one subpackage a layer (docs/architecture.md): `graph.trace` ->
`graph.blocks` -> statistics (`calibration`, `LoRPCallback`) -> `selection` ->
`graph.rewrite` (`prune`) or `arch.surgery` (`remove_layers`) -> `compensation` -> save.
The whole of it is one call: `prune_model(model, calibration, PruneConfig(remove=6))`.

`import lorp_fx` is cheap: each public name below is imported from its module on first
use (PEP 562), so a process that needs only the command line's checks, or one error
class, does not pay for Lightning, matplotlib or the GGUF code.
"""

from __future__ import annotations

import importlib

from lorp_fx.core.version import __version__  # noqa: F401 - the package version, public

# public name -> the module that defines it
_PUBLIC = {
    **dict.fromkeys(
        ("BudgetError", "CalibrationError", "CallError", "CompensationError", "ConfigError", "DeviceError",
         "DistributedError", "FixedArgumentError", "GGUFError", "InputMismatchError", "LoRPError", "ModelLoadError",
         "NoResidualBlocksError", "NotRemovableError", "OutputDirError", "PlanError", "SelectorError", "TraceError",
         "UnknownBlockError"),
        "lorp_fx.core.errors"),
    "budget_from_ratio": "lorp_fx.core.budget",
    "check_budget": "lorp_fx.core.budget",
    "PruningPlan": "lorp_fx.core.plan",
    "LayerStatistics": "lorp_fx.core.stats",
    "SimilarityAccumulator": "lorp_fx.core.stats",
    "trace": "lorp_fx.graph.trace",
    "ResidualBlock": "lorp_fx.graph.blocks",
    "find_blocks": "lorp_fx.graph.blocks",
    "prune": "lorp_fx.graph.rewrite",
    "PruneBlocks": "lorp_fx.graph.rewrite",
    "FAMILIES": "lorp_fx.arch.families",
    "Family": "lorp_fx.arch.families",
    "family_of": "lorp_fx.arch.families",
    "layer_stacks": "lorp_fx.arch.families",
    "Surgery": "lorp_fx.arch.surgery",
    "count_parameters": "lorp_fx.arch.surgery",
    "remove_layers": "lorp_fx.arch.surgery",
    "load_model": "lorp_fx.io.models",
    "save_pretrained_atomic": "lorp_fx.io.checkpoint",
    "ResidualObserver": "lorp_fx.calibration.graph_observer",
    "collect_statistics": "lorp_fx.calibration.graph_observer",
    "DEFAULT_SELECTOR": "lorp_fx.selection.registry",
    "SELECTORS": "lorp_fx.selection.registry",
    "select": "lorp_fx.selection.registry",
    "Compensated": "lorp_fx.compensation.fit",
    "GapFit": "lorp_fx.compensation.fit",
    "apply_compensation": "lorp_fx.compensation.fit",
    "compensate": "lorp_fx.compensation.fit",
    "fit_compensation": "lorp_fx.compensation.fit",
    "CandidateLoss": "lorp_fx.judge.candidates",
    "calibration_loss": "lorp_fx.judge.loss",
    "perplexity": "lorp_fx.judge.perplexity",
    "PruneConfig": "lorp_fx.pipeline.config",
    "PruneResult": "lorp_fx.pipeline.result",
    "prune_model": "lorp_fx.pipeline.run",
    "HealConfig": "lorp_fx.healing.config",
    "heal": "lorp_fx.healing.run",
    "LoRPCallback": "lorp_fx.lightning.callback",
}

__all__ = sorted([*_PUBLIC, "__version__"])


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'lorp_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
