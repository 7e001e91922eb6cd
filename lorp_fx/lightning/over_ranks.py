"""What the callback sums over the ranks at the end of its loop: the statistics, and the plain calibration loss.

Loss-judged selectors choose their next candidates from the losses they have seen, so every
rank must see the same numbers to ask the same questions (the reductions stay matched) and
end with the same plan. Sums are float64 and reduced once; `strategy.reduce` may work in
place, so what is handed to it is a clone.
"""

from __future__ import annotations

from typing import Callable

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lorp_fx.core.errors import CalibrationError
from lorp_fx.core.stats import SimilarityAccumulator
from lorp_fx.judge.loss import OutputLoss, loss_on_calls
from lorp_fx.lightning.windows import LossWindows


def reduce_statistics(trainer: Trainer, accumulators: list[SimilarityAccumulator], calls: int) -> None:
    """All-reduce the accumulated sums once, in place; CalibrationError where no rank saw a batch."""
    total_calls = trainer.strategy.reduce(torch.tensor(float(calls), device=trainer.strategy.root_device), reduce_op="sum")
    if float(total_calls) == 0:
        raise CalibrationError("no calibration batch was seen: the calibration loader is empty")
    for accumulator in accumulators:
        for name in SimilarityAccumulator.SUM_NAMES:
            value = getattr(accumulator, name).clone()
            setattr(accumulator, name, trainer.strategy.reduce(value, reduce_op="sum").to(torch.float64))


def plain_loss(trainer: Trainer, graph, windows: LossWindows, loss_fn: OutputLoss | None) -> Callable[[list[str]], float]:
    """The calibration loss on the loss windows, the mean over every rank's (`windows.py`)."""
    calls = windows.ordered()
    if trainer.world_size == 1:
        return loss_on_calls(graph, calls, loss_fn)
    if not windows.global_order:
        rank_zero_warn("LoRPCallback: the calibration loader's order is not fixed (a shuffling sampler or an "
                       "iterable dataset), so each rank measures the loss on its own first batches and the "
                       "loss windows depend on the number of processes; use a sequential, unshuffled loader")
    reduce, device = trainer.strategy.reduce, trainer.strategy.root_device  # NCCL reduces device tensors only

    def over_ranks(total: float, count: int) -> tuple[float, int]:
        summed = reduce(torch.tensor([total, float(count)], dtype=torch.float64, device=device), reduce_op="sum")
        return float(summed[0]), int(round(float(summed[1])))

    return loss_on_calls(graph, calls, loss_fn, reduce=over_ranks)


def calibration_loader(trainer: Trainer, stage: str):
    """The first dataloader of the calibrating stage's loop (None where Lightning holds none yet)."""
    loaders = {"fit": "val_dataloaders", "validate": "val_dataloaders", "test": "test_dataloaders",
               "predict": "predict_dataloaders"}[stage]
    loaders = getattr(trainer, loaders, None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders
