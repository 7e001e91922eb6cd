"""Plumbing every selector shares: eligibility, the budget check, cluster bookkeeping, the plan."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np

from lorp_fx.core.budget import check_budget
from lorp_fx.core.errors import BudgetError, UnknownBlockError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.core.stats import LayerStatistics

# The blocks a caller keeps, by name or index (None: the first and the last): every selector's `protected`.
Protected = Sequence[str | int] | None

LossFn = Callable[[list[str]], float]


def protected_indices(stats: LayerStatistics, protected: Sequence[str | int] | str | None) -> set[int]:
    """Indices of the protected blocks: the first and last when `protected` is None,
    otherwise the named blocks (names or indices, negative indices count from the end)."""
    return resolve_protected(stats.blocks, protected)


def resolve_protected(blocks: Sequence[str], protected: Sequence[str | int] | str | None) -> set[int]:
    """`protected_indices` for a model's block names, known as soon as its graph is traced: a name or an index
    it does not have is an UnknownBlockError before any calibration."""
    n = len(blocks)
    if protected is None:
        return {0, n - 1}
    if isinstance(protected, (str, int, np.integer)):  # one block given on its own
        protected = [protected]
    index = {name: i for i, name in enumerate(blocks)}
    chosen = set()
    for item in protected:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not -n <= item < n:
                raise UnknownBlockError(f"protected block index {item} is out of range: the model has {n} blocks")
            chosen.add(int(item) % n)
        elif item in index:
            chosen.add(index[item])
        else:
            raise UnknownBlockError(
                f"protected block {item!r} is not a block of this model; its blocks are "
                f"{blocks[0]!r} ... {blocks[-1]!r} (see stats.blocks)"
            )
    return chosen


def eligible_blocks(stats: LayerStatistics, protected: Sequence[str | int] | None) -> list[int]:
    """Blocks a selector may choose: removable and not protected, in depth order."""
    guarded = protected_indices(stats, protected)
    return [b for b in range(stats.n_blocks) if stats.removable[b] and b not in guarded]


def eligible_for(
    stats: LayerStatistics, n_remove: int, protected: Sequence[str | int] | None, always_kept: Collection[int] = ()
) -> list[int]:
    """Every selector's first step: the blocks it may choose (`eligible_blocks`, less the `always_kept` blocks
    its method never removes), once the budget rule (`lorp_fx.core.budget`) has been checked on them."""
    eligible = [b for b in eligible_blocks(stats, protected) if b not in always_kept]
    check_budget(stats.n_blocks, n_remove, eligible=len(eligible))
    return eligible


def granularity_of(stats: LayerStatistics) -> str:
    return "layer" if all(kind == "layer" for kind in stats.block_kinds) else "sublayer"


def make_plan(stats: LayerStatistics, chosen: Sequence[int], method: str, scores, **fields) -> PruningPlan:
    """A plan removing `chosen` (any order) in depth order; `scores` is {index: value}.

    Refuses a selection that would empty a residual stream (every block of an
    encoder or decoder): the budget rule keeps at least one per stream.
    """
    chosen = sorted(set(int(b) for b in chosen))
    for stream in stats.streams():
        if set(stream) <= set(chosen):
            raise BudgetError(
                f"the selection would remove every block of the stream {stats.blocks[stream[0]]} .. "
                f"{stats.blocks[stream[-1]]}; protect one of them or lower the budget"
            )
    return PruningPlan(
        remove=[stats.blocks[b] for b in chosen],
        method=method,
        granularity=granularity_of(stats),
        scores={stats.blocks[b]: float(v) for b, v in scores.items()},
        statistics=stats,
        **fields,
    )


def block_names(stats: LayerStatistics, indices: Sequence[int]) -> list[str]:
    return [stats.blocks[i] for i in indices]


def cluster_names(stats: LayerStatistics, labels: Sequence[int]) -> list[list[str]]:
    return [block_names(stats, members) for members in cluster_members(labels)]


def clustered_plan(stats: LayerStatistics, chosen: Sequence[int], method: str, scores, *, rls: float, k: int,
                   n_clusters: int | None, labels: Sequence[int], details: dict) -> PruningPlan:
    """`make_plan` for a clustering selector (`lorp-paper`, `lorp-hier`): its RLS and clusters, and ahead of
    its own `details` the number of clusters K, whether `n_clusters` forced it, and the cluster labels."""
    details = {"K": k, "K_forced": n_clusters is not None, "labels": labels, **details}
    return make_plan(stats, chosen, method, scores, rls=rls, clusters=cluster_names(stats, labels), details=details)


def lowest(scores: np.ndarray, eligible: Sequence[int], n: int) -> list[int]:
    """The n eligible indices with the lowest score, lowest first (ties: shallower first)."""
    return sorted(eligible, key=lambda i: (scores[i], i))[:n]


def renumber_by_depth(labels: Sequence[int]) -> list[int]:
    """Relabel clusters 0, 1, ... in the order of their shallowest member."""
    order: dict[int, int] = {}
    for label in labels:
        order.setdefault(int(label), len(order))
    return [order[int(label)] for label in labels]


def cluster_members(labels: Sequence[int]) -> list[list[int]]:
    """Indices of each cluster, clusters in label order, members in depth order."""
    members: list[list[int]] = [[] for _ in range(max(labels) + 1)]
    for index, label in enumerate(labels):
        members[label].append(index)
    return [m for m in members if m]
