"""Tiny GGUF files written with the `gguf` package, for the GGUF export tests (nothing is downloaded).

The tensors are random, in the names and shapes llama.cpp uses (gguf-py's
`TENSOR_NAMES`), and in a mix of quantization types, including one the gguf
package can only read (Q4_K, written from valid random blocks). The tokenizer is
a byte-level BPE over the 256 byte symbols plus three special tokens and a few
merges: enough for `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 4, 2, 16, 256

# Llama: a different type for each projection, so every copy path is exercised.
LLAMA_TYPES = {
    "token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q5_0, "attn_output": Q.Q5_1,
    "ffn_gate": Q.F16, "ffn_up": Q.BF16, "ffn_down": Q.Q4_K,
}
LLAMA_LAYER_TENSORS = {
    "attn_norm": (HIDDEN,), "attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HIDDEN), "ffn_norm": (HIDDEN,),
    "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
}
# Gemma-3's head size is 256 in every released model, and transformers' GGUF loader assumes the
# matching attention scale (query_pre_attn_scalar = 256): keep it so llama.cpp and transformers agree.
GEMMA3_HEAD_DIM = 256


def gemma3_layer_tensors(head_dim: int = GEMMA3_HEAD_DIM) -> dict:
    return {
        "attn_norm": (HIDDEN,), "attn_q": (HEADS * head_dim, HIDDEN), "attn_q_norm": (head_dim,),
        "attn_k": (KV_HEADS * head_dim, HIDDEN), "attn_k_norm": (head_dim,), "attn_v": (KV_HEADS * head_dim, HIDDEN),
        "attn_output": (HIDDEN, HEADS * head_dim), "post_attention_norm": (HIDDEN,), "ffn_norm": (HIDDEN,),
        "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN), "post_ffw_norm": (HIDDEN,),
    }


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """Three special tokens, the 256 byte symbols of byte-level BPE, and a few merges."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    merges = ["Ġ t", "h e", "Ġt he"]
    return ["<unk>", "<s>", "</s>", *symbols, "Ġt", "he", "Ġthe"], merges


def write_tiny_gguf(
    path: str | Path,
    arch: str = "llama",
    n_layers: int = 6,
    types: dict[str, Q] | None = None,
    per_layer: dict[str, list[int]] | None = None,
    extra: dict | None = None,
    seed: int = 0,
    alignment: int | None = None,
) -> Path:
    """A complete little model file; `per_layer` writes those `<arch>.` keys as arrays instead of scalars."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    writer = GGUFWriter(path, arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    _add_metadata(writer, arch, n_layers, per_layer or {}, extra or {})
    types = dict(LLAMA_TYPES if arch == "llama" else {"token_embd": Q.Q8_0}, **(types or {}))
    tokens, _ = byte_level_vocab()
    _add_tensor(writer, "token_embd.weight", rng.normal(0, 0.5, (len(tokens), HIDDEN)), types.get("token_embd", Q.F32), rng)
    layer_tensors = gemma3_layer_tensors() if arch == "gemma3" else LLAMA_LAYER_TENSORS
    for layer in range(n_layers):
        for kind, shape in layer_tensors.items():
            scale = 0.1 if len(shape) == 1 else 1 / np.sqrt(shape[1])
            values = rng.normal(1.0 if len(shape) == 1 and arch == "llama" else 0.0, scale, shape)
            qtype = types.get(kind, Q.F32) if len(shape) > 1 else Q.F32
            _add_tensor(writer, f"blk.{layer}.{kind}.weight", values, qtype, rng)
    _add_tensor(writer, "output_norm.weight", rng.normal(1.0, 0.1, (HIDDEN,)), Q.F32, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_metadata(writer: GGUFWriter, arch: str, n_layers: int, per_layer: dict, extra: dict) -> None:
    tokens, merges = byte_level_vocab()
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(n_layers)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(per_layer.get("feed_forward_length", FFN))
    writer.add_head_count(per_layer.get("attention.head_count", HEADS))
    writer.add_head_count_kv(per_layer.get("attention.head_count_kv", KV_HEADS))
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if arch == "gemma3":
        writer.add_key_length(GEMMA3_HEAD_DIM)
        writer.add_value_length(GEMMA3_HEAD_DIM)
        writer.add_sliding_window(4)
    else:
        writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for key, value in extra.items():
        if isinstance(value, list):
            writer.add_array(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)


def _add_tensor(writer: GGUFWriter, name: str, values: np.ndarray, qtype: Q, rng) -> None:
    values = values.astype(np.float32)
    if qtype == Q.F32:
        writer.add_tensor(name, values)
    elif qtype == Q.F16:
        writer.add_tensor(name, values.astype(np.float16))
    elif qtype == Q.Q4_K:
        writer.add_tensor(name, _random_q4_k(values.shape, rng), raw_dtype=Q.Q4_K)
    else:
        writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)


def _random_q4_k(shape: tuple[int, ...], rng) -> np.ndarray:
    """Valid Q4_K blocks (256 values, 144 bytes: f16 scale, f16 min, 12 bytes of sub-scales, 128 of nibbles)."""
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    scales = np.full((rows, cols // 256, 2), 0.002, dtype=np.float16).view(np.uint8)
    blocks[:, :, :4] = scales.reshape(rows, cols // 256, 4)
    return blocks.reshape(rows, cols // 256 * 144)
