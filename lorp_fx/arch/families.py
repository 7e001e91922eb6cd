"""Every supported model family, described once.

A `Family` says where a `transformers` model keeps its residual layers, which
residual sublayers ("units") each layer has and in what order, which module
reads the stream entering each unit, which projections write a unit's branch
output back to the stream, where the norms sit, and which config fields or
weights depend on a layer's index or on a stack's depth. Checkpoint surgery
(`surgery.py`), compensation (`compensation/`) and GGUF writing read this table
and nothing else; adding a family is one entry here plus its tests.

A model whose `config.model_type` is not in the table gets `GENERIC`: its layer
lists are found from the config's layer count, whole layers can be removed, and
sublayer removal and compensation are refused with a message naming this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lorp_fx.core.errors import ConfigError, NoResidualBlocksError, NotRemovableError


@dataclass(frozen=True)
class Unit:
    """One residual sublayer `x + branch(x)` of a layer, by attribute path relative to the layer.

    `entry` is the module whose first input is the stream entering the unit ("" when
    the unit module itself receives it, as T5's `T5LayerFF`). `branch_norm` is a norm
    applied to the branch output before the add (Gemma's "sandwich" norms), None when
    the projection writes the stream directly. `optional` units exist only in some
    layers (GPT-2's cross-attention, the third unit of a T5 decoder block).
    """

    name: str
    entry: str = ""
    branch_norm: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class Family:
    """How one architecture is laid out (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    stacks: tuple[str, ...]  # paths (or path suffixes) of the layer lists, encoder first
    units: tuple[Unit, ...]
    norm: str  # "pre": x + f(norm(x)); "post": norm(x + f(x)) (BERT); "sandwich": x + norm(f(norm(x))) (Gemma)
    output_projections: frozenset[str] = frozenset()
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    per_layer_config: tuple[str, ...] = ("layer_types",)
    causal_lm: bool = True
    # Hooks for what a layer derives from its index at construction time (see `renumber`).
    renumber_config: Callable | None = field(default=None, compare=False)
    renumber_layer: Callable | None = field(default=None, compare=False)
    # Hook for what the model's configs need once every stack has its new depth (see `finish_configs`).
    finish_config: Callable | None = field(default=None, compare=False)
    # Why the family cannot be calibrated in float16 (None: it can).
    no_float16: str | None = None

    @property
    def described(self) -> bool:
        return self is not GENERIC


# --------------------------------------------------------------------------- index-dependent properties


def _qwen2_moe_layer_kinds(config, keep: list[int]) -> None:
    """Keep every kept layer's MoE-or-dense kind when Qwen2-MoE-style configs are renumbered.

    Those models build layer i as sparse MoE when `i not in mlp_only_layers` and
    `(i + 1) % decoder_sparse_step == 0`. Encoding the kinds explicitly, with
    `decoder_sparse_step = 1` and `mlp_only_layers` = the new indices of the dense
    layers, reproduces the kept layers' kinds for any removal.
    """
    only_dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    has_experts = (getattr(config, "num_experts", 0) or 0) > 0

    def was_sparse(i: int) -> bool:
        return has_experts and i not in only_dense and (i + 1) % step == 0

    config.mlp_only_layers = [new for new, old in enumerate(keep) if not was_sparse(old)]
    config.decoder_sparse_step = 1


@torch.no_grad()
def _gpt2_inverse_index_scaling(layer: nn.Module, old_index: int, new_index: int) -> None:
    """GPT-2 with `scale_attn_by_inverse_layer_idx` scales scores by 1/(layer_idx+1).

    The reloaded layer uses its new index, so the ratio of the two scales is folded
    into the query projection: (q * r) . k / (new+1) == q . k / (old+1).
    """
    for attn in layer.modules():
        if not getattr(attn, "scale_attn_by_inverse_layer_idx", False):
            continue
        ratio = (new_index + 1) / (old_index + 1)
        if attn.is_cross_attention:
            attn.q_attn.weight.mul_(ratio)
            attn.q_attn.bias.mul_(ratio)
        else:
            width = attn.embed_dim  # Conv1D weight is (in, out); q is the first third of out
            attn.c_attn.weight[:, :width].mul_(ratio)
            attn.c_attn.bias[:width].mul_(ratio)
        attn.scaling = attn.scaling * (old_index + 1) / (new_index + 1)


def _t5_decoder_cache_depth(model: nn.Module) -> None:
    """Make T5's decoder KV cache as deep as the decoder, not the encoder.

    `generate` (and the decoder stack, when called with `use_cache` and no cache)
    sizes the cache from `config.get_text_config(decoder=True)`, whose layer count
    is `num_hidden_layers`, which T5Config maps to `num_layers`: the encoder's
    depth. An encoder left shallower than the decoder then gives a cache with too
    few layers (IndexError in `generate`; a dense T5 with num_layers <
    num_decoder_layers fails the same way). For a flat encoder-decoder config,
    `get_text_config(decoder=True)` turns a `decoder_layers` field into the decoder
    view's `num_hidden_layers` (the rule BART-style configs rely on), so recording
    the decoder depth there sizes the cache right in memory and after
    `from_pretrained`, while `num_layers` keeps the encoder depth its weights need.
    Every copy is set: each T5 stack holds a deep copy of the model's config, and
    the decoder stack's copy is the one it builds a cache from.
    """
    top = getattr(model, "config", None)
    depth = getattr(top, "num_decoder_layers", None)
    if not isinstance(depth, int):
        return
    configs = {id(top): top}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "num_decoder_layers"):
            configs[id(config)] = config
    for config in configs.values():
        config.decoder_layers = depth


# --------------------------------------------------------------------------- the table

_LLAMA_UNITS = (Unit("self_attn", entry="input_layernorm"), Unit("mlp", entry="post_attention_layernorm"))
_LLAMA_PROJECTIONS = frozenset({"o_proj", "down_proj"})

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    stacks=("layers",),
    units=_LLAMA_UNITS,
    norm="pre",
    output_projections=_LLAMA_PROJECTIONS,
)
# The Llama layout with mixture-of-experts MLPs: the same units and projections (experts.down_proj is a fused
# (experts, out, in) parameter).
MIXTRAL = dataclasses.replace(LLAMA, name="mixtral", model_types=("mixtral",))
# Fused experts and the shared expert's down_proj; which layers are sparse follows from their index.
QWEN2_MOE = dataclasses.replace(LLAMA, name="qwen2_moe", model_types=("qwen2_moe",), renumber_config=_qwen2_moe_layer_kinds)
GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3_text", "gemma2"),
    stacks=("layers",),
    units=(
        Unit("self_attn", entry="input_layernorm", branch_norm="post_attention_layernorm"),
        Unit("mlp", entry="pre_feedforward_layernorm", branch_norm="post_feedforward_layernorm"),
    ),
    norm="sandwich",
    output_projections=_LLAMA_PROJECTIONS,
    norm_weight_offset=1.0,
)
GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    stacks=("h",),
    units=(
        Unit("attn", entry="ln_1"),
        Unit("crossattention", entry="ln_cross_attn", optional=True),
        Unit("mlp", entry="ln_2"),
    ),
    norm="pre",
    output_projections=frozenset({"c_proj"}),
    renumber_layer=_gpt2_inverse_index_scaling,
)
T5 = Family(
    name="t5",
    model_types=("t5",),
    stacks=("encoder.block", "decoder.block"),
    # x + dropout(f(layer_norm(x))) inside each T5Layer*, which receives x itself.
    units=(Unit("layer.0"), Unit("layer.1"), Unit("layer.2", optional=True)),
    norm="pre",
    output_projections=frozenset({"o", "wo"}),
    causal_lm=False,
    finish_config=_t5_decoder_cache_depth,
    no_float16=("T5 clamps its activations in float16 against overflow, which hides its residual adds from the graph "
                "(the blocks found are wrong); use bfloat16 or float32"),
)
BERT = Family(
    name="bert",
    model_types=("bert",),
    stacks=("encoder.layer",),
    units=(),  # post-norm: a zeroed or mapped branch would still pass through the norm after the add
    norm="post",
    causal_lm=False,
)
GENERIC = Family(name="generic", model_types=(), stacks=(), units=(), norm="unknown")

FAMILIES: tuple[Family, ...] = (LLAMA, MIXTRAL, QWEN2_MOE, GEMMA3, GPT2, T5, BERT)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(model: nn.Module) -> Family:
    """The family of a `transformers` model, from its `config.model_type` (GENERIC if unknown)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _BY_MODEL_TYPE.get(model_type, GENERIC)


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


# --------------------------------------------------------------------------- layer lists


def layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The residual-layer lists of a `transformers` model, as (module path, ModuleList), encoder first.

    Layer `i` of a list at path `p` is the block named `f"{p}.{i}"`. A described
    family names its lists; otherwise a list of identical modules whose length is
    a layer count of its owner's config is taken.
    """
    family = family_of(model)
    found = _named_stacks(model, family.stacks) if family.described else []
    found = found or _counted_stacks(model)
    if not found:
        raise NoResidualBlocksError(
            f"found no residual-layer list in {type(model).__name__}: expected an nn.ModuleList whose length is the "
            f"config's layer count (described families: {', '.join(supported_model_types())})"
        )
    return found


def _named_stacks(model: nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, nn.ModuleList]]:
    modules = dict(model.named_modules())
    found = []
    for suffix in suffixes:
        matches = [p for p, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) and (p == suffix or p.endswith("." + suffix))]
        outermost = [p for p in matches if not any(p.startswith(q + ".") for q in matches if q != p)]
        if len(outermost) != 1:
            return []  # ambiguous or absent: let the config count decide
        found.append((outermost[0], modules[outermost[0]]))
    return found


def _layer_counts(config) -> set[int]:
    counts = set()
    for key in ("num_hidden_layers", "num_decoder_layers"):
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            counts.add(value)
    return counts


def _counted_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists of identical modules whose length is a layer count of their owner's config.

    The owner (the module holding the list) is asked first because T5's stacks each
    carry their own config; lists nested in an accepted one are skipped.
    """
    top_counts = _layer_counts(getattr(model, "config", None))
    found: list[tuple[str, nn.ModuleList]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(prefix + ".") for prefix, _ in found) or len({type(m) for m in module}) != 1:
            continue
        owner_counts = _layer_counts(getattr(owner_of(model, path), "config", None))
        if len(module) in (owner_counts or top_counts):
            found.append((path, module))
    return found


def owner_of(model: nn.Module, path: str) -> nn.Module:
    """The module that holds the child at `path`."""
    parent = path.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


# --------------------------------------------------------------------------- units


def layer_units(family: Family, layer: nn.Module) -> list[Unit]:
    """The units present in `layer`, in the order they run."""
    present = []
    for unit in family.units:
        module = _maybe_submodule(layer, unit.name)
        if module is None:
            if unit.optional:
                continue
            raise NoResidualBlocksError(
                f"{type(layer).__name__} has no {unit.name!r}, which lorp_fx/families.py describes for {family.name}"
            )
        present.append(unit)
    return present


def check_dtype(model_type: str | None, dtype) -> None:
    """ConfigError where the family of `model_type` cannot be calibrated in `dtype` (from the config alone)."""
    why = _BY_MODEL_TYPE.get(model_type, GENERIC).no_float16
    if dtype == torch.float16 and why is not None:
        raise ConfigError(f"cannot calibrate a {model_type} model in float16: {why}")


def check_sublayer_pruning(model: nn.Module) -> None:
    """NotRemovableError where `model`'s family can lose whole layers only (`whole_layers_only`): what
    `prune_model` and `LoRPCallback` refuse before any work when asked to prune by sublayers."""
    why = whole_layers_only(getattr(getattr(model, "config", None), "model_type", None))
    if why is not None:
        raise NotRemovableError(f"cannot prune {type(model).__name__} by sublayers: {why}; use granularity='layer'")


def whole_layers_only(model_type: str | None) -> str | None:
    """Why a model of `model_type` cannot lose single sublayers (None when it can).

    Known from the config alone, so the command line refuses `--granularity sublayer`
    before any weights load, and `prune_model` before any calibration.
    """
    family = _BY_MODEL_TYPE.get(model_type, GENERIC)
    if family.units:
        return None
    if family.norm == "post":
        return (f"{family.name} normalises after each residual add (post-norm), so a removed sublayer would still "
                "change the stream")
    return f"its family ({model_type or 'unknown'}) is not described in lorp_fx/families.py"


def sublayers(model: nn.Module, layer: nn.Module) -> dict[str, nn.Module]:
    """The residual sublayers of one layer of `model`, by name relative to the layer ({} where
    the family removes whole layers only: post-norm, or not described)."""
    family = family_of(model)
    return {unit.name: layer.get_submodule(unit.name) for unit in layer_units(family, layer)}


def unit_entry(layer: nn.Module, unit: Unit) -> nn.Module:
    """The module whose first input is the stream entering `unit`."""
    return layer.get_submodule(unit.entry or unit.name)


def _maybe_submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        found = module.get_submodule(path)
    except AttributeError:
        return None
    return found if isinstance(found, nn.Module) else None


def finish_configs(family: Family, model: nn.Module) -> None:
    """Apply the family's whole-model config fixes once every stack of `model` has its new depth."""
    if family.finish_config is not None:
        family.finish_config(model)


def renumber(family: Family, config, layers: list[nn.Module], keep: list[int]) -> None:
    """Apply the family's index-dependent fixes after a stack keeps the layers `keep`.

    `config` is the stack's config (already holding the new layer count), `layers`
    the kept layers in their new order; `keep[i]` is the old index of new layer i.
    """
    if family.renumber_config is not None and config is not None:
        family.renumber_config(config, keep)
    for new_index, (layer, old_index) in enumerate(zip(layers, keep)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index  # the KV cache is indexed by it
        if family.renumber_layer is not None:
            family.renumber_layer(layer, old_index, new_index)
