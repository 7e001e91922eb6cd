"""Self-calibration: token windows the model samples itself, fast and the same for a seed.

The default calibration text when the user gives none (REFERENCE.md: from the BOS token,
temperature 1.0, top-p 0.95, seed 0). Sampling is batched with a KV cache written in
place, and each window draws from its own generator, so a window does not depend on the
batch it was sampled in or on the number of processes sharing the work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from lorp_fx.core.errors import CalibrationError
from lorp_fx.core.model import eval_mode, model_device


# Openings of other kinds of text for the model's own windows beside a corpus or a user's file (issue 24): from
# its start token alone a model writes mostly its favourite kind of prose, and maps fitted or checked on that
# hurt kinds it never shows (SmolLM2 at 9 of 30: Python code +14%). Opened with these, its own windows cover
# code, markup, tables, letters, lists, questions and another language, with no text shipped. Each is ordinary
# text; window i opens with the (i mod n)-th opening the tokenizer can spell, then the model writes the rest.
OPENINGS = {"Python code": "```python\n", "C code": "#include <", "HTML": "<!DOCTYPE html>\n", "a table": "| Name | ",
            "a letter": "Dear ", "a list": "1. ", "a question": "Question: ", "French": "Il était une fois"}


def opening_ids(tokenizer, openings: dict[str, str] | None = None) -> dict[str, list[int]]:
    """The token ids (without special tokens) of each opening the tokenizer spells without its unknown token:
    an opening it cannot spell would give the model a run of unknown tokens, not a kind of text."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    out = {}
    for kind, text in (OPENINGS if openings is None else openings).items():
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if ids and (unknown is None or unknown not in ids):
            out[kind] = ids
    return out


@torch.no_grad()
def self_calibration(
    model,
    tokenizer,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 32,
    progress: bool = True,
    after_step: Callable[[bool], None] | None = None,
    windows: Sequence[int] | None = None,
    openings: Sequence[Sequence[int]] = (),
) -> torch.Tensor:
    """Calibration windows sampled from the model itself, as a (n_samples, seq_len) LongTensor.

    Each window starts with the BOS token (EOS when the tokenizer has no BOS) and
    continues with `seq_len - 1` tokens sampled with `temperature` and nucleus
    `top_p` (REFERENCE.md: temperature 1.0, top-p 0.95, seed 0). Sampling goes on
    past an EOS, as in concatenated pretraining text, so that every window is full.

    Window i draws from its own random generator, seeded from (seed, i): the
    result depends on the seed, not on `batch_size` or `n_samples` (the first 8
    windows of 32 are the 8 windows asked alone), and the global torch random
    state is left alone. (Different batch sizes can change logits in the last
    float bits, which could flip a draw that lands on a boundary: rare, not
    impossible.) `windows` picks which of the n_samples windows to make (a rank's
    share, under several processes): window i is the same whoever makes it.
    `openings` (lists of token ids, see `opening_ids`): window i continues its start
    token with `openings[i % len(openings)]` (cut to the window) before the model writes
    the rest; the draws at those positions are made and discarded, so the
    generator of a window advances the same way with or without an opening.

    Speed: up to `batch_size` windows are sampled together (all 32 by default, one
    batched pass of seq_len steps) with a KV cache allocated once and written in
    place (`_static_cache`). Each step draws exactly as `torch.multinomial` over the
    nucleus-masked distribution always did here (so the windows are those of the
    one-window-at-a-time sampler), but finds the nucleus from a partial sort (top-k)
    instead of sorting the whole vocabulary.

    `after_step(last)`, if given, is called after every forward step while the
    caller's forward hooks see the step's states (one token per window): the
    statistics of the windows are collected as they are generated, with no second
    pass over them. For that, one more step feeds each window's last token through
    the model, and only that call has `last=True`.
    """
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need at least 1 window of at least 2 tokens, got {n_samples} windows of {seq_len}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CalibrationError("the tokenizer has neither a BOS nor an EOS token to start self-calibration from")
    seeds = np.random.SeedSequence(seed).spawn(n_samples)
    chosen = list(range(n_samples)) if windows is None else [int(i) for i in windows]
    if any(not 0 <= i < n_samples for i in chosen):
        raise CalibrationError(f"window indices must lie in 0..{n_samples - 1}, got {chosen}")
    out = []
    with eval_mode(model), tqdm(total=len(chosen) * (seq_len - 1), unit="tok", desc="self-calibration",
                                disable=not progress) as bar:
        for first in range(0, len(chosen), max(1, int(batch_size))):
            generators = [
                torch.Generator().manual_seed(int(seeds[i].generate_state(1, np.uint64)[0]))
                for i in chosen[first : first + batch_size]
            ]
            forced = [list(openings[i % len(openings)]) if openings else [] for i in chosen[first : first + batch_size]]
            out.append(_sample_batch(model, start, generators, seq_len, temperature, top_p, bar, after_step, forced))
    return torch.cat(out) if out else torch.empty(0, seq_len, dtype=torch.long)


def _sample_batch(model, start: int, generators, seq_len: int, temperature: float, top_p: float, bar, after_step,
                  forced: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    device = model_device(model)
    tokens = torch.full((len(generators), seq_len), start, dtype=torch.long)
    cache = _static_cache(model, seq_len)
    step_input = tokens[:, :1].to(device)
    for position in range(1, seq_len):
        out = model(input_ids=step_input, cache=cache, use_cache=True)
        cache = out.cache if cache is None else cache
        if after_step is not None:
            after_step(False)
        # Sampling on the CPU: the generators live there, and (n, vocab) is small.
        probs = _nucleus(torch.softmax(out.logits[:, -1, :].float().cpu() / temperature, dim=-1), top_p)
        chosen = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
        for row, opening in enumerate(forced):  # a window's opening is given, not drawn (its draws are discarded)
            if position - 1 < len(opening):
                chosen[row] = opening[position - 1]
        tokens[:, position] = chosen
        step_input = chosen[:, None].to(device)
        bar.update(len(generators))
    if after_step is not None:  # the last token's states: no step above fed it through the model
        model(input_ids=step_input, cache=cache, use_cache=True)
        after_step(True)
    return tokens


def _static_cache(model, seq_len: int):
    """A KV cache whose full-attention layers hold `seq_len` positions allocated once and written in place
    (None: the model's default cache).

    A growing cache concatenates every layer's keys and values at every step, which
    costs more than the step itself at a few hundred tokens; a static cache of fixed
    length makes attention read, mask and (grouped-query heads) copy all `seq_len`
    positions at every step. Here each layer writes into its preallocated buffer and
    hands attention a view of the positions written so far: no concatenation, no
    mask, no copies. (Sliding-window layers keep their own cache.)
    """
    try:
        cache = transformers.DynamicCache(config=model.config)
        cache.layers = [_PreallocatedLayer(seq_len) if type(layer) is transformers.cache_utils.DynamicLayer else layer for layer in cache.layers]
        return cache
    except Exception:  # noqa: BLE001 - a model without that cache layout samples with its default cache
        return None


def _preallocated_layer_class():
    class PreallocatedLayer(transformers.cache_utils.DynamicLayer):
        """A DynamicLayer that writes into a buffer of `capacity` positions and returns the written part."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            batch, heads, _, key_dim = key_states.shape
            self.device = key_states.device
            self._keys = key_states.new_empty(batch, heads, self.capacity, key_dim)
            self._values = value_states.new_empty(batch, value_states.shape[1], self.capacity, value_states.shape[-1])
            self.keys, self.values = self._keys[:, :, :0], self._values[:, :, :0]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            self._keys[:, :, self.length : end] = key_states
            self._values[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

    return PreallocatedLayer


def _PreallocatedLayer(capacity: int):
    global _PREALLOCATED
    if _PREALLOCATED is None:
        _PREALLOCATED = _preallocated_layer_class()
    return _PREALLOCATED(capacity)


_PREALLOCATED = None


# Tokens the nucleus is looked for among, in turn (a partial sort of 256, then of 4,096: 1.4 and 4.8 ms for 8
# rows of SmolLM2's 49,152 words, one thread, against 30 ms for a full sort); rows whose nucleus is wider still
# are sorted in full.
_NUCLEUS_CANDIDATES = (256, 4096)


def _nucleus(probs: torch.Tensor, top_p: float, tiers: tuple[int, ...] = _NUCLEUS_CANDIDATES) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches `top_p` (rows of `probs`).

    The nucleus is found among the `tiers[0]` most likely tokens where it lies there (a
    partial sort), else among the next tier's, and from a full sort otherwise; each gives
    the mask a full sort gives, because the running mass of the k most likely tokens is the
    first k entries of the full running mass.
    """
    if top_p >= 1:
        return probs
    if not tiers or tiers[0] >= probs.shape[-1]:
        return _full_nucleus(probs, top_p)
    top, order = probs.topk(tiers[0], dim=-1)
    mass_before = top.cumsum(dim=-1) - top
    inside = mass_before[:, -1] >= top_p  # the k-th token is already outside the nucleus: it lies in the top k
    out = torch.zeros_like(probs)
    if bool(inside.any()):
        kept = torch.where(mass_before[inside] >= top_p, 0.0, top[inside])  # the most likely token always has mass_before == 0
        out[inside] = out[inside].scatter(-1, order[inside], kept)
    if not bool(inside.all()):
        out[~inside] = _nucleus(probs[~inside], top_p, tiers[1:])
    return out


def _full_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
