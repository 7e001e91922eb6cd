"""Calibration: the traced graph and its blocks, the windows (given, read or sampled), and the residual statistics.

The statistics are read by module hooks where families.py lets hooks find every
block: while the model samples its own calibration text (no extra pass), or in one
pass over the text that stops at the last residual point. Elsewhere the graph
observer traces and reads them (one full pass).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from .blocks import find_blocks
from .config import PruneConfig
from .devices import model_device
from .errors import ConfigError, InputMismatchError, LoRPError
from .hook_observer import HookObserver, collect_hook_statistics
from .observe import collect_statistics
from .stats import LayerStatistics
from .surgery import count_layers

Calibration = torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike] | None


def check_vocabulary(model: nn.Module, windows: torch.Tensor) -> None:
    vocabulary = model.get_input_embeddings().num_embeddings
    if not windows.numel():
        return
    if int(windows.min()) < 0:
        raise InputMismatchError(f"token id {int(windows.min())} is negative: token ids are indices into the model's "
                                 f"{vocabulary} embeddings, 0 to {vocabulary - 1}")
    if int(windows.max()) >= vocabulary:
        raise InputMismatchError(
            f"the tokenizer produces token id {int(windows.max())} but the model has {vocabulary} embeddings: "
            "tokenizer and model do not match"
        )


def encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def causal_lm(model: nn.Module) -> bool:
    """Whether `model` predicts the next token, as the calibration loss, self-calibration and perplexity
    assume: not an encoder-decoder, and a `transformers` model that can generate (a masked LM such as
    `BertForMaskedLM` cannot; `BertLMHeadModel` can). Any other network is taken at its outputs."""
    if encoder_decoder(model):
        return False
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else True


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
        from .offload import skeleton_graph

        graph = skeleton_graph(model, example)
    else:
        from .trace import trace

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
        from .compensation.structure import stacks_of

        stacks_of(model)
        return True
    except LoRPError:
        return False


def _takes_cache(model: nn.Module) -> bool:
    from .batches import accepts_argument

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


def calibration_windows(model, calibration: Calibration, config: PruneConfig, tokenizer, progress: bool,
                        observer: HookObserver | None = None) -> tuple[torch.Tensor, str]:
    """(windows, a phrase naming where they came from). With `observer`, self-calibration is watched as it samples."""
    from .data import self_calibration, text_windows

    if isinstance(calibration, torch.Tensor):
        windows, source = calibration, f"given token windows {tuple(calibration.shape)}"
    elif calibration is None:
        sampling = {"seed": config.seed, "progress": progress, "batch_size": sampling_batch_size(model, config)}
        if observer is None:
            windows = self_calibration(model, tokenizer, config.calib_samples, config.seq_len, **sampling)
        else:
            with observer.attached():
                windows = self_calibration(model, tokenizer, config.calib_samples, config.seq_len, **sampling,
                                           after_step=lambda last: observer.add(last_tokens=last))
        source = f"self-generated by the model (seed {config.seed}, temperature 1.0, top-p 0.95)"
    else:
        paths = [calibration] if isinstance(calibration, (str, os.PathLike)) else list(calibration)
        windows = text_windows(tokenizer, paths, config.calib_samples, config.seq_len)
        source = "files: " + ", ".join(str(p) for p in paths)
    check_vocabulary(model, windows)
    return windows, source


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
    from .devices import weight_bytes
    from .removal import judge_state_bytes

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


def on_device(batches: list[dict], device: torch.device) -> list[dict]:
    """The batches' tensors on `device` (token ids: a few kilobytes per batch)."""
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in batches]


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
