"""`lorp`, the default selector: locality-aware lazy greedy on the calibration loss.

Objective
---------
Choose the set R of exactly `n_remove` eligible blocks (removable, not protected)
that minimises L(R), the calibration loss of the model without R, as measured by
the caller's `loss_fn(names of R)`. SLEB minimises the same objective greedily by
measuring every candidate at every step (sum over steps of the remaining eligible
blocks: 81 measurements for 3 of 28 blocks, 216 for 9). `lorp` makes the same greedy
choices from about a tenth of those measurements, because it only measures the few
candidates an estimate ranks best, and the estimate knows what changes from one
step to the next: only the neighbourhood of the block just removed (locality).

Estimate of a candidate's increment L(R + {b}) - L(R)
------------------------------------------------------
The statistics give a *context model*: removed blocks form maximal runs of
consecutive blocks on one stream, and a run a..b costs

    c(a, b) = ( D(in_a, out_b) + sum over l in a..b of D(in_l, out_l) ) / 2,   D = 1 - S

the mean of what the pruned model skips (the token-cosine distance between the
states it joins) and of what the blocks do one by one (their Block Influence). With
J(R) = sum of c over the runs of R, dJ(b | R) = J(R + {b}) - J(R) is how much the
statistics say block b adds in the context of R; it changes only when a neighbour of
b was removed (b then extends or joins runs). The estimate is

* measured before in context R': measured increment * dJ(b | R) / dJ(b | R')
  (the measurement, carried to the new context by the statistics), or
* never measured: sigma * dJ(b | R), with sigma the median of measured increment /
  dJ over everything measured so far (no measurement yet: dJ alone ranks).

Search
------
Greedy over k steps. Step t measures L(R + {b}) for the m_t candidates with the
lowest estimates and removes the best of them. Increments are differences of
measured losses, and the dense loss is not measured (a full pass), so the first
step has no reference: it measures only its best-estimated block (the lowest Block
Influence), which becomes the reference; the middle steps measure 2 each (fewer if
the budget is short); the last step, whose choice is final and which has the most
measured context, gets the rest. The default budget B is a tenth of SLEB's
measurements, floor(sum_{i<k} (E - i) / 10) for E eligible blocks, at least k:
8, 15 and 21 measurements for 3, 6 and 9 of 28 blocks. A NaN loss counts as +inf.

Without a loss
--------------
Without `loss_fn` nothing can be measured, and `lorp` removes the n blocks with the
lowest own cost D(in_b, out_b) (ShortGPT's rule; ties: shallower first). Statistics
alone cannot see a block whose removal is catastrophic while its token cosine is
ordinary (SmolLM2-135M's layer 11), and on that model every statistics-only run cost
we tried (endpoint distance, the mean above, an accumulated "area"), optimised
globally by dynamic programming over depth, chose long runs through such blocks and
lost to it; see docs/default-selector.md.

Scores: each eligible block's increment estimate when the search ended (its measured
increment for a removed block whose step had a reference loss); without a loss,
Block Influence. `details` has the objective, the measurements and every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import BudgetError
from ..plan import PruningPlan
from ..stats import LayerStatistics
from ._common import LossFn, block_names, check_budget, eligible_blocks, lowest, make_plan
from .registry import register

#: measurements per greedy step before the last one
PER_STEP = 2


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


def default_evaluations(n_eligible: int, n_remove: int) -> int:
    """A tenth of the loss measurements SLEB makes (at least one per step)."""
    sleb = sum(n_eligible - i for i in range(n_remove))
    return max(n_remove, sleb // 10)


def step_allocation(budget: int, n_remove: int) -> list[int]:
    """Measurements per greedy step: 1 at the first step, PER_STEP at the middle ones
    (fewer when the budget must keep one for every later step), the rest at the last."""
    if n_remove == 1:
        return [max(1, budget)]
    plan, rest = [1], budget - 1
    for t in range(1, n_remove - 1):
        m = max(1, min(PER_STEP, rest - (n_remove - 1 - t)))
        plan.append(m)
        rest -= m
    plan.append(max(1, rest))
    return plan


def lorp_search(
    stats: LayerStatistics,
    eligible: Sequence[int],
    n_remove: int,
    loss: Callable[[tuple[int, ...]], float],
    budget: int,
) -> tuple[tuple[int, ...], float, dict[int, float], list[dict]]:
    """The greedy of the module doc on block indices. `loss(indices)` is the measurement.

    Returns (removed, its loss, final estimates per eligible block, steps); each step
    is {"removed": b, "loss": L, "measured": {candidate: L}}.
    """
    cost = run_cost(stats)
    measured: dict[tuple[int, ...], float] = {}

    def L(R: tuple[int, ...]) -> float:
        if R not in measured:
            v = float(loss(R))
            measured[R] = math.inf if math.isnan(v) else v
        return measured[R]

    R: tuple[int, ...] = ()
    base: float | None = None  # L(R); unknown before the first step (no dense measurement)
    stale: dict[int, tuple[float, float]] = {}  # block -> (measured increment, dJ in its context)
    ratios: list[float] = []
    estimates: dict[int, float] = {}
    steps = []
    for m in step_allocation(budget, n_remove):
        j0 = run_surrogate(stats, R, cost)
        dj = {b: run_surrogate(stats, R + (b,), cost) - j0 for b in eligible if b not in R}
        sigma = float(np.median(ratios)) if ratios else 1.0
        for b, d in dj.items():
            if b in stale and stale[b][1] > 0:
                estimates[b] = stale[b][0] * d / stale[b][1]
            elif b in stale:
                estimates[b] = stale[b][0]
            else:
                estimates[b] = sigma * d
        order = sorted(dj, key=lambda b: (estimates[b], b))
        values = {b: L(tuple(sorted(R + (b,)))) for b in order[:m]}
        best = min(values, key=lambda b: (values[b], b))
        if base is not None:
            for b, v in values.items():
                increment = v - base
                stale[b] = (increment, dj[b])
                estimates[b] = increment
                if dj[b] > 0 and math.isfinite(increment) and b == best:
                    ratios.append(increment / dj[b])
        steps.append({"removed": best, "loss": values[best], "measured": values})
        base = values[best]
        R = tuple(sorted(R + (best,)))
    return R, base, estimates, steps


@register("lorp", summary="greedy on the calibration loss, measuring only the candidates the statistics rank best")
def lorp(
    stats: LayerStatistics,
    n_remove: int,
    *,
    protected: Sequence[str | int] | None = None,
    loss_fn: LossFn | None = None,
    evaluations: int | None = None,
) -> PruningPlan:
    """Default selector: minimise the calibration loss with about a tenth of SLEB's
    measurements, by a greedy whose estimates follow the locality of the residual
    stream (module doc). Without `loss_fn`: the blocks with the lowest own cost
    1 - cos(input, output). `evaluations` overrides the measurement budget (>= 1 per
    removed block).
    """
    eligible = eligible_blocks(stats, protected)
    check_budget(stats, n_remove, eligible)
    bi = stats.block_influence()
    if loss_fn is None:
        chosen = lowest(bi, eligible, n_remove)
        details = {"objective": "statistics: sum of the removed blocks' own cost 1 - cos(in, out)",
                   "removal_order": block_names(stats, chosen)}
        return make_plan(stats, chosen, "lorp", {b: bi[b] for b in eligible}, details=details)

    budget = default_evaluations(len(eligible), n_remove) if evaluations is None else int(evaluations)
    if budget < n_remove:
        raise BudgetError(
            f"lorp needs at least one loss measurement per removed block: evaluations={budget} < n_remove={n_remove}"
        )

    def loss(indices: tuple[int, ...]) -> float:
        return loss_fn(block_names(stats, indices))

    removed, final, estimates, steps = lorp_search(stats, eligible, n_remove, loss, budget)
    details = {
        "objective": "calibration loss of the model without the removed blocks (loss_fn)",
        "loss": final,
        "evaluations": sum(len(s["measured"]) for s in steps),
        "budget": budget,
        "removal_order": [stats.blocks[s["removed"]] for s in steps],
        "steps": [
            {
                "removed": stats.blocks[s["removed"]],
                "loss": s["loss"],
                "candidates": {stats.blocks[b]: v for b, v in s["measured"].items()},
            }
            for s in steps
        ],
    }
    return make_plan(stats, removed, "lorp", estimates, details=details)
