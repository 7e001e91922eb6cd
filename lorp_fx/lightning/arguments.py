"""`LoRPCallback`'s arguments, checked when it is made (as Lightning's callbacks check theirs in `__init__`):
whatever does not depend on the network fails here, in one line, before any loop runs."""

from __future__ import annotations

import os

import numpy as np

from lorp_fx.compensation.solver import METHODS as COMPENSATION_METHODS
from lorp_fx.core.budget import budget_from_ratio
from lorp_fx.core.errors import BudgetError, ConfigError, SelectorError
from lorp_fx.core.plan import GRANULARITIES, check_plan_folder
from lorp_fx.selection.registry import SELECTORS, check_option_values, check_options

STAGES = ("fit", "validate", "test", "predict")


def check_arguments(n_remove, ratio, method, granularity, apply, stage, loss_fn, attribute, plan_path, loss_batches,
                    measure_loss, protected, seed, n_clusters, compensate) -> dict:
    """LoRPError for the first argument that is wrong; the selector options given (protected, seed, n_clusters)."""
    if (n_remove is None) == (ratio is None):
        raise BudgetError("give exactly one budget: n_remove (a number of blocks) or ratio (a fraction)")
    if n_remove is not None and (isinstance(n_remove, bool) or not isinstance(n_remove, int) or n_remove < 1):
        raise BudgetError(f"n_remove must be a whole number of blocks, at least 1, got {n_remove!r}")
    if ratio is not None:
        budget_from_ratio(10, ratio)  # validates the range
    if not isinstance(method, str) or method not in SELECTORS:
        raise SelectorError(f"unknown selection method {method!r}; choose one of {', '.join(SELECTORS)}")
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)} (the Lightning stage that calibrates), not {stage!r}")
    if isinstance(loss_batches, bool) or not isinstance(loss_batches, int) or loss_batches < 1:
        raise ConfigError(f"loss_batches must be a whole number of calls, at least 1, got {loss_batches!r}")
    given = {k: v for k, v in {"protected": protected, "seed": seed, "n_clusters": n_clusters}.items() if v is not None}
    check_options(method, given, require=False)
    check_option_values(given)
    if not (isinstance(apply, (bool, np.bool_)) or (isinstance(apply, int) and apply in (0, 1))):
        raise ConfigError(f"apply must be True or False (hand the LightningModule the pruned network or not), got {apply!r}")
    if not isinstance(attribute, str) or not attribute.isidentifier():
        raise ConfigError(f"attribute must be the name of the LightningModule attribute that holds the network, "
                          f"such as 'model', got {attribute!r}")
    if plan_path is not None and (not isinstance(plan_path, (str, os.PathLike)) or not os.fspath(plan_path)
                                  or isinstance(os.fspath(plan_path), bytes)):
        raise ConfigError(f"plan_path must be a file path (str or pathlib.Path) for the plan's JSON, or None, got {plan_path!r}")
    if plan_path is not None:
        check_plan_folder(plan_path)  # before calibrating, not when the plan is written at the end
    if not isinstance(measure_loss, bool):
        raise ConfigError(f"measure_loss must be True or False, got {measure_loss!r}")
    if not measure_loss and "loss_fn" in SELECTORS[method].required:
        raise ConfigError(f"method {method!r} cannot choose without a calibration loss; keep measure_loss=True "
                          "or choose a method that can (lorp, or a statistics method)")
    if not measure_loss and loss_fn is not None:
        raise ConfigError("loss_fn was given with measure_loss=False; drop one of them")
    if loss_fn is not None and not (SELECTORS[method].judges_by_loss and measure_loss):
        raise ConfigError(
            f"method {method!r} chooses from the statistics alone and takes no loss_fn; "
            "drop loss_fn, or choose a loss-judged method (lorp, sleb)"
        )
    if compensate is not None and compensate not in ("auto", *COMPENSATION_METHODS):
        raise ConfigError(f"compensate must be None, 'auto' or one of {', '.join(COMPENSATION_METHODS)}, "
                          f"got {compensate!r}")
    if compensate is not None and loss_fn is not None:
        raise ConfigError("compensate judges by the next-token loss, so it takes no loss_fn; drop one of them")
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn must be a function (output, inputs) -> loss, not {type(loss_fn).__name__}")
    return given
