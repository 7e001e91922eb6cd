"""The calibration loss of a model that accelerate spreads over GPUs, the CPU and disk (`--device-map auto`).

How such a model is pruned, step by step. It runs eagerly: before each offloaded module runs, an accelerate hook
copies its weights in from the CPU or from disk, and puts meta tensors back after.
`torch.export` cannot trace that (the hooks touch real data pointers), so:

* blocks are found on the graph of a meta-device copy (same class and config, no
  weights, nothing computed): the names are the real model's (`graph.trace.skeleton_graph`);
* statistics are read from the judge's caching pass (below), as in memory, or by module hooks
  (`calibration/hook_observer.py`) where no judge runs or the text is sampled while watched;
* candidate removals are judged by `CandidateLoss` on the skeleton's graph, each weight read from
  accelerate's store when a node needs it (`io.placement.streamed_weights`), compensated as in memory;
  where that graph cannot run or computes another loss than the model (`pipeline.removal`), on the
  eager model, uncompensated, the removed layers' outputs replaced by their inputs (forward hooks):
  the graph's rewrite, done on the fly (here);
* compensation folds its maps into the fold units' weights, which are first made
  resident (copied in from the offload store once, a few projections: `io.placement.make_resident`).

Limits: layer granularity only (a sublayer's residual add happens inside its layer's
forward, where no hook can skip it); no fx self-check (the graph has no weights).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lorp_fx.calibration.batches import with_model_defaults
from lorp_fx.judge.loss import MemoLoss, next_token_loss


def eager_calibration_loss(model: nn.Module, batches: list[dict]) -> MemoLoss | None:
    """`loss_fn(removed)`: the mean next-token loss of the eager model with those layers skipped, on `batches`."""
    if not batches or "decoder_input_ids" in batches[0]:
        return None

    @torch.no_grad()
    def loss(removed: list[str]) -> float:
        with skipped(model, removed):
            return sum(next_token_loss(model, with_defaults(model, batch)) for batch in batches) / len(batches)

    return MemoLoss(loss)


def with_defaults(model: nn.Module, batch: dict) -> dict:
    return with_model_defaults(model, batch)


@contextlib.contextmanager
def skipped(model: nn.Module, names: list[str]):
    """The named layers hand their input on as their output while the block runs."""
    handles = []
    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(_pass_input_on, with_kwargs=True))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _pass_input_on(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


