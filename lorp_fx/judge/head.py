"""The next-token loss from the state before the head, the head run over chunks of positions.

A candidate's loss needs the logits of every position: SmolLM2's 49,152-word vocabulary
makes them 50 MB a 256-token window in float32, and `cross_entropy` holds its log-softmax
beside them (100 MB; 150 with a float copy of lower-precision logits). The head (the final norm, the output projection,
any soft-capping) acts on each position alone, so the judge runs the graph's tail from the
final residual state on `chunk_positions` positions at a time (`GraphRunner.run` resumed
at the final state) and keeps only each position's loss: the same per-position losses
(each row's logits are the same dot products; a kernel may round a row differently with
another number of rows, by float32 roundings of the logits), averaged as
`loss.next_token_cross_entropy` averages them. Where the tail is not per position (its
output does not have a chunk's length), the whole tail runs at once, as before.
"""

from __future__ import annotations

import weakref

import torch

from lorp_fx.core.errors import CalibrationError
from lorp_fx.judge.loss import as_loss, output_logits, token_ids

# Logits held at once (float32): 128 positions of SmolLM2's vocabulary, half a 256-token window's. Measured on
# SmolLM2 (one thread, min of 4): the head of one window takes 0.209 s whole, 0.207 s in chunks of 128 positions,
# 0.252 s in chunks of 64 and 0.294 s in chunks of 32 (smaller products run slower).
CHUNK_BYTES = 24 * 2**20
FIRST_CHUNK = 128  # positions of a runner's first chunk ever, before its vocabulary's size is known
_VOCABULARY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # runner -> the width of its logits


def chunk_positions(vocabulary: int, rows: int = 1) -> int:
    """Positions per chunk, so that one chunk's float32 logits stay within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * max(1, vocabulary) * max(1, rows)))


def _positions(batch: dict, start: int, end: int, length: int) -> dict:
    """The batch's per-position tensors (batch, length, ...) cut to positions start..end; others as they are."""
    return {k: v[:, start:end] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == length else v
            for k, v in batch.items()}


@torch.no_grad()
def head_loss(runner, batch: dict, final: torch.Tensor, chunk: int | None = None) -> float:
    """Mean next-token cross-entropy of `runner`'s graph whose final residual state (before the head) is
    `final` (batch, positions, width), padding excluded, NaN as +inf: `next_token_loss` of the full output.
    `chunk` positions at a time (default: as many as CHUNK_BYTES of logits hold; FIRST_CHUNK in the first chunk
    `runner` ever computes, which tells the vocabulary's size)."""
    rows, length = final.shape[0], final.shape[1]
    ids, mask = token_ids(batch, (rows, length))
    targets = ids[:, 1:]
    keep = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
    if not bool(keep.any()):
        raise CalibrationError("a calibration call has no two consecutive unpadded tokens, so no next-token loss")
    last = len(runner.units)
    known = _VOCABULARY.get(runner)
    losses, start, step = [], 0, chunk or (chunk_positions(known, rows) if known else None)
    while start < length - 1:
        end = min(length, start + (step or FIRST_CHUNK))
        logits = output_logits(runner.run(_positions(batch, start, end, length), resume=(last, final[:, start:end])))
        if logits is None or tuple(logits.shape[:2]) != (rows, end - start):  # not per position: the whole tail
            logits = output_logits(runner.run(batch, resume=(last, final)))
            return _mean(_token_losses(logits[:, :-1], targets), keep)
        _VOCABULARY[runner] = logits.shape[-1]
        step = step or chunk_positions(logits.shape[-1], rows)
        upto = min(end, length - 1)  # the last position has no next token
        losses.append(_token_losses(logits[:, : upto - start], targets[:, start:upto]))
        start = end
    return _mean(torch.cat(losses, dim=1), keep)


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(batch, positions) cross-entropy of each position's logits against its target, in float32."""
    flat = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(), reduction="none")
    return flat.view(targets.shape)


def _mean(losses: torch.Tensor, keep: torch.Tensor) -> float:
    return as_loss(losses.flatten()[keep.flatten()].mean())
