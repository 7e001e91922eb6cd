"""Compensation's public calls: fit one map per gap, fold the maps into the pruned model.

`compensate` is the whole step (fit, remove the layers, fold); `fit_compensation`
and `apply_compensation` are its two halves for callers that already hold the
pruned model. See docs/compensation.md for the method and its measured effect.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from lorp_fx.arch.anatomy import (
    Gap,
    Stack,
    check_compensable,
    find_gaps,
    removed_units,
    stacks_of,
)
from lorp_fx.arch.families import family_of
from lorp_fx.arch.surgery import Surgery, remove_layers
from lorp_fx.calibration.batches import batch_rows, prepare_batches, stream_mask
from lorp_fx.calibration.capture import Capture
from lorp_fx.compensation.fold import Projection, fold, projections, verify_folds
from lorp_fx.compensation.solver import (
    FoldedStatistics,
    check_method,
    fold_count,
)
from lorp_fx.core.errors import CompensationError
from lorp_fx.core.model import float64_device, model_device
from lorp_fx.core.plan import PruningPlan

DEFAULT_COMPENSATION = "cosine"
DEFAULT_RIDGE = "auto"


@dataclass
class GapFit:
    """What compensation did for one gap (names are the dense model's)."""

    removed: list[str]
    fold_into: str
    projections: list[str]
    transform: torch.Tensor = field(repr=False)
    tokens: int
    error_before: float  # relative calibration error of the uncompensated pruned state at the gap
    error_after: float  # the same with the map folded in (in-sample)
    ridge: float | None = None  # the ridge used (chosen by cross-validation with ridge="auto")
    cv_errors: dict = field(default_factory=dict)  # ridge -> cross-validated relative error ("auto")
    form: str = "full"
    # Per calibration source: the held-out gap error with the map over that without (below 1: it helps there).
    held_out: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "removed": list(self.removed),
            "fold_into": self.fold_into,
            "projections": list(self.projections),
            "form": self.form,
            "tokens": int(self.tokens),
            "error_before": float(self.error_before),
            "error_after": float(self.error_after),
            "ridge": None if self.ridge is None else float(self.ridge),
            "cv_errors": {str(k): float(v) for k, v in self.cv_errors.items()},
            "held_out_error_ratio": {str(k): float(v) for k, v in self.held_out.items()},
        }


class Compensated(NamedTuple):
    """The pruned, compensated model, one fit per gap, and the surgery's old -> new layer names."""

    model: nn.Module
    fits: list[GapFit]
    names: dict[str, str]


def default_form(model: nn.Module) -> str:
    """"diagonal" where a branch output is normalised before the add (only a per-channel map folds there), else "full"."""
    return "diagonal" if any(u.branch_norm is not None for s in stacks_of(model) for u in s.units) else "full"


class _Setup:
    """What every fit starts from: checked arguments, units, gaps, batches, projections (and the fold probe)."""

    def __init__(self, model, plan, batches, method, form, ridge, verify, reject_unhelpful=False, sources=None,
                 held_only=frozenset()):
        if isinstance(model, torch.fx.GraphModule):
            raise CompensationError(
                "compensation folds maps into the weights of the eager model: pass the transformers model the graph was "
                "traced from, then lorp_fx.trace the compensated model if you need its graph"
            )
        self.form = form or default_form(model)
        check_method(method, self.form)
        self.model, self.method, self.ridge, self.reject_unhelpful = model, method, ridge, reject_unhelpful
        self.sources = None if sources is None else list(sources)  # a calibration-source label per sequence
        self.held_only = frozenset(held_only)  # sources measured by the held-out check, never fitted on
        self.folds = fold_count(ridge)
        self.names = list(plan.remove if isinstance(plan, PruningPlan) else plan)
        self.family = check_compensable(model)
        self.stacks = stacks_of(model)
        self.gaps = find_gaps(self.stacks, removed_units(self.stacks, self.names))
        self.batches = prepare_batches(model, batches)
        self.d = branch_width(model)
        self.device = float64_device(model_device(model))  # where the fits' float64 sums are kept
        self.projections = [projections(model, self.family, gap.fold_unit, self.d, self.form) for gap in self.gaps]
        if verify:
            verify_folds(model, self.family, self.stacks, self.gaps, self.projections, self.batches[0], self.d, self.form)

    def capture_points(self) -> dict:
        """{point key: (module, kind)}: where each gap's input, fold-unit output and target are read."""
        points = {}
        for gap in self.gaps:
            stack = self.stacks[gap.stack]
            for index in (gap.first - 1, gap.first, gap.last + 1):
                key, module, kind = stack.point(index)
                points[key] = (module, kind)
        return points

    def statistics(self) -> FoldedStatistics:
        return FoldedStatistics(self.d, self.method, self.folds, self.device, self.form, self.sources, self.held_only)

    def fit(self, gap: Gap, stats: FoldedStatistics, unit_names: list[str]) -> GapFit | None:
        """The gap's map; None with `reject_unhelpful` where no ridge beats no map on the held-out sequences
        of every calibration source (`solver.choose_ridge`)."""
        total, transform, ridge, cv_errors = stats.solve(self.ridge)
        ratios = {str(source): r[ridge] for source, r in stats.held_out_ratios.items()} if cv_errors else {}
        if self.reject_unhelpful and cv_errors and not all(ratio < 1.0 for ratio in ratios.values()):
            return None
        return GapFit(
            removed=list(gap.removed), fold_into=gap.fold_unit.full_name, projections=unit_names,
            transform=transform.cpu(), tokens=total.tokens, error_before=total.relative_error(None),
            error_after=total.relative_error(transform), ridge=ridge, cv_errors=cv_errors, form=self.form,
            held_out=ratios if self.sources is not None else {},
        )


def fit_compensation(model: nn.Module, plan: PruningPlan | list[str], calibration_batches: Iterable,
                     method: str = DEFAULT_COMPENSATION, **options) -> list[GapFit]:
    """Fit one map per gap from the dense `model` in one calibration pass; nothing is folded.

    `Compensator(model, plan, calibration_batches, method, **options).fits`: the arguments are those of
    `compensate` (`form`, `ridge`, `verify`, `progress`) but for `sequential` and `inplace`, which fold.
    Returns one `GapFit` per gap in depth order; `apply_compensation` folds them into the pruned model.
    """
    folding = sorted({"sequential", "inplace"} & set(options))
    if folding:
        raise CompensationError(f"fit_compensation fits without folding, so it takes no {', '.join(folding)}; "
                                "use compensate (or Compensator(..., sequential=True).apply) to fold")
    return Compensator(model, plan, calibration_batches, method, **options).fits


def apply_compensation(pruned: Surgery, plan: PruningPlan | list[str], fits: list[GapFit]) -> nn.Module:
    """Fold fitted maps into `pruned` (the `Surgery` that removed `plan`), in place; returns the model."""
    if fits:
        offset = family_of(pruned.model).norm_weight_offset
        for fit, found in zip(fits, _fold_targets(pruned, fits)):
            fold(found, fit.transform, offset)
    return pruned.model


@contextmanager
def folded_on_trial(pruned: Surgery, fits: list[GapFit]):
    """`fits` folded into `pruned` while the block runs (to measure them); the weights they touch are
    restored bit for bit afterwards."""
    touched = [p.param for found in _fold_targets(pruned, fits) for p in found]
    saved = [param.detach().clone() for param in touched]
    try:
        yield apply_compensation(pruned, [], fits)
    finally:
        with torch.no_grad():
            for param, original in zip(touched, saved):
                param.copy_(original)


def _fold_targets(pruned: Surgery, fits: list[GapFit]) -> list[list[Projection]]:
    """Per fit, the pruned model's parameters its map folds into (`fold.projections`)."""
    model = pruned.model
    family, units, d = family_of(model), {u.full_name: u for s in stacks_of(model) for u in s.units}, branch_width(model)
    found = []
    for fit in fits:
        target = pruned.rename(fit.fold_into)
        if target not in units:
            raise CompensationError(f"the pruned model has no unit {target} to fold the map of {fit.fold_into} into")
        found.append(projections(model, family, units[target], d, fit.form))
    return found


class Compensator:
    """Compensation in two phases around the surgery, so the dense model can be pruned in place.

    `Compensator(model, plan, ...)` reads the dense model: one pass fits every gap
    (`sequential=False`), or it keeps the dense states after each gap
    (`sequential=True`). `apply(surgery)` then folds the maps into the pruned model
    (fitting each gap from the pruned model's view first, when sequential).
    `reject_unhelpful` leaves a gap open where no ridge's map beats none on held-out
    sequences (what `--compensate auto` does), instead of folding the best of them anyway;
    with `sources` (a calibration-source label per sequence) on the held-out sequences of
    every source; the sequences of `held_only` sources are measured, never fitted on.
    """

    def __init__(self, model, plan, calibration_batches, method=DEFAULT_COMPENSATION, *, form=None, ridge=DEFAULT_RIDGE,
                 sequential=False, verify=True, progress=False, reject_unhelpful=False, sources=None, held_only=()):
        self.setup = _Setup(model, plan, calibration_batches, method, form, ridge, verify, reject_unhelpful, sources,
                            held_only)
        self.sequential, self.progress = sequential, progress
        if sequential:
            self.targets, self.fits = _dense_targets(self.setup, progress), []
        else:
            self.targets, self.fits = [], _fit_one_pass(self.setup, progress)

    @property
    def names(self) -> list[str]:
        return self.setup.names

    def keep_gaps_of(self, checked: list[GapFit]) -> None:
        """Keep only the maps of the gaps `checked` (another fit of the same plan) closes: the gaps a
        held-out check judged, so that what is folded is what was checked, refitted on more tokens."""
        closed = {fit.fold_into for fit in checked}
        self.fits = [fit for fit in self.fits if fit.fold_into in closed]

    def apply(self, pruned: Surgery) -> list[GapFit]:
        """Fold the maps into `pruned` (the surgery that removed the plan) in place; the fits, in depth order."""
        if self.sequential:
            self.fits = _fit_sequentially(self.setup, pruned, self.targets, self.progress)
            self.targets = []
        else:
            apply_compensation(pruned, self.setup.names, self.fits)
        return self.fits


def compensate(
    model: nn.Module,
    plan: PruningPlan | list[str],
    calibration_batches: Iterable,
    method: str = DEFAULT_COMPENSATION,
    *,
    form: str | None = None,
    ridge: float | str = DEFAULT_RIDGE,
    sequential: bool = False,
    inplace: bool = False,
    verify: bool = True,
    progress: bool = False,
) -> Compensated:
    """`model` without `plan`'s blocks, each gap closed by a linear map folded into the unit before it.

    * `model`: the dense eager `transformers` model the plan was made for; a copy is
      pruned unless `inplace` (then `model` itself becomes the pruned model).
    * `plan`: a `PruningPlan` or layer and sublayer names, as `remove_layers` takes them.
    * `calibration_batches`: LongTensors of token ids (n, seq), or dicts of model
      inputs (an `attention_mask` drops padding tokens; T5 needs `decoder_input_ids`).
    * `method`: "cosine" (token-normalised least squares, the default) or "lstsq".
    * `form`: "full" (a d x d map) or "diagonal" (per channel); None picks "full", or
      "diagonal" where the family normalises branch outputs before the add (Gemma).
    * `ridge`: shrinkage towards the identity, relative to tr(A)/d; "auto" picks it
      per gap by 4-fold cross-validation over the calibration sequences.
    * `sequential`: fit the gaps in depth order from the pruned model's view (one
      extra pass per gap) instead of from one pass over the dense model.
    * `verify`: first check every fold numerically on a slice of one batch.
    """
    compensator = Compensator(model, plan, calibration_batches, method, form=form, ridge=ridge, sequential=sequential,
                              verify=verify, progress=progress)
    pruned = remove_layers(model, compensator.names, inplace=inplace)
    return Compensated(pruned.model, compensator.apply(pruned), pruned.names)


# --------------------------------------------------------------------------- internals


def _fit_one_pass(setup: _Setup, progress: bool) -> list[GapFit]:
    """Every gap's map from one pass over the dense model (each pass stops after the last gap it needs)."""
    if not setup.gaps:
        return []
    points = setup.capture_points()
    statistics = [setup.statistics() for _ in setup.gaps]
    capture, first_row = Capture(points), 0
    for batch in _progress(setup.batches, progress, "compensation statistics"):
        states = capture.run(setup.model, batch)
        for gap, stats in zip(setup.gaps, statistics):
            stack = setup.stacks[gap.stack]
            _update(stats, stack, gap.first - 1, stack, gap, states, states, batch, first_row)
        first_row += batch_rows(batch)
    fits = [setup.fit(gap, stats, [p.name for p in projs]) for gap, stats, projs in zip(setup.gaps, statistics, setup.projections)]
    return [fit for fit in fits if fit is not None]


def branch_width(model: nn.Module) -> int:
    """The residual stream's width d (a full map is d x d), from the model's config."""
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise CompensationError(f"cannot tell the residual width of {type(model).__name__}: its config has no hidden_size")


def _progress(items, enabled: bool, description: str):
    if not enabled:
        return items

    return tqdm(items, desc=description, unit="batch")


def _update(stats: FoldedStatistics, unit_stack: Stack, unit_index: int, stack: Stack, gap: Gap, unit_states, target_states, batch, first_row: int) -> None:
    x = unit_states[unit_stack.point(unit_index)[0]]
    x_out = unit_states[unit_stack.point(unit_index + 1)[0]]
    y = target_states[stack.point(gap.last + 1)[0]]
    if x.shape != y.shape:
        raise CompensationError(f"internal error: states of shapes {tuple(x.shape)} and {tuple(y.shape)} at one gap")
    stats.update(x, x_out, y, stream_mask(batch, y, decoder="decoder" in stack.path), first_row)


def _dense_targets(setup: _Setup, progress: bool) -> list[dict[str, torch.Tensor]]:
    """The dense states after every gap, per batch: what each sequential fit aims at."""
    points = {}
    for gap in setup.gaps:
        key, module, kind = setup.stacks[gap.stack].point(gap.last + 1)
        points[key] = (module, kind)
    if not points:
        return []
    capture = Capture(points)
    return [dict(capture.run(setup.model, batch)) for batch in _progress(setup.batches, progress, "compensation targets")]


def _fit_sequentially(setup: _Setup, pruned: Surgery, targets, progress: bool) -> list[GapFit]:
    """Fit gaps in depth order, each from the pruned model with the earlier gaps already folded in."""
    model, fits = pruned.model, []
    pruned_stacks = {s.path: s for s in stacks_of(model)}
    for gap, dense_projections in zip(setup.gaps, setup.projections):
        stack = setup.stacks[gap.stack]
        p_stack = pruned_stacks[stack.path]
        target = pruned.rename(gap.fold_unit.full_name)
        p_index = next(k for k, u in enumerate(p_stack.units) if u.full_name == target)
        points = {}
        for index in (p_index, p_index + 1):
            key, module, kind = p_stack.point(index)
            points[key] = (module, kind)
        stats, capture, first_row = setup.statistics(), Capture(points), 0
        for batch, dense in zip(_progress(setup.batches, progress, f"compensation ({gap.fold_unit.full_name})"), targets):
            _update(stats, p_stack, p_index, stack, gap, capture.run(model, batch), dense, batch, first_row)
            first_row += batch_rows(batch)
        projs = projections(model, setup.family, p_stack.units[p_index], setup.d, setup.form)
        fit = setup.fit(gap, stats, [p.name for p in dense_projections])
        if fit is None:  # rejected: this gap stays open
            continue
        fold(projs, fit.transform, setup.family.norm_weight_offset)
        fits.append(fit)
    return fits


def eager_fits(model: torch.nn.Module, fits: list[GapFit]) -> list[GapFit]:
    """`fits` with `projections` filled in: the eager `model`'s parameters each map folds into
    (what `PruneResult.folded_parameters` and the GGUF writer read). CompensationError where
    a unit has nothing to fold into."""
    family = check_compensable(model)
    units = {u.full_name: u for stack in stacks_of(model) for u in stack.units}
    d = branch_width(model)
    named = []
    for fit in fits:
        if fit.fold_into not in units:
            raise CompensationError(f"internal error: the graph's unit {fit.fold_into} is not a unit of the eager model")
        found = projections(model, family, units[fit.fold_into], d, fit.form)
        named.append(replace(fit, projections=[p.name for p in found]))
    return named
