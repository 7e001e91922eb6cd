"""Calibration loss: what loss-judged selectors (lorp, sleb) compare candidate removals by.

`calibration_loss(graph, batches)` returns `loss_fn(removed)`, the mean next-token
cross-entropy of the graph without those blocks on the batches, memoised by the set
of removed blocks (the loss does not depend on the order they are named in).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
from torch.fx import GraphModule

from .rewrite import prune

LossFn = Callable[[list[str]], float]


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


def calibration_loss(graph: GraphModule, batches: list[dict]) -> MemoLoss | None:
    """`loss_fn(removed)`: mean next-token loss of `graph` without those blocks on `batches`.

    Defined for causal LMs (an `input_ids` input and `.logits` output); None for
    other networks (an encoder-decoder, a graph without token inputs).
    """
    inputs = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
    if not batches or "input_ids" not in inputs or "decoder_input_ids" in inputs:
        return None
    batches = [{k: v for k, v in batch.items() if k in inputs} for batch in batches]

    @torch.no_grad()
    def loss(removed: list[str]) -> float:
        candidate = prune(graph, removed) if removed else graph
        return sum(next_token_loss(candidate, batch) for batch in batches) / len(batches)

    return MemoLoss(loss)


def next_token_loss(network: Callable, batch: dict) -> float:
    """Mean next-token cross-entropy of a causal LM on `batch`, padding excluded (NaN/inf pass through)."""
    output = network(**batch)
    logits = output.logits if hasattr(output, "logits") else output[0]
    targets = batch["input_ids"][:, 1:]
    mask = batch.get("attention_mask")
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    value = float(losses[keep.flatten()].mean())
    return value if not math.isnan(value) else math.inf
