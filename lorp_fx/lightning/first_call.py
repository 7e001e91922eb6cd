"""`LoRPCallback`'s checks on the network's first calibration call, once the network is traced: whatever depends
on its blocks (the budget, protected blocks, n_clusters) or on its output (whether the calibration loss can be
measured) fails there, in one line, before any statistics are relied on."""

from __future__ import annotations

import math
from typing import Any

from lorp_fx.calibration.network_call import NetworkCall
from lorp_fx.core.budget import budget_from_ratio, check_budget
from lorp_fx.core.errors import CalibrationError, SelectorError, first_line
from lorp_fx.judge.loss import OutputLoss, as_loss, next_token_cross_entropy
from lorp_fx.selection.common import resolve_protected
from lorp_fx.selection.registry import SELECTORS
from lorp_fx.selection.rls import resolve_k


def check_blocks(blocks, n_remove: int | None, ratio: float | None, method: str, granularity: str,
                 options: dict) -> None:
    """BudgetError where the budget cannot be met among the eligible blocks; SelectorError for more
    `n_clusters` than blocks; UnknownBlockError for a protected block the network does not have."""
    names = [b.name for b in blocks]
    wanted = n_remove if n_remove is not None else budget_from_ratio(len(names), ratio)
    eligible = [i for i, b in enumerate(blocks) if b.removable]
    if "protected" in SELECTORS[method].options:
        # The selector's own rule for protected blocks (first and last unless named), on the names alone.
        guarded = resolve_protected(names, options.get("protected"))
        eligible = [i for i in eligible if i not in guarded]
    check_budget(len(names), wanted, eligible=len(eligible), what=f"{granularity} blocks")
    if "n_clusters" in options:
        resolve_k(len(names), options["n_clusters"], rls=0.0)


def check_loss(method: str, loss_fn: OutputLoss | None, call: NetworkCall, output: Any) -> None:
    """The loss a loss-judged `method` compares candidates by, measured on the unpruned network's first call:
    SelectorError where it cannot be measured (no next-token loss and no `loss_fn`, or `loss_fn` fails),
    CalibrationError where it is not finite."""
    measure = loss_fn or next_token_cross_entropy
    try:
        value = as_loss(measure(output, call.inputs))
    except CalibrationError as error:
        if loss_fn is not None:
            raise
        raise SelectorError(
            f"method {method!r} judges candidates by calibration loss, but {error}, so next-token "
            "cross-entropy is not defined; pass LoRPCallback(loss_fn=lambda output, inputs: ...) returning one "
            "call's loss, or choose a statistics-only method such as 'shortgpt'"
        ) from None
    except Exception as error:  # noqa: BLE001 - the user's loss_fn: say which call broke it
        raise SelectorError(
            f"loss_fn(output, inputs) failed on the first calibration call ({type(error).__name__}: "
            f"{first_line(error)}); inputs holds the network's arguments by name ({', '.join(call.inputs)}) "
            "and loss_fn must return one number"
        ) from error
    if not math.isfinite(value):
        raise CalibrationError(
            f"the calibration loss of the unpruned network is {value} on the first call; check the model's dtype "
            "and the calibration inputs (and loss_fn, if you gave one)"
        )
