"""Calibration: the traced graph and its blocks, the windows (given, read or sampled), and the residual statistics.

The statistics are read by module hooks where families.py lets hooks find every
block: while the model samples its own calibration text (no extra pass), or in one
pass over the text that stops at the last residual point. Elsewhere the graph
observer traces and reads them (one full pass).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from lorp_fx.arch.anatomy import stacks_of
from lorp_fx.arch.surgery import count_layers
from lorp_fx.calibration.batches import accepts_argument, one_window_each
from lorp_fx.calibration.graph_observer import collect_statistics
from lorp_fx.calibration.hook_observer import HookObserver, collect_hook_statistics
from lorp_fx.calibration.sampling import opening_ids, self_calibration
from lorp_fx.core.errors import ConfigError, LoRPError
from lorp_fx.core.model import (
    causal_lm,
    check_vocabulary,
    encoder_decoder,
    model_device,
    weight_bytes,
)
from lorp_fx.core.stats import LayerStatistics
from lorp_fx.graph.blocks import find_blocks
from lorp_fx.graph.trace import skeleton_graph, trace
from lorp_fx.io.corpus import CORPUS_NAME, corpus_windows
from lorp_fx.io.text import text_windows
from lorp_fx.pipeline.config import PruneConfig
from lorp_fx.pipeline.removal import judge_state_bytes

Calibration = torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike] | None


def traced_blocks(model: nn.Module, config: PruneConfig, tokenizer, offloaded: bool, seq_len: int | None = None):
    """(the traced graph, a HookObserver of its blocks), or (None, None) where hooks cannot read the blocks
    (a sublayer of a family families.py does not describe): the graph observer then traces as it calibrates.

    The graph is traced on 2 windows of the calibration shape (`seq_len`, default
    `config.seq_len`: given windows have their own length; token values do not
    matter to a trace), so the windows need not exist yet: self-calibration can be
    watched as it samples. An offloaded model is traced as a meta-device copy.
    """
    if not hook_statistics_possible(model, config.granularity):
        if offloaded:
            raise ConfigError(f"--device-map needs module hooks to read the residual stream, which {type(model).__name__} "
                              f"at granularity {config.granularity} does not allow; use granularity layer")
        return None, None
    example = trace_example(model, seq_len or config.seq_len, tokenizer)
    if _takes_cache(model):
        example["use_cache"] = False
    if offloaded:
        graph = skeleton_graph(model, example)
    else:
        graph = trace(model, example)
    try:
        return graph, HookObserver(model, find_blocks(graph, config.granularity), config.granularity)
    except ConfigError:
        if offloaded:
            raise
        return graph, None


def hook_statistics_possible(model: nn.Module, granularity: str) -> bool:
    """Whole layers can always be hooked; sublayers where families.py names each unit's entry."""
    if granularity == "layer":
        return True
    try:
        stacks_of(model)
        return True
    except LoRPError:
        return False


def _takes_cache(model: nn.Module) -> bool:
    return accepts_argument(model, "use_cache")


def trace_example(model: nn.Module, seq_len: int, tokenizer) -> dict:
    """Two windows of `seq_len` tokens on the model's input device, as calibration batches look."""
    token = 0
    if tokenizer is not None:
        token = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None), 0)
    ids = torch.full((2, seq_len), int(token), dtype=torch.long, device=model_device(model))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if encoder_decoder(model):
        example["decoder_input_ids"] = ids
    return example


class CalibrationText(NamedTuple):
    """A run's calibration windows, in the order the judge takes them (its loss windows first), and where each
    came from: `sources` labels every window ("corpus", "own", "file" or "given"); the maps are never fitted
    on the windows of a `held_only` source (the model's own text beside a user's text: the guard's alone)."""

    windows: torch.Tensor
    source: str
    sources: list[str]
    held_only: frozenset[str]

    def selection_windows(self) -> torch.Tensor:
        """The windows statistics and selection read: all but those of `held_only` sources."""
        keep = [i for i, s in enumerate(self.sources) if s not in self.held_only]
        return self.windows[keep]


OWN_SOURCE = "text the model wrote itself"


def calibration_text(model, calibration: Calibration, config: PruneConfig, tokenizer, progress: bool,
                     observer: HookObserver | None = None, guard: bool = True) -> CalibrationText:
    """The run's calibration windows. Given windows or files are the text selected and fitted on, and, with
    `guard` and a causal LM that can sample (a tokenizer), `config.own_windows` windows the model writes
    itself are added for the compensation guard alone. Without calibration: `config.own_windows` windows of
    the model's own text and the rest from the shipped corpus (`io.corpus`), interleaved, both fitted on;
    with `own_windows >= calib_samples`, the model's own text alone (`observer` then watches it sampled)."""
    if calibration is None:
        own = min(config.own_windows, config.calib_samples)
        if own == config.calib_samples:
            windows, phrase = _own_windows(model, tokenizer, own, config.seq_len, config, progress, observer)
            return CalibrationText(windows, phrase, ["own"] * own, frozenset())
        corpus = corpus_windows(tokenizer, config.calib_samples - own, config.seq_len)
        own += config.calib_samples - own - corpus.shape[0]  # the corpus is short of long windows: own text fills in
        parts, phrase = {"corpus": corpus}, f"{CORPUS_NAME} ({corpus.shape[0]} windows)"
        if own:
            parts["own"], own_phrase = _own_windows(model, tokenizer, own, config.seq_len, config, progress, opened=True)
            phrase += f" and {own_phrase} ({own} windows)"
        windows, sources = interleave(parts)
        check_vocabulary(model, windows)
        return CalibrationText(windows, phrase, sources, frozenset())
    if isinstance(calibration, torch.Tensor):
        windows, phrase, label = calibration, f"given token windows {tuple(calibration.shape)}", "given"
    else:
        paths = [calibration] if isinstance(calibration, (str, os.PathLike)) else list(calibration)
        windows = text_windows(tokenizer, paths, config.calib_samples, config.seq_len)
        phrase, label = "files: " + ", ".join(str(p) for p in paths), "file"
    check_vocabulary(model, windows)
    sources = [label] * windows.shape[0]
    if not guard or not can_sample(model, tokenizer) or config.own_windows == 0:
        return CalibrationText(windows, phrase, sources, frozenset())
    own, own_phrase = _own_windows(model, tokenizer, config.own_windows, windows.shape[1], config, progress, opened=True)
    return CalibrationText(torch.cat([windows, own]), f"{phrase}; checked on {own_phrase} ({own.shape[0]} windows)",
                           sources + ["own"] * own.shape[0], frozenset({"own"}))


def calibration_windows(model, calibration: Calibration, config: PruneConfig, tokenizer, progress: bool,
                        observer: HookObserver | None = None) -> tuple[torch.Tensor, str]:
    """(windows, a phrase naming where they came from): the text to read statistics from, no guard text."""
    text = calibration_text(model, calibration, config, tokenizer, progress, observer, guard=False)
    return text.windows, text.source


def can_sample(model, tokenizer) -> bool:
    """Whether the model can write text of its own: a causal LM with a tokenizer that has a start token."""
    return (tokenizer is not None and causal_lm(model)
            and (tokenizer.bos_token_id is not None or tokenizer.eos_token_id is not None))


def interleave(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    """The windows of every part in one order where each prefix holds each part in about its share (so the
    judge's first windows, its loss windows, hold every source), and each window's part."""
    total = sum(t.shape[0] for t in parts.values())
    order = sorted(((i + 0.5) / t.shape[0], name, i) for name, t in parts.items() for i in range(t.shape[0]))
    assert len(order) == total
    return torch.stack([parts[name][i] for _, name, i in order]), [name for _, name, _ in order]


def _own_windows(model, tokenizer, n: int, seq_len: int, config: PruneConfig, progress: bool,
                 observer: HookObserver | None = None, opened: bool = False) -> tuple[torch.Tensor, str]:
    """(`n` windows the model writes itself, a phrase saying how): from its start token alone where they are the
    whole calibration (REFERENCE.md's self-calibration), or `opened` with the `OPENINGS` the tokenizer spells
    where they stand beside other text (the phrase names the kinds the windows used)."""
    openings = opening_ids(tokenizer) if opened else {}
    sampling = {"seed": config.seed, "progress": progress, "batch_size": sampling_batch_size(model, config),
                "openings": list(openings.values())}
    if observer is None:
        windows = self_calibration(model, tokenizer, n, seq_len, **sampling)
    else:
        with observer.attached():
            windows = self_calibration(model, tokenizer, n, seq_len, **sampling,
                                       after_step=lambda last: observer.add(last_tokens=last))
    check_vocabulary(model, windows)
    if not opened:
        return windows, f"self-generated by the model (seed {config.seed}, temperature 1.0, top-p 0.95)"
    kinds = list(openings)[:n]
    listed = f"{', '.join(kinds[:-1])} or {kinds[-1]}" if len(kinds) > 1 else "".join(kinds)
    return windows, f"{OWN_SOURCE} (seed {config.seed}, temperature 1.0, top-p 0.95{', opening with ' + listed if kinds else ''})"


def sampling_batch_size(model: nn.Module, config: PruneConfig) -> int:
    """Windows sampled together: all of them, unless their KV cache would raise the run's peak memory.

    The run may hold one batch of activations (the float32 logits of `batch_size`
    windows dominate those) plus the larger of 0.3x the weights and the calibration
    states the selection's judge will cache anyway (`removal.judge_state_bytes`): a KV
    cache below that does not raise the peak. Where the cache of all windows is
    larger (a small model with a wide cache judged by the plain loss: SmolLM2's
    32 x 256 windows need 377 MB beside 513 MB of weights), they are sampled in as few
    equal rounds as fit; each round costs nearly as much per step as one of all windows.
    """
    cache = kv_bytes_per_token(model) * config.seq_len * config.calib_samples
    vocabulary = model.get_input_embeddings().num_embeddings
    allowance = max(0.3 * weight_bytes(model), judge_state_bytes(model, config))
    allowance += 4 * config.batch_size * config.seq_len * vocabulary
    rounds = max(1, -(-int(cache) // max(1, int(allowance))))
    return -(-config.calib_samples // rounds)


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of keys and values one token leaves in the cache, over all layers (from the config)."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", 1) or 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dtype_bytes = next(model.parameters()).element_size()
    return 2 * count_layers(model) * kv_heads * head_dim * dtype_bytes




def residual_statistics(model, batches: list[dict], graph, observer: HookObserver | None, sampled: bool,
                        config: PruneConfig, progress: bool) -> tuple[LayerStatistics, torch.fx.GraphModule, str]:
    """(statistics, graph, how they were read): gathered while sampling, one hooked pass, or the graph observer."""
    if observer is not None and sampled and observer.calls:
        return observer.statistics(), graph, "module hooks while the calibration text was sampled (no extra pass)"
    if observer is not None:  # one window per forward call: a quarter of a batch's states and activations held
        stats = collect_hook_statistics(model, observer.blocks, one_window_each(batches), granularity=config.granularity,
                                        progress=progress)
        return stats, graph, "module hooks, one pass stopped at the last residual point"
    stats, graph = collect_statistics(model, batches, granularity=config.granularity, progress=progress)
    return stats, graph, "the traced graph (ResidualObserver), one full pass"


