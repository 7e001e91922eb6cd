"""The teacher's side of distillation: its logits (and gap states) for a batch, computed on the fly or cached.

Which costs less memory decides (`teacher_mode`). On the fly, the dense model stays in
memory and runs one forward pass per step (no gradient, so no activations kept). A
cache holds the float32 logits of every training token, vocabulary x 4 bytes each
(196 KB a token for SmolLM2's 49,152 words), and no longer needs the dense model (its memory
is freed where the caller drops it too). SmolLM2's
weights (538 MB) are worth 2,700 tokens of logits: a cache wins only for a healing set
of about ten 256-token windows, so the default healing runs on the fly.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from lorp_fx.calibration.batches import with_model_defaults
from lorp_fx.calibration.capture import attach_state_hooks
from lorp_fx.core.model import eval_mode, model_device, weight_bytes
from lorp_fx.judge.loss import output_logits


def cache_bytes(tokens: int, vocabulary: int, hidden: int = 0, match_points: int = 0) -> int:
    """Bytes of a float32 cache of `tokens` tokens' logits and, with hidden matching, their gap states."""
    return 4 * tokens * (vocabulary + hidden * match_points)


def teacher_mode(requested: str, teacher: nn.Module, tokens: int, vocabulary: int, hidden: int = 0,
                 match_points: int = 0, world: int = 1) -> tuple[str, dict]:
    """("on_the_fly" | "cached", the memory figures behind the choice). "auto" takes whichever holds less:
    the teacher's weights, or the cache (each process would hold a whole cache: several processes run on
    the fly)."""
    figures = {"teacher_weight_bytes": weight_bytes(teacher),
               "cache_bytes": cache_bytes(tokens, vocabulary, hidden, match_points)}
    if requested != "auto":
        return requested, figures
    cached = world == 1 and figures["cache_bytes"] < figures["teacher_weight_bytes"]
    return ("cached" if cached else "on_the_fly"), figures


class Teacher:
    """The dense model's logits and gap states for a batch of windows: from the model, or from a cache
    built once (`cache`) over every training window, indexed by window."""

    def __init__(self, model: nn.Module | None, points: list[tuple[nn.Module, str]]):
        self.model, self.points = model, points
        self.logits: torch.Tensor | None = None  # (windows, seq_len, vocabulary), on the CPU
        self.states: list[torch.Tensor] = []

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, gap states) of the dense model on `input_ids`, computed now."""
        captured: dict[int, torch.Tensor] = {}
        handles = attach_state_hooks([(i, module, kind) for i, (module, kind) in enumerate(self.points)],
                                     lambda key, state: captured.__setitem__(key, state.detach()))
        try:
            with eval_mode(self.model):
                logits = output_logits(self.model(**with_model_defaults(self.model, {"input_ids": input_ids})))
        finally:
            for handle in handles:
                handle.remove()
        return logits, [captured[i] for i in range(len(self.points))]

    def cache(self, windows: torch.Tensor, batch_size: int, progress: bool = True) -> None:
        """Compute every window's outputs once, keep them on the CPU, and drop the model."""
        device = model_device(self.model)
        logits, states = [], []
        for chunk in tqdm(windows.split(batch_size), desc="caching teacher logits", unit="batch", disable=not progress):
            chunk_logits, chunk_states = self.run(chunk.to(device))
            logits.append(chunk_logits.float().cpu())
            states.append([s.float().cpu() for s in chunk_states])
        self.logits = torch.cat(logits)
        self.states = [torch.cat([s[i] for s in states]) for i in range(len(self.points))]
        self.model = None

    def outputs(self, input_ids: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's (logits, gap states) for the batch of windows `index`."""
        if self.logits is None:
            return self.run(input_ids)
        device = input_ids.device
        return self.logits[index.cpu()].to(device), [s[index.cpu()].to(device) for s in self.states]
