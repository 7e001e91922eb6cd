"""The selector registry: each method is a pure function whose keyword-only parameters are its options.

    @register("shortgpt", summary="lowest Block Influence", source="arXiv 2403.03853")
    def shortgpt(stats, n_remove, *, protected=None) -> PruningPlan: ...

`select` runs a method by name with a budget, refuses options the method does not
declare (listing those it does), and completes every plan with the paper's cheap
diagnostics (RLS and clusters) and a score for every eligible block.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lorp_fx.core.budget import resolve_budget
from lorp_fx.core.errors import ConfigError, SelectorError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.core.stats import LayerStatistics
from lorp_fx.selection.rls import paper_clusters


@dataclass(frozen=True)
class Method:
    """A registered selector: its function, the options it takes, and whether it needs a loss function."""

    name: str
    run: Callable[..., PruningPlan]
    options: tuple[str, ...]
    required: tuple[str, ...]
    summary: str
    source: str

    @property
    def judges_by_loss(self) -> bool:
        """True for methods that measure candidates with a calibration-loss function."""
        return "loss_fn" in self.options

    def __call__(self, stats: LayerStatistics, n_remove: int, **options) -> PruningPlan:
        return self.run(stats, n_remove, **options)


SELECTORS: dict[str, Method] = {}
# Measured against every published selector in benchmarks/results/quality-smollm2.md
# and docs/default-selector.md.
DEFAULT_SELECTOR = "lorp"


def register(name: str, *, summary: str, source: str = ""):
    """Register a selector under `name`; its keyword-only parameters are its options."""

    def decorate(function: Callable[..., PruningPlan]) -> Callable[..., PruningPlan]:
        keyword = [p for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]
        SELECTORS[name] = Method(
            name=name,
            run=function,
            options=tuple(p.name for p in keyword),
            required=tuple(p.name for p in keyword if p.default is p.empty),
            summary=summary,
            source=source,
        )
        return function

    return decorate


def method(name: str) -> Method:
    if name not in SELECTORS:
        raise SelectorError(f"unknown selection method {name!r}; choose one of {', '.join(SELECTORS)}")
    return SELECTORS[name]


def check_options(name: str, options, *, require: bool = True) -> None:
    """SelectorError for an option the method does not take, or (with `require`) a required one that is missing."""
    found = method(name)
    unknown = sorted(set(options) - set(found.options))
    if unknown:
        valid = ", ".join(found.options) or "none"
        raise SelectorError(f"method {name!r} takes no option {', '.join(map(repr, unknown))}; its options are: {valid}")
    missing = [o for o in found.required if options.get(o) is None] if require else []
    if missing:
        raise SelectorError(
            f"method {name!r} needs {', '.join(missing)}"
            + (": a callable that takes the list of removed block names and returns the calibration loss of the "
               "model without them" if "loss_fn" in missing else "")
        )


def options_for(name: str, **candidates) -> dict:
    """The subset of `candidates` that method `name` takes and that are set (not None)."""
    accepted = set(method(name).options)
    return {k: v for k, v in candidates.items() if k in accepted and v is not None}


def select(
    stats: LayerStatistics,
    n_remove: int | None = None,
    *,
    ratio: float | None = None,
    method: str = DEFAULT_SELECTOR,
    **options,
) -> PruningPlan:
    """Run the selector `method` with a budget of `n_remove` blocks or a `ratio` of the blocks.

    `options` are the method's own (see `SELECTORS[method].options`); an option it
    does not take is a SelectorError.
    """
    check_options(method, options)
    k = resolve_budget(stats.n_blocks, n_remove, ratio)
    plan = SELECTORS[method](stats, k, **options)
    return complete(plan, stats)


def complete(plan: PruningPlan, stats: LayerStatistics) -> PruningPlan:
    """The plan with the paper's diagnostics, RLS and clusters (cheap from S), where its method set none."""
    if plan.rls is not None and plan.clusters is not None:
        return plan
    rls, clusters = paper_clusters(stats)
    return replace(plan, rls=plan.rls if plan.rls is not None else rls, clusters=plan.clusters if plan.clusters is not None else clusters)


def check_option_values(options: dict[str, Any]) -> None:
    """The selector options whose values alone can be wrong; names and ranges that depend on the network
    (protected blocks, n_clusters above the block count) are checked on the first batch."""
    if "seed" in options and not _whole(options["seed"], 0):
        raise ConfigError(f"seed must be a whole number >= 0 (numpy's random generator seed), got {options['seed']!r}")
    if "n_clusters" in options and not _whole(options["n_clusters"], 1):
        raise SelectorError(f"n_clusters={options['n_clusters']!r} must be a whole number of clusters, at least 1; "
                            "leave it unset to choose K from RLS")
    if "width" in options and not _whole(options["width"], 2):
        raise SelectorError(f"width={options['width']!r} must be a whole number of candidates measured per step, "
                            "at least 2 (lorp's guarantee compares two or more)")
    if options.get("max_evaluations") is not None and not _whole(options["max_evaluations"], 1):
        raise SelectorError(f"max_evaluations={options['max_evaluations']!r} must be a whole number >= 1, or None")
    if "protected" in options:
        protected = options["protected"]
        items = [protected] if isinstance(protected, (str, int, np.integer)) else protected
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) or _whole(i, None) for i in items):
            raise ConfigError(f"protected must be a block name or index, or a list of them (such as "
                              f"['model.layers.0', -1]), got {protected!r}")


def _whole(value: Any, minimum: int | None) -> bool:
    """A whole number (not a bool) of at least `minimum` (None: any)."""
    return (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
            and (minimum is None or value >= minimum))
