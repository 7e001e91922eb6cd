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
import re
from collections.abc import Collection, Mapping, Sequence

from .errors import BudgetError

MIN_KEPT = 2
_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


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


def check_stack_budget(stack_sizes: Mapping[str, int], removed: Collection[str], what: str = "layers") -> None:
    """The rule for named removals: every stack (`path` -> layer count) keeps at least one of its
    layers `path.i`, and at least `MIN_KEPT` stay in all."""
    total_removed = 0
    for path, size in stack_sizes.items():
        gone = sum(1 for name in removed if name.rpartition(".")[0] == path)
        total_removed += gone
        if gone >= size:
            raise BudgetError(
                f"cannot remove all {size} {what} of {path}: a pruned model keeps at least one in each stack"
            )
    if total_removed:
        check_budget(sum(stack_sizes.values()), total_removed, what=what)


def check_stream_budget(streams: Sequence[Sequence[str]], removed: Collection[str], what: str = "blocks") -> None:
    """The rule for named removals from blocks grouped by residual stream (`LayerStatistics.streams()`):
    at least one removed, at least one kept in every stream, at least `MIN_KEPT` kept in all."""
    removed = set(removed)
    for stream in streams:
        if stream and removed.issuperset(stream):
            raise BudgetError(
                f"cannot remove all {len(stream)} {what} of the stream {stream[0]} .. {stream[-1]}: "
                "a pruned model keeps at least one in each stream"
            )
    check_budget(sum(len(stream) for stream in streams), len(removed), what=what)


def stack_of(name: str) -> str:
    """The stack a block belongs to: its name before the first index (`model.layers.3.mlp` -> `model.layers`)."""
    match = _INDEX.search(name)
    return name[: match.start()] if match else ""


def check_named_budget(blocks: Sequence[str], removed: Collection[str], what: str = "layers") -> None:
    """`check_stream_budget` with the streams read off the names (each stack is a stream): for the graph pass,
    which knows block names but not statistics. Nothing to check when nothing of `blocks` is removed."""
    chosen = [name for name in removed if name in set(blocks)]
    if not chosen:
        return
    streams: dict[str, list[str]] = {}
    for name in blocks:
        streams.setdefault(stack_of(name), []).append(name)
    check_stream_budget(list(streams.values()), chosen, what=what)
