"""The baselines users compare LoRP with: ShortGPT, UIDL, LLM-Streamline, SLEB, last-n, uniform, random."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lorp_fx.core.errors import BudgetError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.core.stats import LayerStatistics
from lorp_fx.selection.common import LossFn, Protected, block_names, eligible_for, lowest, make_plan
from lorp_fx.selection.registry import register


@register("shortgpt", summary="lowest Block Influence 1 - cos(h_l, h_l+1)", source="arXiv 2403.03853")
def shortgpt(stats: LayerStatistics, n_remove: int, *, protected: Protected = None) -> PruningPlan:
    """ShortGPT (arXiv 2403.03853): remove the blocks with the lowest Block Influence.

    BI_b = 1 - mean token cos(input of b, output of b); blocks need not be contiguous.
    Scores are BI.
    """
    eligible = eligible_for(stats, n_remove, protected)
    bi = stats.block_influence()
    chosen = lowest(bi, eligible, n_remove)
    details = {"removal_order": block_names(stats, chosen)}
    return make_plan(stats, chosen, "shortgpt", dict(enumerate(bi)), details=details)


def _best_run(
    stats: LayerStatistics, n_remove: int, eligible: Sequence[int], distance: np.ndarray
) -> tuple[int, dict[int, float]]:
    """Start of the contiguous run of n eligible blocks on one stream with the smallest
    `distance[entry of first, exit of last]` (ties: shallowest), and every start's distance."""
    allowed = set(eligible)
    runs = {}
    for start in range(stats.n_blocks - n_remove + 1):
        end = start + n_remove - 1
        if all(b in allowed for b in range(start, end + 1)) and stats.is_contiguous(start, end):
            runs[start] = float(distance[stats.block_points[start][0], stats.block_points[end][1]])
    if not runs:
        raise BudgetError(
            f"no run of {n_remove} contiguous removable, unprotected blocks on one stream; "
            "lower n_remove or use a method that removes non-contiguous blocks (e.g. shortgpt)"
        )
    return min(runs, key=lambda s: (runs[s], s)), runs


def _best_run_per_block(runs: dict[int, float], n_remove: int, sign: float = 1.0) -> dict[int, float]:
    """Each block's score: the value of the best admissible run that contains it (`sign` -1: higher is better)."""
    scores: dict[int, float] = {}
    for start, value in runs.items():
        for b in range(start, start + n_remove):
            if b not in scores or sign * value < sign * scores[b]:
                scores[b] = value
    return scores


@register("uidl", summary="contiguous run with the smallest last-token angular distance", source="arXiv 2403.17887")
def uidl(stats: LayerStatistics, n_remove: int, *, protected: Protected = None) -> PruningPlan:
    """UIDL (arXiv 2403.17887): the contiguous run whose ends are closest in last-token angle.

    d = mean over sequences of arccos(cos(h_entry, h_exit)) / pi on each sequence's last
    token; the run [b, b + n) with the smallest d is removed. The model's last block is
    always kept, as in the paper. Scores: for each block, d of the best admissible run
    containing it; `details["runs"]` has d of the run starting at each admissible block.
    """
    eligible = eligible_for(stats, n_remove, protected, always_kept={stats.n_blocks - 1})
    start, runs = _best_run(stats, n_remove, eligible, stats.last_token_angular)
    chosen = range(start, start + n_remove)
    details = {"run_start": stats.blocks[start], "distance": runs[start], "runs": {stats.blocks[b]: d for b, d in runs.items()}}
    return make_plan(stats, chosen, "uidl", _best_run_per_block(runs, n_remove), details=details)


@register("streamline", summary="contiguous run with the highest mean cosine between its ends", source="arXiv 2403.19135")
def streamline(stats: LayerStatistics, n_remove: int, *, protected: Protected = None) -> PruningPlan:
    """LLM-Streamline, training-free part (arXiv 2403.19135): the contiguous run whose
    ends have the highest mean token cosine. Scores: for each block, that cosine of the
    best admissible run containing it; `details["runs"]` has it per run start."""
    eligible = eligible_for(stats, n_remove, protected)
    start, runs = _best_run(stats, n_remove, eligible, -stats.similarity)
    cosines = {b: -d for b, d in runs.items()}
    chosen = range(start, start + n_remove)
    details = {"run_start": stats.blocks[start], "cosine": cosines[start], "runs": {stats.blocks[b]: c for b, c in cosines.items()}}
    return make_plan(stats, chosen, "streamline", _best_run_per_block(cosines, n_remove, sign=-1.0), details=details)


@register("sleb", summary="greedy on calibration loss, recomputed after each removal", source="arXiv 2402.09025")
def sleb(stats: LayerStatistics, n_remove: int, *, protected: Protected = None, loss_fn: LossFn) -> PruningPlan:
    """SLEB (arXiv 2402.09025): greedy, one block per step, by calibration loss.

    Each step calls `loss_fn(removed + [candidate])` (names in depth order) for every
    remaining candidate and removes the one with the lowest loss, so the losses are
    recomputed after every removal. A NaN loss counts as +inf. Scores: the loss with
    each block removed alone (the first step); `details["steps"]` has every step.
    """
    eligible = eligible_for(stats, n_remove, protected)
    removed: list[int] = []
    steps = []
    first_losses: dict[int, float] = {}
    for _ in range(n_remove):
        losses = {}
        for b in eligible:
            if b not in removed:
                loss = float(loss_fn(block_names(stats, sorted(removed + [b]))))
                losses[b] = math.inf if math.isnan(loss) else loss
        best = min(losses, key=lambda b: (losses[b], b))
        if not steps:
            first_losses = losses
        removed.append(best)
        candidates = {stats.blocks[b]: v for b, v in losses.items()}
        steps.append({"removed": stats.blocks[best], "loss": losses[best], "candidates": candidates})
    details = {"removal_order": block_names(stats, removed), "steps": steps}
    return make_plan(stats, removed, "sleb", first_losses, details=details)


@register("last-n", summary="the deepest blocks (naive reference)")
def last_n(stats: LayerStatistics, n_remove: int, *, protected: Protected = None) -> PruningPlan:
    """The naive reference: the deepest n removable, unprotected blocks. Scores: depth."""
    eligible = eligible_for(stats, n_remove, protected)
    return make_plan(stats, eligible[-n_remove:], "last-n", {b: b for b in eligible})


def uniform_positions(m: int, n: int) -> list[int]:
    """n of the positions 0..m-1, evenly spaced from the first to the last, rounding half down.

    Position i is round_half_down(i * (m-1) / (n-1)), computed in integers; one
    position is the middle one. Spacing is at least 1, so positions never repeat.
    On SmolLM2 (eligible layers 1..28) this gives the reference table's
    [1, 4, 8, 11, 14, 18, 21, 25, 28] for n = 9.
    """
    if not 1 <= n <= m:
        raise BudgetError(f"cannot pick {n} of {m} positions")
    if n == 1:
        return [(m - 1) // 2]
    q = n - 1
    # round_half_down(p / q) = ceil((2p - q) / 2q); integers keep exact halves exact
    return [-((q - 2 * i * (m - 1)) // (2 * q)) for i in range(n)]


@register("uniform", summary="evenly spaced blocks (naive reference)")
def uniform(stats: LayerStatistics, n_remove: int, *, protected: Protected = None) -> PruningPlan:
    """Every k-th block: n blocks evenly spaced over the removable, unprotected blocks.

    Counting only eligible blocks, position i of n is round_half_down(i * (m-1) / (n-1))
    among the m eligible ones, so the first and last eligible blocks are both removed
    (one block: the middle one); see `uniform_positions`. Scores: depth.
    """
    eligible = eligible_for(stats, n_remove, protected)
    chosen = [eligible[p] for p in uniform_positions(len(eligible), n_remove)]
    return make_plan(stats, chosen, "uniform", {b: b for b in eligible})


@register("random", summary="seeded random blocks (naive reference)")
def random_blocks(stats: LayerStatistics, n_remove: int, *, protected: Protected = None, seed: int = 0) -> PruningPlan:
    """Random blocks, reproducible: each block gets a key from `numpy.random.default_rng(seed)`
    and the eligible blocks with the lowest keys are removed (so a larger budget extends a
    smaller one). Scores: the keys."""
    eligible = eligible_for(stats, n_remove, protected)
    keys = np.random.default_rng(seed).random(stats.n_blocks)
    chosen = lowest(keys, eligible, n_remove)
    return make_plan(stats, chosen, "random", dict(enumerate(keys)), details={"seed": seed})
