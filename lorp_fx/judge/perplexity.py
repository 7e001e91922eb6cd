"""Perplexity of a causal language model on token windows."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorp_fx.core.errors import ConfigError, InputMismatchError
from lorp_fx.core.model import (
    causal_lm,
    check_vocabulary,
    eval_mode,
    is_transformers_model,
    model_device,
)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean token NLL) over all predicted tokens of `windows` (n, seq_len); inf where that overflows.

    Each window is scored on its own (no context carried between windows) and its
    first token is not predicted, so n * (seq_len - 1) tokens count. `model` is a
    `transformers` causal LM, or any callable taking `input_ids=` (such as a
    GraphModule from `lorp_fx.trace`) that returns logits, an object with
    `.logits`, a dict with "logits", or a tuple whose first item is the logits.
    A confidently wrong model can have a mean NLL beyond what exp() can hold
    (about 709 nats): its perplexity is reported as inf, not an error.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise InputMismatchError(f"windows must be a (n, seq_len >= 2) tensor of token ids, got shape {tuple(windows.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    check_vocabulary(model, windows)
    _check_causal(model)
    device = model_device(model)
    total_nll, count = 0.0, 0
    with eval_mode(model):
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = batch.to(device)
            logits = _logits(model, batch)
            _check_vocabulary(batch, logits)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            total_nll += nll.item()
            count += batch[:, 1:].numel()
    return exp_or_inf(total_nll / count)


def _check_causal(model) -> None:
    """A masked LM or an encoder-decoder has no next-token perplexity: refused, not measured as if it had."""
    if isinstance(model, nn.Module) and hasattr(model, "can_generate") and not causal_lm(model):
        raise ConfigError(f"perplexity is the next-token perplexity of a causal LM; {type(model).__name__} is not one")


def exp_or_inf(mean_nll: float) -> float:
    """exp(mean_nll), or inf where the float range ends (math.exp raises OverflowError there)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    # The KV cache is useless when scoring whole windows, and costs memory.
    out = model(input_ids=batch, use_cache=False) if is_transformers_model(model) else model(input_ids=batch)
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputMismatchError(f"the model returned {type(out).__name__}, which holds no logits")




def _check_vocabulary(batch: torch.Tensor, logits: torch.Tensor) -> None:
    if logits.shape[:2] != batch.shape:
        raise InputMismatchError(f"logits of shape {tuple(logits.shape)} do not match windows of shape {tuple(batch.shape)}")
    largest = int(batch.max())
    if largest >= logits.shape[-1]:
        raise InputMismatchError(
            f"token id {largest} is outside the model's vocabulary of {logits.shape[-1]}: "
            "the windows were made with another model's tokenizer"
        )


