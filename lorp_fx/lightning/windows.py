"""The calibration windows a callback measures its loss on: the same windows whatever the number of processes.

A window is one row of a batch; its global index is the dataset index the loader's
sampler gave it (`SequentialSampler` in one process, Lightning's `DistributedSampler`,
without shuffling, under DDP). The loss windows are the first `loss_batches` batches of
one process's order, i.e. the windows of global index below `loss_batches x batch_size`:
each rank keeps those it holds, measures each on its own (a window's mean token loss),
and the ranks all-reduce the sum and the count. One process and N processes therefore
average the same per-window losses. Where the loader's order is not fixed (a shuffling
sampler, an iterable dataset) the global indices are unknown: each rank keeps its own
first `loss_batches` batches, as before, and the callback says so.
"""

from __future__ import annotations

from torch.utils.data import DistributedSampler, SequentialSampler

from lorp_fx.calibration.network_call import NetworkCall


def index_batches(loader) -> list[list[int]] | None:
    """The dataset indices of each batch `loader` yields, where its order is fixed; None otherwise."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    # Lightning's predict loop wraps the batch sampler in one that records the indices it yields; iterating
    # the wrapper here would restart the loop's own iterator, so the sampler inside it is read instead.
    batch_sampler = getattr(batch_sampler, "_batch_sampler", batch_sampler)
    sampler = getattr(batch_sampler, "sampler", None)
    fixed = isinstance(sampler, SequentialSampler) or (isinstance(sampler, DistributedSampler) and not sampler.shuffle)
    if batch_sampler is None or not fixed:
        return None
    return [list(batch) for batch in batch_sampler]


class LossWindows:
    """The loss windows this rank holds, one `NetworkCall` each, in global order; with `every`, every
    calibration window it holds (a compensating judge fits its maps on the others)."""

    def __init__(self, loss_batches: int, every: bool = False):
        self.loss_batches, self.every = loss_batches, every
        self.batches: list[list[int]] | None = None
        self.limit: int | None = None  # windows of global index below it are loss windows
        self.current: list[int] | None = None  # the global indices of the batch being run
        self.calls: list[tuple[int, NetworkCall]] = []
        self.seen = 0

    def start(self, loader) -> None:
        """Read the loader's order at the start of the calibrating loop."""
        self.batches, self.calls, self.seen = index_batches(loader), [], 0
        batch_size = getattr(loader, "batch_size", None) or (len(self.batches[0]) if self.batches else None)
        self.limit = None if self.batches is None or not batch_size else self.loss_batches * batch_size
        self.local_loss_windows = 0  # where the order is not fixed: the rows of this rank's first loss batches

    @property
    def global_order(self) -> bool:
        return self.limit is not None

    def batch(self, batch_idx: int) -> None:
        self.current = self.batches[batch_idx] if self.batches is not None and batch_idx < len(self.batches) else None
        self.seen += 1

    def keep(self, call: NetworkCall) -> None:
        """Keep the rows of `call` that are loss windows (rank-local order where the global one is unknown)."""
        rows = call.rows() or 0
        if self.global_order and self.current is not None and len(self.current) == rows:
            wanted = [(index, r) for r, index in enumerate(self.current) if self.every or index < self.limit]
        elif self.seen <= self.loss_batches or self.every:
            start = len(self.calls)
            wanted = [(start + r, r) for r in range(rows)]
            if self.seen <= self.loss_batches:
                self.local_loss_windows += rows
        else:
            wanted = []
        if wanted:
            kept = call.detached()
            self.calls.extend((index, kept.row(r)) for index, r in wanted)

    def ordered(self) -> list[NetworkCall]:
        """The loss windows (with `every`, every window) in global order."""
        return [call for _, call in self.indexed() if not self.every or self.is_loss_window(_)]

    def indexed(self) -> list[tuple[int, NetworkCall]]:
        """(global index, window) of every window kept, in global order, each index once."""
        return sorted(dict(self.calls).items(), key=lambda pair: pair[0])

    def is_loss_window(self, index: int) -> bool:
        return index < self.limit if self.global_order else index < self.local_loss_windows
