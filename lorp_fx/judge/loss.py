"""Calibration loss: what loss-judged selectors (lorp, sleb) compare candidate removals by.

A selector asks `loss_fn(removed)`: the mean loss of the graph without those blocks
on a few recorded calibration calls, memoised by the set of removed blocks (the loss
does not depend on the order they are named in). What "the loss" of one output is:

* `next_token_cross_entropy(output, inputs)` wherever it is defined: the output
  has logits (batch, positions, vocabulary) and the inputs hold the token ids at
  those positions (`decoder_input_ids` for an encoder-decoder, `input_ids`, or the
  one integer tensor input of that shape); padding is excluded through the
  matching attention mask;
* otherwise a user's `loss_fn(output, inputs)` that returns a scalar.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.fx import GraphModule

from lorp_fx.calibration.network_call import NetworkCall
from lorp_fx.core.errors import CalibrationError
from lorp_fx.graph.rewrite import prune

LossFn = Callable[[list[str]], float]
OutputLoss = Callable[[Any, dict], Any]  # (network output, inputs by name) -> scalar loss

# Inputs holding token ids and their padding masks, decoder first: an encoder-decoder's
# logits are over its decoder positions.
TOKEN_INPUTS = (("decoder_input_ids", "decoder_attention_mask"), ("input_ids", "attention_mask"))


class MemoLoss:
    """A `loss_fn` memoised by the set of removed blocks, counting what was asked and what was computed.

    `memoise=False` recomputes every call (timing a cold run) but still counts.
    """

    def __init__(self, loss_fn: LossFn, memoise: bool = True):
        self.loss_fn, self.memoise = loss_fn, memoise
        self.values: dict[frozenset, float] = {}
        self.asked = self.computed = 0
        self.compute_seconds = 0.0

    def __call__(self, removed: Iterable[str]) -> float:
        removed = list(removed)
        key = frozenset(removed)
        self.asked += 1
        if key not in self.values or not self.memoise:
            start = time.perf_counter()
            self.values[key] = float(self.loss_fn(removed))
            self.compute_seconds += time.perf_counter() - start
            self.computed += 1
        return self.values[key]


Reduce = Callable[[float, int], tuple[float, int]]  # (sum, count) here -> (sum, count) over every process


def loss_on_calls(graph: GraphModule, calls: list[NetworkCall], output_loss: OutputLoss | None = None,
                  reduce: Reduce | None = None) -> MemoLoss:
    """`loss_fn(removed)`: the mean of `output_loss(output, inputs)` (default: next-token
    cross-entropy) of `graph` without those blocks, on the recorded `calls`. With `reduce`
    (several processes) the sum and the count are reduced over the processes first, so every
    process returns the mean over all of their calls; a process may hold none."""
    if not calls and reduce is None:
        raise CalibrationError("no calibration call was recorded, so no calibration loss can be measured")
    measure = output_loss or next_token_cross_entropy

    @torch.no_grad()
    def loss(removed: list[str]) -> float:
        candidate = prune(graph, removed) if removed and calls else graph
        total, count = sum(as_loss(measure(call.run(candidate), call.inputs)) for call in calls), len(calls)
        if reduce is not None:
            total, count = reduce(total, count)
        if not count:
            raise CalibrationError("no process recorded a calibration call, so no calibration loss can be measured")
        return total / count

    return MemoLoss(loss)


def calibration_loss(graph: GraphModule, batches: list[dict]) -> MemoLoss | None:
    """`loss_fn(removed)`: mean next-token loss of `graph` without those blocks on keyword `batches`.

    Defined for causal LMs (an `input_ids` input and `.logits` output); None for
    other networks (an encoder-decoder, a graph without token inputs).
    """
    inputs = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
    if not batches or "input_ids" not in inputs or "decoder_input_ids" in inputs:
        return None
    calls = [NetworkCall.keywords({k: v for k, v in batch.items() if k in inputs}) for batch in batches]
    return loss_on_calls(graph, calls)


def next_token_loss(network: Callable, batch: dict) -> float:
    """Mean next-token cross-entropy of a causal LM on a keyword `batch`, padding excluded (NaN counts as inf).
    A number, not a training loss: no autograd graph is kept for it."""
    with torch.no_grad():
        return as_loss(next_token_cross_entropy(network(**batch), batch))


def next_token_cross_entropy(output: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """Mean cross-entropy of the logits at each position against the next token id, padding excluded.

    Raises CalibrationError, saying what is missing, where the output has no logits
    or the inputs no token ids at the logits' positions.
    """
    logits = output_logits(output)
    if logits is None:
        raise CalibrationError(f"the network's output ({type(output).__name__}) has no logits")
    ids, mask = token_ids(inputs, tuple(logits.shape[:2]))
    targets = ids[:, 1:]
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
    if not bool(keep.any()):
        raise CalibrationError("a calibration call has no two consecutive unpadded tokens, so no next-token loss")
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten().long(), reduction="none"
    )
    return losses[keep.flatten()].mean()


def output_logits(output: Any) -> torch.Tensor | None:
    """The logits (batch, positions, vocabulary) of a network output: `.logits`, `["logits"]`,
    the output itself, or the first element of a tuple output (transformers' return_dict=False)."""
    if isinstance(output, Mapping) and "logits" in output:
        candidate = output["logits"]
    elif hasattr(output, "logits"):
        candidate = output.logits
    elif isinstance(output, (tuple, list)) and output:
        candidate = output[0]
    else:
        candidate = output
    if isinstance(candidate, torch.Tensor) and candidate.dim() == 3 and candidate.is_floating_point():
        return candidate
    return None


def token_ids(inputs: Mapping[str, Any], positions: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token ids, padding mask or None) at `positions` = (batch, seq) of the logits."""

    def fits(value) -> bool:
        return isinstance(value, torch.Tensor) and tuple(value.shape) == positions and not value.is_floating_point()

    for ids_name, mask_name in TOKEN_INPUTS:
        if fits(inputs.get(ids_name)):
            mask = inputs.get(mask_name)
            shaped = isinstance(mask, torch.Tensor) and tuple(mask.shape) == positions
            return inputs[ids_name], mask if shaped else None
    # `labels` are targets, not the tokens the logits follow; never guess from them.
    others = [name for name, value in inputs.items() if name != "labels" and fits(value) and "mask" not in name]
    if len(others) == 1:
        return inputs[others[0]], None
    found = ", ".join(others) if others else "none"
    raise CalibrationError(
        f"the network's inputs have no token ids at the logits' {positions[0]} x {positions[1]} positions "
        f"(integer inputs of that shape: {found})"
    )


def as_loss(value: Any) -> float:
    """A loss value as a float; NaN counts as +inf (a broken candidate is the worst)."""
    number = float(value)
    return math.inf if math.isnan(number) else number
