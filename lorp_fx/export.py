"""Eager surgery on `transformers` models: remove residual layers, save the result.

The pruned model is an ordinary `transformers` model: `save_pretrained` writes a
checkpoint that `from_pretrained` reloads (with the same Auto class) and that
generates with the KV cache. Removing a layer correctly takes more than deleting
it from its `nn.ModuleList` (REFERENCE.md, "Making a pruned transformers model
reload and generate"):

* the layer count in the config (`num_hidden_layers`, GPT-2's `n_layer`, T5's
  `num_layers` / `num_decoder_layers`) and every per-layer config list
  (`layer_types`, ...) must follow, since `from_pretrained` rebuilds the layers
  from the config;
* every `layer_idx` must be renumbered 0..n-1, because the KV cache is indexed by
  it;
* anything else that a layer derives from its index at construction time must
  give the same layer back after renumbering (Qwen2-MoE's MoE-or-dense choice,
  GPT-2's optional 1/(layer_idx+1) attention scaling).

Sublayers (an attention or MLP inside a layer) cannot be dropped from a standard
checkpoint, so "removing" one zeroes its output projection: it then adds exactly
zero to the residual stream. Its parameters stay and its compute is still spent.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from torch import nn

from .errors import BudgetError, LoRPError, NoResidualBlocksError, NotRemovableError, UnknownBlockError
from .plan import PruningPlan


class OutputDirError(LoRPError):
    """An output directory that cannot be written (exists and is not empty, or not writable)."""


# Where each family keeps its residual layers, for models whose config does not
# say how many layers there are (the generic discovery needs that count).
_FAMILY_LAYER_PATHS = (
    "model.layers",  # Llama, Qwen3, Gemma3, Mixtral, Qwen2-MoE, ...
    "model.language_model.layers",
    "transformer.h",  # GPT-2
    "bert.encoder.layer",  # BertFor*
    "encoder.layer",  # BertModel
    "encoder.block",  # T5
    "decoder.block",
    "model.encoder.layers",
    "model.decoder.layers",
    "layers",
)

# Children of a layer that are residual sublayers (they add their output to the stream).
_SUBLAYER_ATTRIBUTES = ("self_attn", "attn", "mlp", "block_sparse_moe", "feed_forward")

# Names of the projections that write a sublayer's output back to the residual
# stream: Llama-style o_proj/down_proj (also fused MoE experts), GPT-2 c_proj,
# T5 o/wo, Mixtral-style w2, out_proj.
_OUTPUT_PROJECTIONS = frozenset({"o_proj", "down_proj", "c_proj", "o", "wo", "w2", "out_proj"})

# Config lists with one entry per layer (sliced on removal). Index lists such as
# Qwen2-MoE's `mlp_only_layers` are handled separately: they are renumbered.
_PER_LAYER_CONFIG_KEYS = frozenset({"layer_types", "mlp_layer_types", "indexer_types", "layer_rope_theta", "no_rope_layers"})


# --------------------------------------------------------------------------- discovery


def layer_containers(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The residual-layer lists of a `transformers` model, as (module path, ModuleList).

    A decoder-only model has one (`model.layers`, `transformer.h`, ...), an
    encoder-decoder two (T5: `encoder.block`, `decoder.block`). Layer `i` of a
    container at path `p` is the block named `f"{p}.{i}"`.
    """
    found = _discover_containers(model) or _family_containers(model)
    if not found:
        raise NoResidualBlocksError(
            f"found no residual-layer list in {type(model).__name__}: expected an nn.ModuleList whose length is the "
            f"config's layer count, or one of {', '.join(_FAMILY_LAYER_PATHS)}"
        )
    return found


def _layer_counts(config) -> set[int]:
    counts = set()
    for key in ("num_hidden_layers", "num_decoder_layers"):
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            counts.add(value)
    return counts


def _discover_containers(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists of identical modules whose length is a layer count of their owner's config.

    The owner (the module holding the list) is asked first because T5's two
    stacks each carry their own config; lists nested in an accepted one (T5's
    per-block sublayer list) are skipped.
    """
    top_counts = _layer_counts(getattr(model, "config", None))
    found: list[tuple[str, nn.ModuleList]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(prefix + ".") for prefix, _ in found):
            continue
        if len({type(m) for m in module}) != 1:
            continue
        owner_counts = _layer_counts(getattr(_owner(model, path), "config", None))
        if len(module) in (owner_counts or top_counts):
            found.append((path, module))
    return found


def _family_containers(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    found = []
    for path in _FAMILY_LAYER_PATHS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            found.append((path, module))
    # Keep only the outermost lists (a path could sit inside another one).
    return [(p, m) for p, m in found if not any(p.startswith(q + ".") for q, _ in found if q != p)]


def _owner(model: nn.Module, path: str) -> nn.Module:
    parent = path.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def sublayers(layer: nn.Module) -> dict[str, nn.Module]:
    """The residual sublayers of one layer, by name relative to the layer.

    `self_attn`/`mlp` (Llama family), `attn`/`mlp` (GPT-2), `layer.0`, `layer.1`,
    ... (T5: self-attention, [cross-attention,] feed-forward). Post-norm layers
    such as BERT's have none: they normalise after the residual add, so a zeroed
    sublayer would still change the stream.
    """
    found = {name: getattr(layer, name) for name in _SUBLAYER_ATTRIBUTES if isinstance(getattr(layer, name, None), nn.Module)}
    stack = getattr(layer, "layer", None)  # T5Block keeps its residual sublayers in a ModuleList
    if isinstance(stack, nn.ModuleList):
        found.update({f"layer.{i}": module for i, module in enumerate(stack)})
    return found


# --------------------------------------------------------------------------- removal


def remove_layers(model: nn.Module, remove: list[str] | PruningPlan) -> nn.Module:
    """A copy of `model` without the named layers (the input is never modified).

    `remove` holds block names (`model.layers.3`, `transformer.h.5`,
    `encoder.block.2`, ...) or a `PruningPlan`. Sublayer names
    (`model.layers.3.self_attn`, `transformer.h.2.mlp`, `encoder.block.1.layer.0`)
    are "removed" by zeroing their output projection: see the module docstring.
    """
    names = list(remove.remove if isinstance(remove, PruningPlan) else remove)
    containers = layer_containers(model)
    layer_removals, sublayer_removals = _resolve_names(model, containers, names)
    _check_layer_removals(model, containers, layer_removals)

    pruned = copy.deepcopy(model)
    for name in sublayer_removals:
        layer_name, sub = _split_sublayer_name(name, containers)
        if layer_name not in layer_removals:  # a removed layer's sublayers go with it
            _zero_sublayer_output(pruned.get_submodule(layer_name), sub, name)
    for path, layers in containers:
        drop = _removed_indices(path, layer_removals)
        if drop:
            _rebuild_container(pruned, path, [i for i in range(len(layers)) if i not in drop])
    return pruned


def _removed_indices(path: str, layer_removals: list[str]) -> set[int]:
    return {int(name.rpartition(".")[2]) for name in layer_removals if name.rpartition(".")[0] == path}


def _resolve_names(model, containers, names: list[str]) -> tuple[list[str], list[str]]:
    layer_names = {f"{path}.{i}" for path, layers in containers for i in range(len(layers))}
    layer_removals, sublayer_removals, unknown = [], [], []
    for name in dict.fromkeys(names):  # drop duplicates, keep order
        if name in layer_names:
            layer_removals.append(name)
        elif _split_sublayer_name(name, containers) is not None:
            sublayer_removals.append(name)
        elif (layer := _enclosing_layer(name, layer_names)) is not None and not sublayers(model.get_submodule(layer)):
            raise NotRemovableError(
                f"cannot remove {name}: {type(model.get_submodule(layer)).__name__} has no removable sublayers. "
                "It normalises after each residual add (post-norm, as in BERT), so a zeroed sublayer would still "
                f"change the stream; remove the whole layer {layer} instead"
            )
        else:
            unknown.append(name)
    if unknown:
        raise UnknownBlockError(f"unknown block name(s) {unknown}; valid names are {_describe_valid_names(containers)}")
    return layer_removals, sublayer_removals


def _enclosing_layer(name: str, layer_names: set[str]) -> str | None:
    return next((layer for layer in layer_names if name.startswith(layer + ".")), None)


def _split_sublayer_name(name: str, containers) -> tuple[str, str] | None:
    """(layer name, sublayer name relative to the layer) for a valid sublayer name, else None."""
    for path, layers in containers:
        if not name.startswith(path + "."):
            continue
        index, _, sub = name[len(path) + 1 :].partition(".")
        if index.isdigit() and int(index) < len(layers) and sub in sublayers(layers[int(index)]):
            return f"{path}.{index}", sub
    return None


def _describe_valid_names(containers) -> str:
    parts = []
    for path, layers in containers:
        subs = sorted(sublayers(layers[0]))
        sub_text = f", and sublayers <layer>.{{{','.join(subs)}}}" if subs else ""
        parts.append(f"layers {path}.0 .. {path}.{len(layers) - 1}{sub_text}")
    return "; ".join(parts)


def _check_layer_removals(model, containers, layer_removals: list[str]) -> None:
    for path, layers in containers:
        if len(_removed_indices(path, layer_removals)) >= len(layers):
            raise BudgetError(
                f"cannot remove all {len(layers)} layers of {path}: a pruned model needs at least one layer in each stack"
            )
    for name in layer_removals:
        layer = model.get_submodule(name)
        if any(getattr(m, "has_relative_attention_bias", False) for m in layer.modules()):
            raise NotRemovableError(
                f"cannot remove {name}: it holds the relative position bias (has_relative_attention_bias=True) that "
                "every later block of its stack reuses, and a T5 checkpoint can only keep that bias in the first block; "
                f"remove other blocks of this stack, or only this block's sublayers (such as {name}.layer.0)"
            )


def _rebuild_container(model: nn.Module, path: str, keep: list[int]) -> None:
    """Replace the layer list at `path` by its `keep` layers and make the model consistent again."""
    owner = _owner(model, path)
    old = owner.get_submodule(path.rpartition(".")[2])
    old_count = len(old)
    setattr(owner, path.rpartition(".")[2], nn.ModuleList([old[i] for i in keep]))
    _update_configs(model, owner, keep, old_count)
    for new_index, old_index in enumerate(keep):
        _renumber_layer(old[old_index], old_index, new_index)


def _update_configs(model: nn.Module, owner: nn.Module, keep: list[int], old_count: int) -> None:
    top = getattr(model, "config", None)
    own = getattr(owner, "config", None)
    if own is None:
        own = top
    if own is not None:
        overrides = _take_per_layer_overrides(own, keep)
        _apply_moe_layer_kinds(own, keep)
        _slice_per_layer_lists(own, keep, old_count)
        own.num_hidden_layers = len(keep)  # attribute_map turns this into n_layer (GPT-2), num_layers (T5)
        if overrides is not None:
            own.per_layer_config = overrides
    if top is not None and top is not own:
        # T5: each stack has its own config copy; the model's config counts both stacks.
        key = "num_decoder_layers" if getattr(own, "is_decoder", False) and hasattr(top, "num_decoder_layers") else "num_hidden_layers"
        setattr(top, key, len(keep))


def _slice_per_layer_lists(config, keep: list[int], old_count: int) -> None:
    for key, value in list(vars(config).items()):
        if key.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != old_count:
            continue
        if key in _PER_LAYER_CONFIG_KEYS or key.endswith("_types"):
            setattr(config, key, type(value)(value[i] for i in keep))


def _take_per_layer_overrides(config, keep: list[int]) -> dict | None:
    """Renumbered `per_layer_config` overrides of a heterogeneous config (None if it has none).

    The overrides are detached from the config: it validates their indices
    against the layer count, which is about to change.
    """
    if not getattr(config, "is_heterogeneous", False):
        return None
    overrides = config._heterogeneity_spec.per_layer_overrides
    renumbered = {new: copy.deepcopy(overrides[old]) for new, old in enumerate(keep) if old in overrides}
    config.per_layer_config = None
    return renumbered


def _apply_moe_layer_kinds(config, keep: list[int]) -> None:
    """Keep every layer's MoE-or-dense kind when Qwen2-MoE-style configs are renumbered.

    Those models build layer i as sparse MoE when `i not in mlp_only_layers` and
    `(i + 1) % decoder_sparse_step == 0`. After removal the kept layers get new
    indices, so the old rule would give some of them the other kind (and the
    checkpoint's weights would not fit). Encoding the kinds explicitly, with
    `decoder_sparse_step = 1` and `mlp_only_layers` = the new indices of the dense
    layers, reproduces the kept layers' kinds for any removal.
    """
    if not hasattr(config, "mlp_only_layers"):
        return
    only_dense = set(config.mlp_only_layers or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    has_experts = (getattr(config, "num_experts", 0) or 0) > 0

    def was_sparse(i: int) -> bool:
        return has_experts and i not in only_dense and (i + 1) % step == 0

    config.mlp_only_layers = [new for new, old in enumerate(keep) if not was_sparse(old)]
    if hasattr(config, "decoder_sparse_step"):
        config.decoder_sparse_step = 1


def _renumber_layer(layer: nn.Module, old_index: int, new_index: int) -> None:
    """Give a kept layer its new index, keeping what it computes unchanged."""
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = new_index
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            _rescale_gpt2_attention(module, old_index, new_index)


@torch.no_grad()
def _rescale_gpt2_attention(attn: nn.Module, old_index: int, new_index: int) -> None:
    """GPT-2 with `scale_attn_by_inverse_layer_idx` scales scores by 1/(layer_idx+1).

    The reloaded layer will use its new index, so fold the ratio of the two
    scales into the query projection: (q * r) . k / (new+1) == q . k / (old+1).
    """
    ratio = (new_index + 1) / (old_index + 1)
    if attn.is_cross_attention:
        attn.q_attn.weight.mul_(ratio)
        attn.q_attn.bias.mul_(ratio)
    else:
        width = attn.embed_dim  # GPT-2's Conv1D weight is (in, out); q is the first third of out
        attn.c_attn.weight[:, :width].mul_(ratio)
        attn.c_attn.bias[:width].mul_(ratio)
    attn.scaling = attn.scaling * (old_index + 1) / (new_index + 1)


@torch.no_grad()
def _zero_sublayer_output(layer: nn.Module, sub: str, full_name: str) -> None:
    """Zero every output projection (weight and bias) of one sublayer, MoE experts included."""
    module = layer.get_submodule(sub)
    zeroed = 0
    for param_name, param in module.named_parameters():
        parts = param_name.split(".")
        owner_name = parts[-2] if len(parts) > 1 else ""
        leaf = parts[-1]
        # Linear/Conv1D projections own `weight`/`bias`; fused MoE experts hold
        # `down_proj` (and sometimes `down_proj_bias`) as parameters directly.
        if owner_name in _OUTPUT_PROJECTIONS or leaf in _OUTPUT_PROJECTIONS or leaf.removesuffix("_bias") in _OUTPUT_PROJECTIONS:
            param.zero_()
            zeroed += 1
    if zeroed == 0:
        raise NotRemovableError(
            f"cannot remove sublayer {full_name}: found no output projection ({', '.join(sorted(_OUTPUT_PROJECTIONS))}) to zero in it"
        )


# --------------------------------------------------------------------------- saving


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, each tied or shared tensor counted once."""
    seen: set[tuple] = set()
    total = 0
    for param in model.parameters():  # already drops repeated Parameter objects
        key = (param.device.type, param.data_ptr(), param.shape) if param.device.type != "meta" else (id(param),)
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total


def save_pretrained_atomic(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    extra_files: dict[str, bytes | str] | None = None,
    overwrite: bool = False,
) -> Path:
    """`save_pretrained` model and tokenizer into `out_dir`, which appears complete or not at all.

    `extra_files` maps relative file names to contents (report.json, ...). An
    existing non-empty `out_dir` is refused unless `overwrite`.
    """

    def write(tmp: Path) -> None:
        if model is not None:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            _write_extra_file(tmp, name, content)

    return write_directory_atomic(out_dir, write, overwrite)


def write_directory_atomic(out_dir: str | os.PathLike, write, overwrite: bool = False) -> Path:
    """Call `write(tmp)` on a hidden temporary sibling of `out_dir`, then rename it into place.

    A crash or an error leaves no half-written `out_dir`.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    check_output_dir(out_dir, overwrite)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # os.mkdir (unlike tempfile.mkdtemp's 0700) gives the checkpoint the user's usual permissions.
        tmp = parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as error:
        raise OutputDirError(f"cannot write to {parent}: {error.strerror or error}") from error
    try:
        write(tmp)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a path that is a file, or a non-empty directory unless `overwrite`: before long work, too."""
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputDirError(f"output directory {out_dir} exists and is not empty; choose another or pass overwrite")
    parent = next((p for p in out_dir.parents if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        raise OutputDirError(f"cannot write to {parent}: permission denied")


def _write_extra_file(root: Path, name: str, content: bytes | str) -> None:
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise ValueError(f"extra file name {name!r} must be a relative path inside the output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    # Checked again: another process may have created out_dir while we were writing.
    check_output_dir(out_dir, overwrite)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        # rename(2) only replaces an empty directory: move the old one aside first.
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)  # replaces an empty out_dir too
