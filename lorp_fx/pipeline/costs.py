"""What a run costs: seconds per step, and the same in passes, a unit that does not depend on the machine.

One *pass* is one plain forward of the model over all the calibration tokens (no
cache, logits computed, no hooks): what a statistics pass over the calibration text
would cost at the least. It is measured in the same run, cheaply: one forward over
the first calibration batch, timed and scaled by the token count, so it costs
1 / (number of batches) of a pass itself (it appears in the report as `pass_unit`).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from lorp_fx.calibration.batches import with_model_defaults
from lorp_fx.core.model import release_memory, synchronize


class Stopwatch:
    """Seconds spent per named step (a step timed twice adds up); waits for the device before each reading,
    and gives freed memory back after each step."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[f"{step}_s"] = self.seconds.get(f"{step}_s", 0.0) + time.perf_counter() - start
            release_memory(self.device)

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}

    def in_passes(self, pass_seconds: float) -> dict[str, float]:
        """Every step's time divided by the time of one pass, and their total."""
        if not pass_seconds > 0:
            return {}
        passes = {k.removesuffix("_s"): round(v / pass_seconds, 3) for k, v in self.seconds.items()}
        passes["total"] = round(sum(self.seconds.values()) / pass_seconds, 3)
        return passes


@torch.no_grad()
def plain_pass(model: nn.Module, batches: list[dict]) -> dict:
    """The pass unit: one plain forward over the first batch, scaled to all the batches' tokens."""
    first = batches[0]
    kwargs = with_model_defaults(model, first)
    device = first["input_ids"].device
    synchronize(device)
    start = time.perf_counter()
    model(**kwargs)
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    measured = int(first["input_ids"].numel())
    rows, length = first["input_ids"].shape
    return {
        "seconds": seconds * tokens / measured,
        "measured": f"one plain forward over batch 1 of {len(batches)} ({rows} x {length} tokens) took {seconds:.3f} s, scaled by the token count",
        "tokens": tokens,
    }
