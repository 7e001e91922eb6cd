"""Which calibration windows the judge selects on, fits on and guards with: decided from every window's label.

The judge (`CandidateLoss`) may hold only some of the calibration windows: under
`--devices N`, or in the Lightning callback under DDP, each process holds its share. What
a window is for must not depend on that split, so it is decided here from the global list
of windows (their source labels, in one process's order) and the global index of each:

* the loss windows are the first `loss_windows` windows of the sources the run selects on;
* the fit windows are the others (`fit_on="others"`), or all of them (`"all"`);
* the guard windows are every window of a `held_only` source (the model's own text beside a
  user's file): measured, never selected or fitted on;
* a fitted window's cross-validation fold is its rank among the fitted windows of its source,
  modulo the number of folds: the folds of one process.

Every sum the judge computes over windows (losses, the normal equations of a map, the
similarity statistics) is then a sum over the windows a process holds, all-reduced: every
process ends with the numbers one process computes, to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lorp_fx.core.errors import ConfigError

# Sums a float64 tensor over the processes (an all-reduce); None: one process, nothing to add.
Reduce = Callable[[torch.Tensor], torch.Tensor] | None


@dataclass(frozen=True)
class WindowLayout:
    labels: tuple[str, ...]  # every window's source, in global order
    loss: tuple[int, ...]  # global indices of the loss windows
    fit: tuple[int, ...]  # of the windows the judge's maps are fitted on (empty without compensation)
    guard: tuple[int, ...]  # of the windows of held-only sources
    fit_on: str  # "others" (the fit windows are not loss windows) or "all"
    held_only: frozenset[str]

    @classmethod
    def plan(cls, labels: Sequence[str], loss_windows: int, compensation: bool, fit_on: str,
             held_only=frozenset()) -> "WindowLayout":
        held_only = frozenset(held_only)
        selectable = [i for i, label in enumerate(labels) if label not in held_only]
        if not selectable:
            raise ConfigError("every calibration window is held out for the compensation check; give text to select on")
        count = max(1, min(loss_windows, len(selectable)))
        loss, rest = selectable[:count], selectable[count:]
        fit = [] if not compensation else rest if fit_on == "others" and rest else selectable
        effective = "others" if fit_on == "others" and rest and compensation else "all"
        guard = [i for i, label in enumerate(labels) if label in held_only]
        return cls(tuple(labels), tuple(loss), tuple(fit), tuple(guard), effective, held_only)

    @property
    def sources(self) -> list[str]:
        """The source labels in order of first appearance: the order per-source sums are reduced in."""
        return list(dict.fromkeys(self.labels))

    def every(self) -> list[int]:
        """The windows the shipped maps are fitted on: every window (`CandidateLoss.final_fits`)."""
        selected = list(self.fit) if self.fit_on == "all" else [*self.loss, *self.fit]
        return selected + list(self.guard)

    def part_keys(self, order: Sequence[int], folds: int) -> tuple[dict[int, tuple], list[tuple]]:
        """For the windows `order` (global indices, in the order one process fits them): each window's part
        (source, fold), and every part in a fixed order. With one source the source is None (`fit_gap`)."""
        labels = [self.labels[i] for i in order]
        several = len(set(labels)) > 1
        sources = list(dict.fromkeys(labels)) if several else [None]
        keys = [(source, k) for source in sources for k in range(1 if source in self.held_only else folds)]
        seen: dict = {}
        window_keys = {}
        for index, label in zip(order, labels):
            source = label if several else None
            rank = seen.get(source, 0)
            seen[source] = rank + 1
            window_keys[index] = (source, 0 if source in self.held_only else rank % folds)
        return window_keys, keys


def reduce_sums(values: Sequence[float], reduce: Reduce) -> list[float]:
    """`values` summed over the processes (float64)."""
    if reduce is None:
        return [float(v) for v in values]
    return [float(v) for v in reduce(torch.tensor([float(v) for v in values], dtype=torch.float64))]


def local_windows(window_indices: Sequence[int] | None, count: int, total: int | None) -> list[int]:
    """The global index of each of the `count` windows this process holds (default: 0 .. count - 1), checked."""
    if window_indices is None:
        return list(range(count))
    indices = [int(i) for i in window_indices]
    if len(indices) != count:
        raise ConfigError(f"window_indices names {len(indices)} windows, but the calibration batches hold {count}")
    if len(set(indices)) != count or (total is not None and any(not 0 <= i < total for i in indices)):
        raise ConfigError(f"window_indices must be distinct indices below the number of windows ({total})")
    return indices
