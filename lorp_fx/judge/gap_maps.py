"""The compensated judge's maps: one per gap, fitted from cached states, and losses measured with given maps.

`GapMaps` is the half of `CandidateLoss` (`judge/candidates.py`) that compensates: each gap
(maximal run of removed units) is closed by `lorp_fx.compensation`'s map, applied on the
branch output of the unit before the gap (`GraphRunner`), which is what folding it into
that unit's output projection does (a per-channel map, `form="diagonal"`, where the branch
is normalised before the add: Gemma's sandwich norms, folded into that norm's weight). The
map is fitted from cached dense states (`gap_fit`): it depends on its gap only, so it is
fitted once and shared by every candidate with that gap. `final_fits(names)` returns the
maps fitted on every window as `GapFit`s for `compensation.apply_compensation`, so the
final model needs no further pass; `sequential_fits(names)` fits gap after gap from the
pruned model's view (as `compensate(..., sequential=True)`); `compensation_report` and
`loss_with` measure losses with given maps.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import torch

from lorp_fx.compensation.fit import GapFit
from lorp_fx.compensation.gap_fit import fit_gap
from lorp_fx.compensation.solver import CV_FOLDS
from lorp_fx.judge.head import head_loss
from lorp_fx.judge.source_guard import compensation_report


class GapMaps:
    """The compensation half of `CandidateLoss`: its maps, and losses with maps (a mixin: the states, windows
    and runner are `CandidateLoss`'s)."""

    def _foldable(self, first: int) -> bool:
        """A gap starting at unit `first` can take a map: a compensable unit precedes it on its stream
        (a full map does not pass a norm between the branch and its add)."""
        units, before = self.runner.units, first - 1
        if first == 0 or units[before].stream != units[first].stream or not self.runner.compensable(before):
            return False
        return self.form == "diagonal" or not self.runner.branch_normalised(before)

    def _fit(self, first: int, last: int) -> GapFit | None:
        """The map of gap first..last from the dense view (memoised); None where no map applies."""
        key = (first, last)
        if key not in self._fits:
            self._check_not_released()
            states, batches = self._fit_states + self._guard_states, self.fit_batches + self.guard_batches
            self._fits[key] = self._solve(first, last, states, states, batches, [*self.fit_indices, *self.guard_indices],
                                          self._fit_keys)
        return self._fits[key]

    def _solve(self, first: int, last: int, view: list[dict], dense: list[dict], batches: list[dict],
               indices: list[int], parts: tuple[dict, list], removed: frozenset[int] = frozenset(),
               maps: dict | None = None, reject: bool | None = None) -> GapFit | None:
        """Fit gap first..last: the fold unit's input and output from `view` (the model without
        `removed`, with `maps`), the target from `dense`, on this process's windows `indices` (global),
        whose cross-validation parts `parts` gives (`layout.part_keys`: with several sources each one's
        held-out error is checked, `gap_fit.fit_gap`); `reject` defaults to the judge's."""
        if not self._foldable(first):
            return None
        units = self.runner.units
        # one window's states at a time (a generator): `fit_gap` sums them as they come
        views = ((self._state(s, b, first - 1, removed, maps), self._state(s, b, first, removed, maps),
                  self._state(d, b, last + 1)) for s, d, b in zip(view, dense, batches))
        masks = [b.get("attention_mask") for b in batches]
        names = [units[u].name for u in range(first, last + 1)]
        reject = self.reject if reject is None else reject
        window_keys, keys = parts
        return fit_gap(views, masks, self.compensation, self.ridge, names, units[first - 1].name, reject, self.form,
                       [window_keys[i] for i in indices], keys, self.held_only, self.reduce, self.state_shape)

    def fits(self, removed: Iterable[str]) -> list[GapFit]:
        """The dense-view maps the compensated loss of `removed` uses (fitted on the fit windows)."""
        units = self.runner.units_of(removed)
        return [f for f in (self._fit(a, b) for a, b in self.gaps(units)) if f is not None]

    def final_fits(self, removed: Iterable[str], *, sequential: bool = False,
                   keep: Iterable[str] | None = None) -> list[GapFit]:
        """Maps for the model to ship, fitted on *every* calibration window (as `compensate` does:
        more tokens than the fit windows alone), from cached states: dense-view maps cost no
        pass, sequential ones about one pass without the head. They close exactly the gaps that
        the measured maps (`fits`, which `compensation_report` judged) close: a gap whose map was
        dropped there stays open, and a kept one is not dropped by the refit's own cross-validation,
        so what ships is what was checked, refitted on more tokens."""
        self._check_not_released()
        if self.fit_on == "all":
            states, batches, indices = self._fit_states, self.fit_batches, self.fit_indices
        else:
            states, batches = self._cache[self._dense_key] + self._fit_states, self.loss_batches + self.fit_batches
            indices = [*self.loss_indices, *self.fit_indices]
        states, batches, indices = states + self._guard_states, batches + self.guard_batches, indices + self.guard_indices
        checked = {gap for gap in self.gaps(self.runner.units_of(removed)) if self._fit(*gap) is not None}
        if keep is not None:  # the gaps the guard across sources kept (`compensation_report`)
            names = set(keep)
            checked = {gap for gap in checked if self.runner.units[gap[0] - 1].name in names}
        return self._fit_all(removed, states, batches, sequential, indices, self._every_keys, only=checked)

    @torch.no_grad()
    def sequential_fits(self, removed: Iterable[str]) -> list[GapFit]:
        """Maps fitted gap after gap from the pruned model's view (earlier gaps compensated) on the
        fit windows, as `compensate(..., sequential=True)`."""
        return self._fit_all(removed, self._fit_states, self.fit_batches, True, self.fit_indices,
                             self.layout.part_keys(self.layout.fit, CV_FOLDS))

    @torch.no_grad()
    def _fit_all(self, removed, dense: list[dict], batches: list[dict], sequential: bool, indices: list[int],
                 parts: tuple[dict, list], only: set | None = None) -> list[GapFit]:
        """The maps of `removed`'s gaps; with `only`, of those gaps alone, none of them rejected."""
        self._check_not_released()
        units = self.runner.units_of(removed)
        fits, maps, view, resume_at = [], {}, dense, None
        for first, last in self.gaps(units):
            if only is not None and (first, last) not in only:
                continue
            if sequential and maps:  # the pruned model's states up to this gap, earlier maps folded in
                start = self._checkpoint(resume_at)
                view = [
                    {**{u: s[u] for u in s if u < (start or 0)},
                     **self._kept(self.runner.run(batch, units, maps, resume=self._resume(s, start),
                                                  record=True, stop=first)[1])}
                    for batch, s in zip(batches, view)
                ]
            fit = self._solve(first, last, view, dense, batches, indices, parts, units if sequential else frozenset(),
                              maps if sequential else None, reject=False if only is not None else None)
            if fit is not None:
                fits.append(fit)
                maps[first - 1] = fit.transform.float()
                resume_at = first - 1
        return fits

    def compensation_report(self, removed: Iterable[str]) -> dict:
        """Whether compensating `removed` is not harmful, on every calibration source
        (`judge.source_guard.compensation_report`)."""
        units = self.runner.units_of(removed)
        if units not in self._reports:  # the selector and the pipeline both ask for the chosen set's
            self._reports[units] = compensation_report(self, removed)
        return copy.deepcopy(self._reports[units])

    def _guard_losses(self, units: frozenset[int], maps: dict) -> list[float]:
        if not units and not maps:  # the dense model's: from the caching pass
            return list(self._guard_dense)
        return self._losses_on(self.guard_batches, self._guard_states, units, maps)

    def _losses_with(self, units: frozenset[int], maps: dict) -> list[float]:
        """Each loss window's loss, then each guard window's, without `units`, with `maps` (unit -> T)."""
        clock = time.perf_counter()
        losses = self._losses_on(self.loss_batches, self._cache[self._dense_key], units, maps) + self._guard_losses(units, maps)
        self.seconds += time.perf_counter() - clock
        self.measurements += 1
        return losses

    @torch.no_grad()
    def _losses_on(self, batches: list[dict], dense: list[dict], units: frozenset[int], maps: dict) -> list[float]:
        """Each window's loss, resumed from its dense states at the checkpoint before the first change."""
        self._check_not_released()
        start, final = self._checkpoint(min([*units, *maps])) if units or maps else None, len(self.runner.units)
        return [head_loss(self.runner, batch, self.runner.run(batch, units, maps, resume=self._resume(states, start),
                                                              record=True, stop=final)[1][final])
                for batch, states in zip(batches, dense)]

    def loss_with(self, removed: Iterable[str], fits: list[GapFit]) -> float:
        """The calibration loss without `removed`, with the given maps (e.g. `sequential_fits`)."""
        self._check_not_released()
        units = self.runner.units_of(removed)
        index = {unit.name: u for u, unit in enumerate(self.runner.units)}
        maps = {index[f.fold_into]: f.transform.float() for f in fits}
        clock = time.perf_counter()
        losses = self._losses_on(self.loss_batches, self._cache[self._dense_key], units, maps)
        self.seconds += time.perf_counter() - clock
        self.measurements += 1
        return self.mean(losses)
