"""Put changed float weights back into a GGUF file: name mapping, layout, requantization.

Compensation changes a few projections of the pruned `transformers` model. To
write one into the pruned GGUF file we need (1) its GGUF tensor name, from
gguf-py's `TensorNameMap` (the table transformers' GGUF loader uses too); (2) its
layout in the file: llama.cpp's converter stores some tensors transformed (Llama's
q/k projections with their rotary halves interleaved, Gemma's norms plus one,
GPT-2's Conv1D weights transposed), which transformers' tensor processor undoes
on load. Instead of trusting a table of those transforms we try each candidate
and keep the one that transformers' own processor maps back to the given tensor;
(3) a quantization type the gguf package can write: the original one when it can
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16, F16, F32, ...), Q8_0 otherwise (K-quants).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Mapping

import numpy as np
import torch

from lorp_fx.core.errors import GGUFError
from lorp_fx.io.gguf.library import gguf, gguf_package

_FALLBACK = "Q8_0"


def requantize_replaced(
    src, tensors: list, replaced: Mapping[str, Any], notes: list[str], as_type: str | None = None
) -> list[dict]:
    """Replace the data of the output tensors named by `replaced`; return one report entry per tensor.

    `as_type` (a type name such as "Q8_0") overrides the original types: a few
    more bytes for a smaller requantization error.
    """
    gguf_package()  # the optional extra, named where it is missing
    if src.reader.endianess == gguf.GGUFEndian.BIG:
        raise GGUFError(f"{src.path.name} is a big-endian GGUF file; requantizing changed tensors needs a little-endian one")
    forced = _type_named(as_type, gguf.GGMLQuantizationType) if as_type is not None else None
    by_name = {t.name: t for t in tensors}
    to_gguf_name = _name_mapper(src)
    processor = _transformers_processor(src)
    report = []
    for parameter, value in replaced.items():
        name = to_gguf_name(parameter)
        tensor = by_name.get(name)
        if tensor is None:
            raise GGUFError(f"replaced parameter {parameter} maps to GGUF tensor {name}, which the pruned file does not have")
        weights = _as_float_array(value)
        expected = tuple(reversed(tensor.dims))
        if weights.shape != expected:
            raise GGUFError(f"replaced parameter {parameter} has shape {weights.shape}, GGUF tensor {name} needs {expected}")
        stored = _file_layout(weights, name, parameter, processor)
        original = tensor.qtype
        wanted = forced if forced is not None else original
        qtype = _target_type(wanted, tensor.dims[0])
        tensor.data, tensor.qtype = _quantize(stored, qtype), qtype
        tensor.n_bytes = len(tensor.data)
        report.append({"parameter": parameter, "tensor": name, "type": qtype.name, "original_type": original.name})
        if qtype != wanted:
            notes.append(f"{name}: the gguf package cannot write {wanted.name} here, so the compensated tensor is {qtype.name}")
    return report


def _name_mapper(src) -> Callable[[str], str]:
    """transformers parameter name -> GGUF tensor name, via gguf-py's TensorNameMap for this architecture."""
    arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(src.architecture)
    if arch is None:
        raise GGUFError(f"the gguf package does not know architecture {src.architecture!r}; cannot name replaced tensors")
    name_map = gguf.get_tensor_name_map(arch, src.n_layers)

    def to_gguf_name(parameter: str) -> str:
        name = name_map.get_name(parameter, try_suffixes=(".weight", ".bias"))  # keeps the suffix
        if name is None:
            raise GGUFError(f"replaced parameter {parameter} has no GGUF tensor name for {src.architecture}")
        return name

    return to_gguf_name


def _transformers_processor(src):
    """transformers' tensor processor for this architecture, configured from the file's head counts."""
    # Imported here: transformers' GGUF module costs seconds to import, paid only by runs on a GGUF file.
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
    )

    arch = src.architecture
    config = {
        "num_attention_heads": src.meta.get(f"{arch}.attention.head_count"),
        "num_key_value_heads": src.meta.get(f"{arch}.attention.head_count_kv", src.meta.get(f"{arch}.attention.head_count")),
    }
    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)


def _file_layout(weights: np.ndarray, name: str, parameter: str, processor) -> np.ndarray:
    """The array as llama.cpp's converter stores it: the candidate transformers maps back to `weights`."""
    for candidate in _layout_candidates(weights, name, processor.config):
        if candidate.shape != weights.shape:
            continue
        loaded = processor.process(
            weights=candidate.copy(), name=name, tensor_key_mapping={name: parameter},
            parsed_parameters={"config": processor.config, "tensors": {}},
        )
        if loaded.name == name and loaded.weights.shape == weights.shape and np.allclose(loaded.weights, weights, rtol=1e-6, atol=1e-6):
            return candidate
    raise GGUFError(
        f"cannot write replaced parameter {parameter}: transformers transforms GGUF tensor {name} on load in a way "
        "this writer cannot invert"
    )


def _layout_candidates(weights: np.ndarray, name: str, config: dict):
    yield weights
    n_head, n_kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if isinstance(n_head, int) and isinstance(n_kv, int) and (".attn_q." in name or ".attn_k." in name):
        yield _interleave_rotary_halves(weights, n_head if ".attn_q." in name else n_kv)
    if "norm" in name:
        yield weights + 1  # Gemma stores its (1 + w) norm weights with the one added
    if weights.ndim == 2 and weights.shape[0] == weights.shape[1]:
        yield np.ascontiguousarray(weights.T)  # GPT-2's Conv1D weights (square ones; others fail the shape check)


def _interleave_rotary_halves(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Llama's q/k rows per head go from [first half, second half] to interleaved pairs, as llama.cpp stores them."""
    rows = weights.shape[0]
    per_head = weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(weights.shape))


def _type_named(name: str, types):
    if name not in types.__members__:
        raise GGUFError(f"unknown GGUF tensor type {name!r}; use a name such as Q8_0, Q4_1, F16")
    return types[name]


def _target_type(original, row_length: int):
    """The original type where the gguf package quantizes it, else Q8_0 (else F16 when rows do not split in 32s)."""
    if _can_quantize(original) and row_length % gguf.GGML_QUANT_SIZES[original][0] == 0:
        return original
    fallback = gguf.GGMLQuantizationType[_FALLBACK]
    return fallback if row_length % gguf.GGML_QUANT_SIZES[fallback][0] == 0 else gguf.GGMLQuantizationType.F16


@lru_cache(maxsize=None)
def _can_quantize(qtype) -> bool:
    """Ask the gguf package itself: quantize one zero block (it raises NotImplementedError for K-quants etc.)."""

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except (NotImplementedError, ValueError, TypeError, AssertionError):
        return False
    return True


def _quantize(array: np.ndarray, qtype) -> bytes:
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype).tobytes()


def _as_float_array(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().to(device="cpu").float().numpy()
    return np.asarray(value, dtype=np.float32)


def changed_parameters(pruned, compensated) -> dict[str, Any]:
    """The tensors of `compensated` that differ from `pruned` (same architecture): what to pass as `replaced`.

    `pruned` is `surgery.remove_layers(dense, plan).model`, `compensated` the same removal
    with compensation folded in; comparing them finds the folded projections
    without depending on how the compensation names them.
    """
    reference = pruned.state_dict()
    return {
        name: tensor.detach()
        for name, tensor in compensated.state_dict().items()
        if name in reference and not torch.equal(reference[name], tensor)
    }
