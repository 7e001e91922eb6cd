"""Draft: run-cost dynamic programming (research in progress)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from ..stats import LayerStatistics


def run_cost_matrix(stats: LayerStatistics, metric: str = "cosine") -> np.ndarray:
    if metric == "cosine":
        return 1.0 - stats.similarity
    if metric == "angle":
        return stats.angular
    if metric == "last-angle":
        return stats.last_token_angular
    raise ValueError(metric)


def k_best_runs(
    stats: LayerStatistics, cost: np.ndarray, eligible: Sequence[int], n_remove: int, n_best: int = 1
) -> list[tuple[float, tuple[int, ...]]]:
    """The `n_best` removal sets of exactly `n_remove` eligible blocks with the lowest total
    run cost, lowest first. A set splits into maximal runs of consecutive blocks on one
    stream; run [a..b] costs cost[entry of a, exit of b]; kept blocks cost nothing."""
    n = stats.n_blocks
    allowed = set(eligible)
    entry = [p[0] for p in stats.block_points]
    exit_ = [p[1] for p in stats.block_points]
    # best[i][j]: up to n_best (cost, removed) with blocks < i decided, j removed, block i free
    best: list[list[list]] = [[[] for _ in range(n_remove + 1)] for _ in range(n + 2)]
    best[0][0] = [(0.0, ())]

    def push(i, j, items):
        merged = heapq.nsmallest(n_best, best[i][j] + items)
        best[i][j] = merged

    for i in range(n):
        for j in range(n_remove + 1):
            here = best[i][j]
            if not here:
                continue
            push(i + 1, j, here)  # keep block i
            b = i
            while b < n and b in allowed and j + (b - i + 1) <= n_remove:
                if b > i and not stats.is_contiguous(b - 1, b):
                    break
                c = float(cost[entry[i], exit_[b]])
                jj = j + (b - i + 1)
                items = [(v + c, rem + tuple(range(i, b + 1))) for v, rem in here]
                nxt = b + 1
                if nxt < n and stats.is_contiguous(b, nxt):
                    nxt = b + 2  # block b + 1 is kept: runs are maximal
                push(min(nxt, n), jj, items)
                b += 1
    return best[n][n_remove]
