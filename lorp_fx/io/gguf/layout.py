"""What llama.cpp reads per layer from a GGUF file, and what it derives from a layer's index.

Removing layers from a GGUF file renumbers the kept ones (`blk.7` becomes `blk.5`).
That is harmless for a property the file states per layer, provided its array is
shortened the same way; it silently changes the model for a property llama.cpp
computes from the index or from the layer count. The facts below come from
llama.cpp's loader (read, not copied; llama-cpp-python 0.3.36's vendored copy):

* src/llama-model.cpp `load_hparams` and `llama_model_loader::get_key_or_arr`
  (src/llama-model-loader.cpp): `feed_forward_length`, `attention.head_count`,
  `attention.head_count_kv`, `expert_used_count` may be arrays; an array whose
  length differs from `block_count` is a load error ("wrong array length").
* src/models/<arch>.cpp `load_arch_hparams`: further per-layer arrays
  (`expert_feed_forward_length`, `swiglu_clamp_*`, `attention.recurrent_layers`,
  `xielu.*`, ...), and the index-derived properties in `INDEX_RULES`.
* `llama_model_base::load_swa_pattern` + `llama_hparams::set_swa_pattern`: the
  sliding-window layers follow a period (Gemma-3: 5 local then 1 global) unless
  `<arch>.attention.sliding_window_pattern` is an array (one flag per layer,
  true = sliding window), which then wins. Older llama.cpp builds and
  transformers' GGUF loader ignore that array and always use the period.
* `nextn_predict_layers` (multi-token-prediction layers) are the last blocks;
  `leading_dense_block_count` counts dense blocks at the front of MoE models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from lorp_fx.core.errors import GGUFError

# Arrays llama.cpp reads with one entry per layer, as "<arch>." + suffix (or a full key).
PER_LAYER_SUFFIXES = (
    "feed_forward_length", "attention.head_count", "attention.head_count_kv", "expert_used_count",
    "expert_feed_forward_length", "swiglu_clamp_exp", "swiglu_clamp_shexp", "attention.recurrent_layers",
    "attention.sliding_window_pattern", "attention.rope_pattern", "attention.compress_ratios",
    "attention.indexer.types", "deepstack_mapping", "ple.layer_multipliers",
)
PER_LAYER_KEYS = ("xielu.alpha_n", "xielu.alpha_p", "xielu.beta", "xielu.eps")
# Arrays that are not per layer even when their length happens to equal the layer count.
NOT_PER_LAYER_SUFFIXES = ("rope.dimension_sections", "classifier.output_labels", "ple.layers")


@dataclass(frozen=True)
class IndexRule:
    """A per-layer property llama.cpp derives from the layer index (and maybe the layer count).

    `role(index, n_layers, period)` gives the property; `period_key` (a suffix) is the
    metadata key holding the period, `default_period` what llama.cpp assumes without
    it. `explicit_suffix` names the per-layer array llama.cpp reads instead, if any;
    `applies(meta, arch)` says whether the rule is in force for this file.
    """

    what: str
    role: Callable[[int, int, int], bool]
    default_period: int
    period_key: str | None = None
    explicit_suffix: str | None = None
    applies: Callable[[Mapping[str, Any], str], bool] = lambda meta, arch: True


def _swa(dense_first: bool = False) -> Callable[[int, int, int], bool]:
    # llama_hparams::set_swa_pattern: period 0 = all sliding, else one dense layer per period.
    if dense_first:
        return lambda i, n, p: p == 0 or i % p != 0
    return lambda i, n, p: p == 0 or i % p < p - 1


def _sliding_window_on(default: int | None) -> Callable[[Mapping[str, Any], str], bool]:
    """The SWA pattern matters only when the sliding window is on (key > 0, or absent with a default)."""
    return lambda meta, arch: (meta.get(f"{arch}.attention.sliding_window", default) or 0) > 0


def _swa_rule(period: int, dense_first: bool = False, window_default: int | None = 1) -> IndexRule:
    return IndexRule(
        "sliding-window vs global attention", _swa(dense_first), period,
        period_key="attention.sliding_window_pattern", explicit_suffix="attention.sliding_window_pattern",
        applies=_sliding_window_on(window_default),
    )


# No key can state these per layer: a removal that changes them is refused.
_NO_ROPE_EVERY = IndexRule("no-RoPE layers (every period-th layer)", lambda i, n, p: (i + 1) % p == 0, 4)
_RECURRENT_BY_INTERVAL = lambda period: IndexRule(  # noqa: E731 - a small rule factory
    "recurrent vs full-attention layers", lambda i, n, p: (i + 1) % p != 0, period,
    period_key="full_attention_interval", explicit_suffix="attention.recurrent_layers",
    applies=lambda meta, arch: f"{arch}.attention.recurrent_layers" not in meta,
)

INDEX_RULES: dict[str, tuple[IndexRule, ...]] = {
    "gemma2": (_swa_rule(2),),
    "gemma3": (_swa_rule(6, window_default=0),),
    "gemma-embedding": (_swa_rule(6),),
    "cohere2": (_swa_rule(4),),
    "cohere2moe": (_swa_rule(4, dense_first=True),),
    "gpt-oss": (_swa_rule(2),),
    "olmo2": (_swa_rule(4, window_default=0),),
    "plamo3": (_swa_rule(8, window_default=0),),
    "afmoe": (_swa_rule(4, window_default=0), _NO_ROPE_EVERY),
    "mellum": (_swa_rule(4, window_default=0),),
    "muse-glimmer": (_swa_rule(4),),
    "exaone-moe": (_swa_rule(4),),
    "laguna": (_swa_rule(4, dense_first=True, window_default=0),),
    "modern-bert": (_swa_rule(3, dense_first=True, window_default=0),),
    "smallthinker": (
        _swa_rule(4, dense_first=True, window_default=0),
        IndexRule("no-RoPE layers", lambda i, n, p: i % p == 0, 4, applies=_sliding_window_on(0)),
        IndexRule("no-RoPE first layer", lambda i, n, p: i % n == 0, 0,
                  applies=lambda meta, arch: not _sliding_window_on(0)(meta, arch)),
    ),
    "llama4": (
        IndexRule("MoE vs dense layers", lambda i, n, p: p > 0 and (i + 1) % p == 0, 0,
                  period_key="interleave_moe_layer_step"),
        _swa_rule(4, window_default=1),
        IndexRule("no-RoPE layers", lambda i, n, p: (i + 1) % p == 0, 4, applies=_sliding_window_on(1)),
        IndexRule("no-RoPE last layer", lambda i, n, p: i == n - 1, 0,
                  applies=lambda meta, arch: not _sliding_window_on(1)(meta, arch)),
    ),
    "smollm3": (_NO_ROPE_EVERY,),
    "ernie4_5-moe": (
        IndexRule("MoE vs dense layers", lambda i, n, p: p > 0 and (i + 1) % p == 0, 0,
                  period_key="interleave_moe_layer_step"),
    ),
    "nomic-bert-moe": (
        IndexRule("MoE vs dense layers", lambda i, n, p: p > 0 and i % p == 1, 0, period_key="moe_every_n_layers"),
    ),
    "rwkv6": (
        IndexRule("halved residual every period-th layer", lambda i, n, p: p > 0 and (i + 1) % p == 0, 0,
                  period_key="rescale_every_n_layers"),
    ),
    "qwen3next": (_RECURRENT_BY_INTERVAL(4),),
    "qwen35": (_RECURRENT_BY_INTERVAL(4),),
    "qwen35moe": (_RECURRENT_BY_INTERVAL(4),),
}

# Architectures whose layers cannot be dropped from the file at all, and why.
REFUSED_ARCHITECTURES = {
    "gemma3n": "llama.cpp shares the KV cache from layer 20 on and sizes per-layer embeddings by the layer count",
    "gemma4": "llama.cpp shares the KV cache of the last layers and sizes per-layer embeddings by the layer count",
    "t5": "its blocks are split into encoder and decoder stacks (enc.blk / dec.blk)",
    "t5encoder": "its blocks are named enc.blk, which this writer does not renumber",
    "baichuan": "llama.cpp chooses Baichuan's position encoding (RoPE or ALiBi) from the layer count",
    "minicpm3": "llama.cpp scales MiniCPM3's residual stream by the layer count",
    "minimax-01": "llama.cpp derives MiniMax-01's ALiBi slopes from each layer's index over the layer count",
}


@dataclass
class LayoutEdits:
    """Metadata to rewrite for a removal: new values by key, and notes for the report."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan_metadata(arch: str, meta: Mapping[str, Any], keep: list[int], n_layers: int) -> LayoutEdits:
    """The metadata edits that keep every kept layer's role, or a GGUFError saying why there are none.

    `meta` maps keys to plain values (lists for arrays); `keep` are the kept source
    layers, ascending; `n_layers` is the source `block_count`.
    """
    if arch in REFUSED_ARCHITECTURES:
        raise GGUFError(f"cannot remove layers from a {arch} GGUF file: {REFUSED_ARCHITECTURES[arch]}")
    _refuse_count_dependent(arch, meta, n_layers)
    edits = LayoutEdits()
    edits.values[f"{arch}.block_count"] = len(keep)
    n_main = _check_nextn(arch, meta, keep, n_layers)
    _update_dense_lead(arch, meta, keep, edits)
    _slice_per_layer_arrays(arch, meta, keep, n_layers, edits)
    _pin_layer_count_scale(arch, meta, n_layers, edits)
    main_keep = [i for i in keep if i < n_main]
    for rule in INDEX_RULES.get(arch, ()):
        if rule.applies(meta, arch):
            _keep_index_roles(arch, meta, rule, main_keep, n_main, len(keep) - (n_layers - n_main), edits)
    return edits


def period_conflicts(arch: str, meta: Mapping[str, Any], n_layers: int) -> list[str]:
    """Per-layer role arrays in the file that differ from what the index rule gives (readers that use the rule misread them)."""
    conflicts = []
    for rule in INDEX_RULES.get(arch, ()):
        key = f"{arch}.{rule.explicit_suffix}" if rule.explicit_suffix else None
        stated = meta.get(key) if key else None
        if isinstance(stated, list) and rule.applies(meta, arch):
            period = _period(arch, {k: v for k, v in meta.items() if k != key}, rule)
            if [bool(v) for v in stated] != [rule.role(i, n_layers, period) for i in range(n_layers)]:
                conflicts.append(f"{key} does not follow the period {period}")
    return conflicts


def is_per_layer_array(arch: str, key: str, value: Any, n_layers: int) -> bool:
    """Whether `key` is a metadata array with one entry per layer (known, or under `<arch>.` with that length)."""
    if not isinstance(value, list):
        return False
    if key in PER_LAYER_KEYS or any(key == f"{arch}.{s}" for s in PER_LAYER_SUFFIXES):
        return True
    if any(key == f"{arch}.{s}" for s in NOT_PER_LAYER_SUFFIXES):
        return False
    return key.startswith(f"{arch}.") and len(value) == n_layers


def _slice_per_layer_arrays(arch, meta, keep, n_layers, edits: LayoutEdits) -> None:
    for key, value in meta.items():
        if not is_per_layer_array(arch, key, value, n_layers):
            continue
        if len(value) != n_layers:
            raise GGUFError(
                f"metadata array {key} has {len(value)} entries but block_count is {n_layers}: "
                "the input file is inconsistent (llama.cpp would not load it either)"
            )
        edits.values[key] = [value[i] for i in keep]


def _refuse_count_dependent(arch: str, meta: Mapping[str, Any], n_layers: int) -> None:
    """Refuse where llama.cpp switches behaviour on the exact layer count (src/models/<arch>.cpp)."""
    big_gemma = {"gemma2": 46, "gemma3": 62}  # the 27B models get another attention scale
    if big_gemma.get(arch) == n_layers:
        n_embd, n_head = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.attention.head_count")
        head_dim = meta.get(f"{arch}.attention.key_length")
        n_head = n_head[0] if isinstance(n_head, list) else n_head
        if n_embd and n_head and head_dim and n_embd // n_head != head_dim:
            raise GGUFError(
                f"cannot remove layers from this {arch} file: llama.cpp picks its 27B attention scale from the "
                f"layer count ({n_layers}), so a pruned file would run with a different scale"
            )
    if arch == "exaone4" and n_layers == 64 and f"{arch}.attention.sliding_window" in meta:
        raise GGUFError(
            "cannot remove layers from this exaone4 file: llama.cpp turns sliding-window attention on only "
            "for exactly 64 layers"
        )


def _pin_layer_count_scale(arch: str, meta: Mapping[str, Any], n_layers: int, edits: LayoutEdits) -> None:
    """MiniCPM's default residual scale is 1.4/sqrt(layer count); state the original one explicitly."""
    key = f"{arch}.residual_scale"
    if arch == "minicpm" and key not in meta:
        edits.values[key] = 1.4 / math.sqrt(n_layers)
        edits.notes.append(f"wrote {key} = 1.4/sqrt({n_layers}): llama.cpp would otherwise derive it from the new layer count")


def _check_nextn(arch: str, meta: Mapping[str, Any], keep: list[int], n_layers: int) -> int:
    """The number of main layers; the multi-token-prediction layers after them must all stay."""
    n_nextn = int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
    n_main = n_layers - n_nextn
    if n_nextn and sum(1 for i in keep if i >= n_main) != n_nextn:
        raise GGUFError(
            f"layers {n_main}..{n_layers - 1} are {arch}'s multi-token-prediction layers "
            f"({arch}.nextn_predict_layers = {n_nextn}); remove only layers below {n_main}"
        )
    return n_main


def _update_dense_lead(arch: str, meta: Mapping[str, Any], keep: list[int], edits: LayoutEdits) -> None:
    """Dense blocks come first: after a removal, the kept ones are still a prefix, just shorter."""
    key = f"{arch}.leading_dense_block_count"
    if key in meta:
        edits.values[key] = sum(1 for i in keep if i < int(meta[key]))


def _keep_index_roles(arch, meta, rule: IndexRule, keep: list[int], n_old: int, n_new: int, edits: LayoutEdits) -> None:
    """Compare each kept layer's role before and after renumbering; write the explicit array or refuse."""
    explicit_key = f"{arch}.{rule.explicit_suffix}" if rule.explicit_suffix else None
    if explicit_key is not None and isinstance(meta.get(explicit_key), list):
        return  # the file already states the role per layer; _slice_per_layer_arrays shortened it
    period = _period(arch, meta, rule)
    before = [rule.role(i, n_old, period) for i in keep]
    after = [rule.role(j, n_new, period) for j in range(len(keep))]
    if before == after:
        return
    if explicit_key is None:
        moved = [i for i, b, a in zip(keep, before, after) if b != a]
        raise GGUFError(
            f"this removal would change the {rule.what} of layers {_short(moved)}: llama.cpp derives them from "
            f"the layer index for {arch} and no metadata key can state them; {_advice(period)}"
        )
    edits.values[explicit_key] = [bool(flag) for flag in before]
    edits.notes.append(
        f"wrote {explicit_key} per layer to keep the {rule.what}; only llama.cpp builds that read this array "
        f"run the file as intended (transformers' GGUF loader and older llama.cpp use the period, {period}); {_advice(period)}"
    )


def _period(arch: str, meta: Mapping[str, Any], rule: IndexRule) -> int:
    value = meta.get(f"{arch}.{rule.period_key}") if rule.period_key else None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else rule.default_period


def _advice(period: int) -> str:
    if period <= 1:
        return "keep the first and last layers"
    return f"removing whole periods of {period} layers (e.g. layers {period}..{2 * period - 1}) keeps the pattern"


def _short(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:6]))
    return shown + (", ..." if len(indices) > 6 else "")
