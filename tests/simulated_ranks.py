"""Several processes simulated in one: a thread per rank, and a `reduce` that sums like an all-reduce.

Each rank's `reduce(tensor)` waits until every rank has handed in its tensor, then returns their sum in rank
order (the same sum on every rank, as an all-reduce gives). A rank that fails breaks the barrier, so the
others fail too instead of waiting for ever; `run` raises the first failure.
"""

from __future__ import annotations

import threading

import torch


class SimulatedRanks:
    def __init__(self, world: int, timeout: float = 600.0):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=timeout)
        self.slots: list = [None] * world

    def reduce_for(self, rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor.detach().clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total = total + other.to(total.device)
            self.barrier.wait()  # every rank has read the slots before any rank writes the next ones
            return total

        return reduce

    def run(self, work) -> list:
        """`work(rank, reduce)` on every rank at once; their results in rank order."""
        results: list = [None] * self.world
        failures: list = []

        def one(rank: int) -> None:
            try:
                results[rank] = work(rank, self.reduce_for(rank))
            except BaseException as error:  # noqa: BLE001 - handed to the caller below
                failures.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise next((f for f in failures if not isinstance(f, threading.BrokenBarrierError)), failures[0])
        return results
