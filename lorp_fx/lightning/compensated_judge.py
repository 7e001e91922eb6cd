"""`LoRPCallback(compensate=...)`: the compensating judge on the windows a Lightning loop calibrated on.

Every rank keeps each calibration window it ran (one row of a batch) under its global index
(`windows.py`). Lightning's `DistributedSampler` pads the last batches with windows other
ranks hold, and a loop may stop early (`limit_val_batches`), so the indices are made one
numbering first: the ranks sum which of them holds which index, each index is kept by the
lowest rank holding it, and the indices present are numbered 0..n-1 in order. The judge
(`judge.candidates.CandidateLoss`) then runs on each rank's windows, summing losses and the
maps' normal equations over the ranks through the strategy: every rank measures the same
losses, chooses the same plan and holds the same maps as one process with every window.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info

from lorp_fx.arch.anatomy import check_compensable
from lorp_fx.compensation.fit import eager_fits
from lorp_fx.core.errors import (
    CalibrationError,
    CompensationError,
    ConfigError,
    first_line,
)
from lorp_fx.core.model import is_transformers_model
from lorp_fx.core.plan import PruningPlan
from lorp_fx.judge.candidates import CandidateLoss
from lorp_fx.lightning.windows import LossWindows
from lorp_fx.pipeline.removal import decide_maps


def compensation_for(compensate: str | None, network: torch.nn.Module) -> str | None:
    """The map `compensate` fits on `network`: None where none was asked, or "auto" meets a family that
    takes none; an explicit method the network cannot take is refused, before calibrating."""
    if compensate is None:
        return None
    if not is_transformers_model(network):
        raise ConfigError(f"compensate folds maps into a transformers causal LM's layers, and "
                          f"{type(network).__name__} is not one; leave compensate=None")
    try:
        check_compensable(network)
    except CompensationError as error:
        if compensate != "auto":
            raise ConfigError(f"compensate={compensate!r}: {first_line(error)}; use 'auto' or None") from None
        rank_zero_info(f"LoRPCallback: no compensation ({first_line(error)})")
        return None
    return "cosine" if compensate == "auto" else compensate


def kept_maps(plan: PruningPlan, compensate: str, method: str, judge: CandidateLoss,
              network: torch.nn.Module) -> tuple[list, dict]:
    """Every rank: (the maps to fold, what was fitted and folded and why) for `plan`; the judge lets go."""
    check, fitted, _ = decide_maps(plan, compensate, judge)
    fits = eager_fits(network, fitted) if fitted else []  # names from the dense network
    block = {
        "method": method if fits else "none", "requested": compensate,
        "folded": bool(fits), "helps": check["apply"], "gaps": [fit.to_dict() for fit in fits],
        "calibration_loss": {"compensated": check["compensated_loss"], "uncompensated": check["uncompensated_loss"],
                             "windows": judge.loss_windows},
        "gaps_without_map": check["gaps_without_map"], "dropped": check["dropped"],
    }
    judge.release()
    return fits, block


def one_numbering(pairs: list[tuple[int, object]], trainer) -> tuple[list[int], list[tuple[int, object]], int]:
    """(the positions 0..n-1 of this rank's windows among every rank's, those (index, window), n): each window
    is kept by one rank."""
    if trainer.world_size == 1:
        return list(range(len(pairs))), pairs, len(pairs)
    strategy, rank = trainer.strategy, trainer.global_rank
    device = strategy.root_device  # NCCL reduces device tensors only
    mine = torch.tensor([index for index, _ in pairs], dtype=torch.long)
    size = int(strategy.reduce(torch.tensor(int(mine.max()) + 1 if len(mine) else 0, device=device),
                               reduce_op=dist.ReduceOp.MAX))
    held = torch.zeros(trainer.world_size, size, dtype=torch.float64, device=device)
    held[rank, mine.to(device)] = 1.0
    held = strategy.reduce(held, reduce_op="sum").cpu() > 0
    present = held.any(0)
    owner = held.float().argmax(0)  # the lowest rank holding each index
    position = torch.cumsum(present.long(), 0) - 1
    kept = [(index, window) for index, window in pairs if int(owner[index]) == rank]
    return [int(position[index]) for index, _ in kept], kept, int(present.sum())


def summed_over_ranks(trainer):
    """`reduce(tensor)`: its sum over the ranks through the strategy; None in one process."""
    if trainer.world_size == 1:
        return None
    strategy = trainer.strategy

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        summed = strategy.reduce(tensor.detach().clone().to(strategy.root_device), reduce_op="sum")
        return summed.to(tensor.device)

    return reduce


def sharded_judge(graph, trainer, windows: LossWindows, method: str, reject: bool) -> CandidateLoss:
    """The compensating judge on every rank's calibration windows, the first `loss_batches` batches' windows
    its loss windows (the maps are fitted on the others)."""
    if trainer.world_size > 1 and not windows.global_order:
        raise CalibrationError(
            "LoRPCallback(compensate=...) in several processes needs the calibration loader's order fixed (a "
            "sequential, unshuffled sampler over a map-style dataset), so that every window has one global index")
    positions, kept, total = one_numbering(windows.indexed(), trainer)
    if total == 0:
        raise CalibrationError("no calibration window was recorded: the calibration loader is empty")
    loss_windows = sum(1 for index, _ in kept if windows.is_loss_window(index))
    if trainer.world_size > 1:
        loss_windows = int(trainer.strategy.reduce(
            torch.tensor(float(loss_windows), device=trainer.strategy.root_device), reduce_op="sum"))
    inputs = [call.tensor_inputs() for _, call in kept]
    if inputs and "input_ids" not in inputs[0]:
        raise CalibrationError("LoRPCallback(compensate=...) measures the next-token loss, so the network must be "
                               "called with input_ids; call it with input_ids, or leave compensate=None")
    return CandidateLoss(graph, inputs, loss_windows=max(1, loss_windows), compensation=method,
                         reject_unhelpful_maps=reject, sources=["calibration"] * total, window_indices=positions,
                         reduce=summed_over_ranks(trainer))
