"""The pruning budget rule, stated once.

A pruning removes at least one block and keeps at least `MIN_KEPT` blocks in all
and at least one block in every residual stream (an encoder-decoder has two).
Blocks are whatever the plan counts: layers, or attention and MLP sublayers.
Selectors, the callback, the pipeline, the graph pass and checkpoint surgery all
check this rule through these functions, so a plan one of them accepts the
others accept too.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

from lorp_fx.core.errors import BudgetError

MIN_KEPT = 2


def budget_from_ratio(n_blocks: int, ratio: float) -> int:
    """round(ratio * n_blocks), halves up, at least 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise BudgetError(f"ratio must be a fraction of the blocks strictly between 0 and 1, got {ratio!r}")
    return max(1, math.floor(ratio * n_blocks + 0.5))


def resolve_budget(n_blocks: int, n_remove: int | None = None, ratio: float | None = None) -> int:
    """The number of blocks to remove from exactly one of `n_remove` and `ratio`, checked against `n_blocks`."""
    if (n_remove is None) == (ratio is None):
        raise BudgetError("give exactly one budget: n_remove (a number of blocks) or ratio (a fraction of them)")
    k = budget_from_ratio(n_blocks, ratio) if n_remove is None else n_remove
    check_budget(n_blocks, k)
    return k


def check_budget(n_blocks: int, n_remove: int, eligible: int | None = None, what: str = "blocks") -> None:
    """Raise BudgetError unless removing `n_remove` of `n_blocks` follows the rule.

    `eligible` (when known) is how many blocks may be chosen at all: removable and
    not protected.
    """
    if isinstance(n_remove, bool) or not isinstance(n_remove, int) and not hasattr(n_remove, "__index__"):
        raise BudgetError(f"the number of {what} to remove must be a whole number, got {n_remove!r}")
    n_remove = int(n_remove)
    if n_remove < 1:
        raise BudgetError(f"the number of {what} to remove must be at least 1, got {n_remove}")
    if n_blocks - n_remove < MIN_KEPT:
        raise BudgetError(
            f"cannot remove {n_remove} of {n_blocks} {what}: at least {MIN_KEPT} must stay; remove at most {max(n_blocks - MIN_KEPT, 0)}"
        )
    if eligible is not None and n_remove > eligible:
        raise BudgetError(
            f"cannot remove {n_remove} {what}: only {eligible} of {n_blocks} are removable and not protected; "
            "lower the budget or protect fewer blocks"
        )


def check_kept(stream_sizes: Mapping[str, int], removed: Mapping[str, int], what: str = "layers") -> None:
    """The rule per stream: `stream_sizes` (stream -> block count) minus `removed` (stream -> blocks
    removed) keeps at least one block in each stream and at least `MIN_KEPT` in all."""
    for stream, size in stream_sizes.items():
        if removed.get(stream, 0) >= size:
            raise BudgetError(
                f"cannot remove all {size} {what} of {stream}: a pruned model keeps at least one in each stack"
            )
    total = sum(removed.values())
    if total:
        check_budget(sum(stream_sizes.values()), total, what=what)


def check_stack_budget(stack_sizes: Mapping[str, int], removed: Collection[str], what: str = "layers") -> None:
    """The rule for named removals: layer `path.i` belongs to the stack at `path`."""
    counts = {path: sum(1 for name in removed if name.rpartition(".")[0] == path) for path in stack_sizes}
    check_kept(stack_sizes, counts, what)


def check_stream_budget(streams: Sequence[Sequence[str]], removed: Collection[str], what: str = "blocks") -> None:
    """The rule for named removals from blocks grouped by residual stream (`LayerStatistics.streams()` names)."""
    removed = set(removed)
    if not removed:
        check_budget(sum(len(s) for s in streams), 0, what=what)  # at least one must go
    sizes = {f"the stream {s[0]} .. {s[-1]}": len(s) for s in streams if s}
    counts = {f"the stream {s[0]} .. {s[-1]}": len(removed.intersection(s)) for s in streams if s}
    check_kept(sizes, counts, what)
