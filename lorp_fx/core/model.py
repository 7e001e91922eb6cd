"""Plain facts about a model that every step asks: where its inputs go, what kind of model it is, its mode.

Nothing here changes a model's weights or layout: `eval_mode` switches dropout off for
a while and restores every module's own mode.
"""

from __future__ import annotations

import gc
import sys
from contextlib import contextmanager

import torch
from torch import nn

from lorp_fx.core.errors import InputMismatchError

# --------------------------------------------------------------------------- what kind of model


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


def is_transformers_model(model) -> bool:
    """Whether `model` is a `transformers.PreTrainedModel`. Such a model implies that transformers is imported,
    so the check never imports it (importing its model classes costs seconds: a plain network pays nothing)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def vocabulary_size(model) -> int | None:
    """The number of input embeddings, or None for a network without `get_input_embeddings`."""
    try:
        size = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return None
    return size if isinstance(size, int) else None


def check_token_ids(windows: torch.Tensor, vocabulary: int | None, what: str = "") -> None:
    """InputMismatchError for a token id outside 0 .. vocabulary - 1: the one vocabulary check, made on the
    loaded model (`check_vocabulary`) and before loading, from the model's configuration (the command line)."""
    if vocabulary is None or not windows.numel():
        return
    where = f" in the {what} text" if what else ""
    if int(windows.min()) < 0:
        raise InputMismatchError(f"token id {int(windows.min())}{where} is negative: token ids are indices into the "
                                 f"model's {vocabulary} embeddings, 0 to {vocabulary - 1}")
    if int(windows.max()) >= vocabulary:
        raise InputMismatchError(f"token id {int(windows.max())}{where} is past the model's {vocabulary} embeddings "
                                 f"(0 to {vocabulary - 1}): the tokenizer or the token windows do not match the model")


def check_vocabulary(model, windows: torch.Tensor) -> None:
    """`check_token_ids` against the model's input embeddings (nothing to check without them)."""
    check_token_ids(windows, vocabulary_size(model))


@contextmanager
def eval_mode(model):
    """Eval mode for the duration (dropout off); every module's own mode restored afterwards."""
    modes = {m: m.training for m in model.modules()} if isinstance(model, nn.Module) else {}
    if any(modes.values()):
        try:
            model.eval()
        except NotImplementedError:  # graphs from torch.export: their mode was fixed at export
            modes = {}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


# --------------------------------------------------------------------------- where it is


def model_device(model) -> torch.device:
    """Where the model's inputs go: the input embedding's device (also for a model spread over devices),
    else the first parameter or buffer that is not on the meta device (accelerate may offload the
    embedding), else the CPU."""
    try:
        weight = model.get_input_embeddings().weight
        if weight.device.type != "meta":
            return weight.device
    except (AttributeError, NotImplementedError):
        pass
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.device.type != "meta":
                return tensor.device
    return torch.device("cpu")


def is_offloaded(model: nn.Module) -> bool:
    """True when accelerate keeps some weights off the model (meta tensors filled in by hooks as layers run)."""
    return any(p.device.type == "meta" for p in model.parameters())


def float64_device(device: torch.device) -> torch.device:
    """Where float64 sums of states on `device` are kept: that device, or the CPU for MPS (no float64 there)."""
    return torch.device("cpu") if device.type == "mps" else device


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (offloaded ones too), each shared tensor once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


# --------------------------------------------------------------------------- the device's clock and memory


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock reads the work's time, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def release_memory(device: torch.device, collect: bool = True) -> None:
    """Give freed memory back: the device's cached blocks, and the C heap's free pages (glibc keeps them).

    Between steps, so that a step's freed activations (the sampling KV cache, a batch's
    logits) do not stay resident under the next step's peak. `collect=False` skips the
    garbage collector (tensors without reference cycles are freed when their last reference
    goes; a full collection walks every Python object, 0.1 to 0.5 s after a GGUF load).
    """
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _trim_c_heap()


def _glibc_function(name: str):
    """glibc's function `name`, looked up once; None where the C library is not glibc."""
    if name not in _GLIBC:
        try:
            import ctypes  # only here: glibc's allocator controls

            _GLIBC[name] = getattr(ctypes.CDLL("libc.so.6"), name)
        except (OSError, AttributeError):  # not glibc
            _GLIBC[name] = None
    return _GLIBC[name]


def _trim_c_heap() -> None:
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


_GLIBC: dict = {}

# Allocations at least this large get pages of their own (glibc's mmap), given back the moment they are freed.
# glibc's default threshold starts at 128 KiB and rises to the largest block freed so far (up to 32 MiB): after the
# first freed batch of logits every later one comes from the heap, and the heap's free holes between long-lived
# cached states stay resident. Measured on SmolLM2 (`benchmarks/results/cost-smollm2.md` against
# `cost-smollm2-d9d52ab.md`, one machine): peak RSS over the baseline 1,648 -> 1,355 MiB with the defaults and
# 1,641 -> 1,495 MiB with `--calib-file` at 9 of 30; a candidate's measurement 4.24 s against 4.16 s.
# Below it (a 256-token state of a 576-wide model is 576 KiB) the heap serves as before: mapping and zeroing
# fresh pages for every such state made the same run 42% slower at a 256 KiB threshold.
OWN_PAGES_FROM = 4 * 2**20


def limit_heap_fragmentation(threshold: int = OWN_PAGES_FROM) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process (see OWN_PAGES_FROM); False where the C
    library is not glibc. A process-wide setting: the command line sets it for its own process, a library call
    leaves the caller's process as it is."""
    mallopt = _glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
