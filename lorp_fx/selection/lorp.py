"""`lorp`, the default selector: a guarded greedy on the calibration loss.

Objective
---------
Choose the set R of exactly `n_remove` eligible blocks (removable, not protected) that
minimises L(R), the caller's `loss_fn(names of R)`: the calibration loss of the model
without R, or of the *compensated* model without R when the caller measures that
(`lorp_fx.judge.candidates.CandidateLoss(..., compensation="cosine")`). A NaN or infinite
loss is that candidate's loss (+inf), never an error.

Guarantees (whatever the loss function; tests/test_selector_lorp.py proves them with
Hypothesis over adversarial losses)
--------------------------------------------------------------------------------
1. The result is the best *measured* set of n blocks, and the sets the statistics
   propose for free are always measured: ShortGPT's (lowest Block Influence) and the
   best contiguous runs (UIDL's and LLM-Streamline's rules). So L(result) is at most
   the loss of each of them.
2. No step commits to a removal without comparing at least two measured candidates
   (when two remain), the first and the last steps included.
3. When measurements contradict the estimates, the step measures more candidates:
   it keeps measuring, in the order of the estimates, every candidate whose
   *optimistic* estimate could still beat the best increment measured at this step.

Search
------
A greedy, one block per step, from the dense model (its loss L(()) is measured once; a
`CandidateLoss` has it for free). Candidates are ranked by an estimate of their
increment L(R + {b}) - L(R):

* the *context model* of the statistics: removed blocks form runs of consecutive
  blocks; a run a..b costs c(a, b) = (D(in_a, out_b) + sum_l D(in_l, out_l)) / 2 with
  D = 1 - S (what the pruned model skips, and what the blocks do one by one), and
  dJ(b | R) = J(R + {b}) - J(R) with J the sum over runs. It changes only near b's
  neighbours (locality of the residual stream);
* a block measured in an earlier context keeps its measured increment, carried to the
  new context by the ratio of its dJ; a never-measured block is estimated as
  median(measured increment / dJ) x dJ.

Each step measures the `width` best-ranked candidates (default 2; the last step, whose
choice no later step repairs, at least LAST_WIDTH = 4), then widens, one candidate at a
time in the order of the estimates, while the evidence contradicts them (`_widen_reason`):

* inversion: the candidate measured last beat every better-ranked one;
* bound: no candidate keeps the path below a complete set already measured (a free set);
* catastrophe: every candidate measured raises the loss by more than CATASTROPHE (a
  quarter) of the current loss;
* overshoot: the next candidate's optimistic estimate, its estimate minus the largest
  amount by which any measurement at this step came out *below* its estimate, could
  still beat the best increment measured.

Consistent estimates stop the widening at once. `max_evaluations` caps the widening only.
The free sets are measured first; they also calibrate the scale of the estimates.
WIDTH, LAST_WIDTH and CATASTROPHE were chosen on SmolLM2-135M (docs/default-selector.md).

Without a loss
--------------
Without `loss_fn` nothing can be measured, and `lorp` removes the n blocks with the
lowest own cost D(in_b, out_b) (ShortGPT's rule; ties: shallower first).

Scores: each eligible block's increment estimate when the search ended. `details`: the
objective, the loss, every measurement, every step (candidates measured, whether it
widened), the free sets and their losses, and which set won.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from lorp_fx.core.errors import BudgetError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.core.stats import LayerStatistics
from lorp_fx.selection.common import LossFn, Protected, block_names, eligible_for, lowest, make_plan
from lorp_fx.selection.registry import SELECTORS, register

#: the selectors whose sets the statistics propose at no cost (measured as candidates)
FREE_METHODS = ("shortgpt", "uidl", "streamline")
#: candidates measured at every step before any widening
WIDTH = 2
#: candidates measured at the last step, whose choice no later step can repair
LAST_WIDTH = 4
#: a step whose best increment exceeds this fraction of the current loss (0.25 nats on a
#: loss of 1 nat: perplexity x1.28 at a loss of 1, x2.2 at 3.2) keeps looking
CATASTROPHE = 0.25


def runs_of(stats: LayerStatistics, removed: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs (first, last) of consecutive removed blocks on one stream, in depth order."""
    out: list[tuple[int, int]] = []
    for b in sorted(removed):
        if out and out[-1][1] == b - 1 and stats.is_contiguous(b - 1, b):
            out[-1] = (out[-1][0], b)
        else:
            out.append((b, b))
    return out


def run_cost(stats: LayerStatistics) -> Callable[[int, int], float]:
    """c(a, b): the context model's cost of removing the run of blocks a..b (see module doc)."""
    entry = [p[0] for p in stats.block_points]
    exit_ = [p[1] for p in stats.block_points]
    D = 1.0 - stats.similarity
    own = np.array([D[i, j] for i, j in stats.block_points])
    prefix = np.concatenate([[0.0], np.cumsum(own)])
    return lambda a, b: 0.5 * float(D[entry[a], exit_[b]] + prefix[b + 1] - prefix[a])


def run_surrogate(stats: LayerStatistics, removed: Sequence[int], cost=None) -> float:
    """J(R): the sum of the run costs of the removed set."""
    cost = cost or run_cost(stats)
    return sum(cost(a, b) for a, b in runs_of(stats, removed))


class _Measurements:
    """L over sorted index tuples: memoised, NaN/inf as +inf, in measurement order, with a cap."""

    def __init__(self, loss: Callable[[tuple[int, ...]], float], cap: int | None):
        self.loss, self.cap = loss, cap
        self.values: dict[tuple[int, ...], float] = {}

    def __call__(self, removed) -> float:
        key = tuple(sorted(removed))
        if key not in self.values:
            try:
                value = float(self.loss(key))
            except ArithmeticError:  # a loss that overflows is that candidate's loss
                value = math.inf
            self.values[key] = value if math.isfinite(value) else math.inf
        return self.values[key]

    def known(self, removed) -> bool:
        return tuple(sorted(removed)) in self.values

    @property
    def exhausted(self) -> bool:
        return self.cap is not None and len(self.values) >= self.cap


def free_sets(stats: LayerStatistics, n_remove: int, protected) -> dict[str, tuple[int, ...]]:
    """The sets the statistics propose at no cost: ShortGPT's and the best contiguous runs."""
    index = {name: i for i, name in enumerate(stats.blocks)}
    found: dict[str, tuple[int, ...]] = {}
    for method in FREE_METHODS:  # looked up at run time: the baselines register after `lorp`
        try:
            plan = SELECTORS[method](stats, n_remove, protected=protected)
        except BudgetError:  # no contiguous run of that length: nothing to propose
            continue
        found[method] = tuple(sorted(index[name] for name in plan.remove))
    return found


def guarded_greedy(
    stats: LayerStatistics,
    eligible: Sequence[int],
    n_remove: int,
    L: _Measurements,
    width: int = WIDTH,
) -> tuple[tuple[int, ...], dict[int, float], list[dict]]:
    """The greedy of the module doc on block indices; returns (removed, estimates, steps)."""
    cost = run_cost(stats)
    R: tuple[int, ...] = ()
    base = L(())
    carried: dict[int, tuple[float, float]] = {}  # block -> (measured increment, dJ in its context)
    ratios = _free_ratios(stats, L, cost, base)
    estimates: dict[int, float] = {}
    steps = []
    for step in range(n_remove):
        at_least = width if step < n_remove - 1 else max(width, LAST_WIDTH)  # the last choice is final
        j0 = run_surrogate(stats, R, cost)
        dj = {b: run_surrogate(stats, R + (b,), cost) - j0 for b in eligible if b not in R}
        sigma = float(np.median(ratios)) if ratios else 1.0
        for b, d in dj.items():
            if b in carried:
                increment, old = carried[b]
                estimates[b] = increment * d / old if old > 0 and d > 0 else increment
            else:
                estimates[b] = sigma * d
        order = sorted(dj, key=lambda b: (estimates[b], b))
        increments: dict[int, float] = {}
        reasons: list[str] = []
        bound = min([v for key, v in L.values.items() if len(key) == n_remove], default=math.inf)
        overshoots: list[float] = []  # estimate - measured increment, at this step
        for position, b in enumerate(order):
            if position >= at_least:
                reason = _widen_reason(b, order[:position], increments, estimates, overshoots, base, bound)
                if reason is None or (L.exhausted and not L.known(R + (b,))):
                    break
                reasons.append(reason)
            difference = L(R + (b,)) - base
            increments[b] = math.inf if math.isnan(difference) else difference  # inf - inf: no information
            if math.isfinite(increments[b]):
                overshoots.append(estimates[b] - increments[b])
                if dj[b] > 0:
                    ratios.append(max(increments[b], 0.0) / dj[b])
            carried[b] = (increments[b], dj[b])
            estimates[b] = increments[b]
        chosen = min(increments, key=lambda b: (increments[b], b))
        steps.append({"removed": chosen, "loss": L(R + (chosen,)), "widened": reasons,
                      "measured": {b: L(R + (b,)) for b in increments}})
        R = tuple(sorted(R + (chosen,)))
        base = L(R)
        carried.pop(chosen, None)
        for b in list(carried):  # a neighbour of the removed block lives in a new context
            if abs(b - chosen) == 1:
                carried.pop(b)
    return R, estimates, steps


def _widen_reason(b, measured_order, increments, estimates, overshoots, base, bound) -> str | None:
    """Why candidate b must be measured too, or None: the evidence at this step contradicts
    the estimates, so the ranking cannot be trusted to have put the best first."""
    best = min(increments.values())
    last = increments[measured_order[-1]]
    if last < min(increments[c] for c in measured_order[:-1]):
        return "inversion: the last candidate measured beat every better-ranked one"
    if base + best > bound:
        return "no candidate keeps the path below a complete set already measured"
    if base > 0 and not best <= CATASTROPHE * base:
        return "catastrophe: every candidate measured raises the loss by more than a quarter"
    if estimates[b] - max([0.0, *overshoots]) < best:
        return "estimates overshoot: this candidate could still beat the best measured"
    return None


def _free_ratios(stats, L: _Measurements, cost, base: float) -> list[float]:
    """Ratios measured loss increment / J of the sets measured before the greedy (the free sets)."""
    ratios = []
    for removed, value in L.values.items():
        j = run_surrogate(stats, removed, cost)
        if removed and math.isfinite(value) and j > 0:
            ratios.append(max(value - base, 0.0) / j)
    return ratios


@register("lorp", summary="guarded greedy on the calibration loss, never worse than the sets the statistics propose")
def lorp(stats: LayerStatistics, n_remove: int, *, protected: Protected = None,
         loss_fn: LossFn | None = None, width: int = WIDTH, max_evaluations: int | None = None) -> PruningPlan:
    """Default selector: the guarded greedy of the module doc on `loss_fn`; without it,
    the blocks with the lowest own cost 1 - cos(input, output).

    `width` (>= 2) is the number of candidates every step measures before widening;
    `max_evaluations` caps the measurements spent on widening (the free sets and `width`
    per step are always measured).
    """
    eligible = eligible_for(stats, n_remove, protected)
    bi = stats.block_influence()
    if loss_fn is None:
        chosen = lowest(bi, eligible, n_remove)
        details = {"objective": "statistics: sum of the removed blocks' own cost 1 - cos(in, out)",
                   "removal_order": block_names(stats, chosen)}
        return make_plan(stats, chosen, "lorp", {b: bi[b] for b in eligible}, details=details)
    if isinstance(width, bool) or not isinstance(width, int) or width < 2:
        raise BudgetError(f"lorp compares at least two measured candidates per step: width={width!r} < 2; use width >= 2")
    if max_evaluations is not None and (isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 1):
        raise BudgetError(f"max_evaluations must be a whole number >= 1 or None, got {max_evaluations!r}")

    L = _Measurements(lambda indices: loss_fn(block_names(stats, indices)), max_evaluations)
    L(())
    free = free_sets(stats, n_remove, protected)
    for removed in free.values():
        L(removed)
    greedy, estimates, steps = guarded_greedy(stats, eligible, n_remove, L, width)
    candidates = {"greedy": greedy, **free}
    winner = min(candidates, key=lambda name: (L(candidates[name]), name != "greedy"))
    chosen = candidates[winner]
    details = {
        "objective": "calibration loss of the model without the removed blocks (loss_fn)",
        "loss": L(chosen),
        "dense_loss": L(()),
        "chosen_from": winner,
        "evaluations": len(L.values),
        "free_sets": {name: {"remove": block_names(stats, s), "loss": L(s)} for name, s in free.items()},
        "greedy": {"remove": block_names(stats, greedy), "loss": L(greedy)},
        "removal_order": [stats.blocks[s["removed"]] for s in steps],
        "steps": [
            {
                "removed": stats.blocks[s["removed"]],
                "loss": s["loss"],
                "widened": s["widened"],  # why each candidate past the first `width` was measured
                "candidates": {stats.blocks[b]: v for b, v in s["measured"].items()},
            }
            for s in steps
        ],
    }
    report = getattr(loss_fn, "compensation_report", None)
    if callable(report):  # a compensated loss: say whether the maps help the chosen set (held out)
        details["compensation"] = report(block_names(stats, chosen))
    return make_plan(stats, chosen, "lorp", estimates, details=details)
