"""`PruneConfig`: everything `prune_model` needs to know, with documented defaults.

The same fields are a YAML recipe for the command line (`lorp-fx prune --config
recipe.yaml`, mergekit-style: `recipe.py`), and every written report records the config that
produced it, so any result can be re-run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lorp_fx.compensation.solver import METHODS as COMPENSATION_METHODS
from lorp_fx.core.errors import ConfigError
from lorp_fx.core.fields import check_choice, check_whole, from_mapping
from lorp_fx.core.plan import GRANULARITIES
from lorp_fx.selection.registry import (
    DEFAULT_SELECTOR,
    SELECTORS,
    check_option_values,
    check_options,
)

COMPENSATIONS = ("auto", "none", *COMPENSATION_METHODS)


@dataclass(frozen=True)
class PruneConfig:
    """How to prune. Exactly one of `remove` and `ratio` sets the budget.

    remove            number of blocks (layers, or sublayers) to remove
    ratio             fraction of the blocks to remove instead
    method            selector name (`lorp_fx.SELECTORS`); the default judges candidates by calibration loss
    granularity       "layer", or "sublayer" (attention and MLP separately)
    compensate        "auto" (cosine where the family allows it, else none), "none", "cosine", "lstsq"
    calib_samples     calibration windows (statistics, compensation)
    own_windows       windows the model writes itself, for a causal LM: with no calibration text given, part of the
                      calibration (the rest from the shipped corpus; >= calib_samples: the model's own text alone);
                      with text given, added for the compensation guard alone (0: none)
    seq_len           tokens per calibration window
    loss_windows      how many of those windows a loss-judged selector measures candidates on (SLEB's 8 x 256)
    batch_size        windows per forward pass
    seed              self-calibration sampling and any randomised selector
    selector_options  the method's own options (e.g. {"protected": [0, 1, 29]}); unknown ones are refused
    inplace           prune the given model itself instead of a copy (saves memory; the dense model is gone)
    """

    remove: int | None = None
    ratio: float | None = None
    method: str = DEFAULT_SELECTOR
    granularity: str = "layer"
    compensate: str = "auto"
    calib_samples: int = 32
    own_windows: int = 8
    seq_len: int = 256
    loss_windows: int = 8
    batch_size: int = 4
    seed: int = 0
    selector_options: dict[str, Any] = field(default_factory=dict)
    inplace: bool = False

    def __post_init__(self) -> None:
        if (self.remove is None) == (self.ratio is None):
            raise ConfigError("give exactly one budget: remove (a number of blocks) or ratio (a fraction of them)")
        if self.remove is not None:
            check_whole(self.remove, "remove", 1)
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1):
            raise ConfigError(f"ratio must be a fraction strictly between 0 and 1, got {self.ratio!r}")
        check_choice(self.method, "method", tuple(SELECTORS))
        check_choice(self.granularity, "granularity", GRANULARITIES)
        check_choice(self.compensate, "compensate", COMPENSATIONS)
        check_whole(self.calib_samples, "calib_samples", 1)
        check_whole(self.own_windows, "own_windows", 0)
        check_whole(self.seq_len, "seq_len", 2)
        check_whole(self.loss_windows, "loss_windows", 1)
        check_whole(self.batch_size, "batch_size", 1)
        check_whole(self.seed, "seed", 0)
        if not isinstance(self.selector_options, dict):
            raise ConfigError(f"selector_options must be a mapping of option names to values, got {type(self.selector_options).__name__}")
        if "loss_fn" in self.selector_options:
            raise ConfigError("selector_options cannot set loss_fn: the pipeline measures the calibration loss itself")
        if "seed" in self.selector_options:  # the pipeline passes config.seed, which would silently win
            raise ConfigError("selector_options cannot set seed: set PruneConfig(seed=...) (--seed), which the selector uses")
        if not isinstance(self.inplace, bool):
            raise ConfigError(f"inplace must be True or False, got {self.inplace!r}")
        check_options(self.method, self.selector_options, require=False)
        check_option_values(self.selector_options)  # values wrong on their own: before any model is loaded

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneConfig":
        return from_mapping(cls, data, "prune config")
