"""Calibration batches as models take them: keyword dicts, the padding mask of each stream, defaults.

Shared by the statistics pass (`graph_observer.py`), activation capture for compensation
(`compensation/`), calibration losses and the pipeline, so that every pass reads a
batch the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch import nn

from lorp_fx.core.errors import CalibrationError, InputMismatchError
from lorp_fx.core.model import model_device

MASK_NAMES = ("attention_mask", "decoder_attention_mask")


def token_batches(windows: torch.Tensor, batch_size: int, encoder_decoder: bool = False) -> list[dict]:
    """Keyword batches of `batch_size` windows each; an encoder-decoder reads the same text on both
    sides (teacher forcing)."""
    batches = []
    for chunk in windows.split(max(1, int(batch_size))):
        batch = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        if encoder_decoder:
            batch["decoder_input_ids"] = chunk
        batches.append(batch)
    return batches


def accepts_argument(model: nn.Module, name: str) -> bool:
    """True when `model.forward` takes a parameter called `name`."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def with_model_defaults(model: nn.Module, batch: dict) -> dict:
    """`batch` with `use_cache=False` where the model takes it: a calibration pass needs no KV cache."""
    if "use_cache" not in batch and accepts_argument(model, "use_cache"):
        return {**batch, "use_cache": False}
    return batch


def as_keyword_batch(batch) -> dict:
    """A LongTensor of token ids (n, seq) or a dict of model inputs, as a dict."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch if batch.dim() == 2 else batch.unsqueeze(0)}
    if isinstance(batch, dict):
        return dict(batch)
    raise InputMismatchError(
        f"calibration batches must be LongTensors of token ids or dicts of model inputs, got {type(batch).__name__}"
    )


def prepare_batches(model: nn.Module, batches: Iterable) -> list[dict]:
    """Keyword batches on the device of the model's inputs, with the model's calibration defaults."""
    device = model_device(model)  # not its first parameter's: an offloaded embedding is on "meta"
    prepared = []
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in as_keyword_batch(batch).items()}
        prepared.append(with_model_defaults(model, batch))
    if not prepared:
        raise CalibrationError("no calibration batch was given: this step needs calibration text")
    return prepared


def stream_mask(batch: dict, state: torch.Tensor, decoder: bool) -> torch.Tensor | None:
    """The padding mask (batch, seq) matching a stream's states, preferring the decoder's on a decoder stream."""
    shape = tuple(state.shape[:2])
    order = reversed(MASK_NAMES) if decoder else MASK_NAMES
    for name in order:
        mask = batch.get(name)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == shape:
            return mask.bool()
    return None


def batch_rows(batch: dict) -> int:
    """The batch size: the first dimension of the first tensor input."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return 1


def on_device(batches: list[dict], device: torch.device) -> list[dict]:
    """The batches' tensors on `device` (token ids: a few kilobytes per batch)."""
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in batches]


def one_window_each(batches: list[dict]) -> list[dict]:
    """The windows of `batches`, one batch each: what the passes that keep per-token results run on.

    Statistics and compensation are sums over tokens (the same sums, in another
    order), and the calibration loss is the mean over batches of each batch's mean
    token loss, which over windows of equal length (calibration windows have no
    padding) is the same mean. What one forward call holds at once is then a window's
    share: its logits (50 MB instead of 200 for SmolLM2's 49,152-word vocabulary at
    4 x 256 tokens) or the residual states of every point it reads. Measured on
    SmolLM2: the same time, compensation's peak +153 MiB instead of +228.
    """
    return [{k: v[row : row + 1] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v for k, v in batch.items()}
            for batch in batches for row in range(int(batch["input_ids"].shape[0]))]
