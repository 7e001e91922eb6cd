"""Eager surgery on `transformers` models: remove residual layers so the result saves, reloads and generates.

Removing a layer takes more than deleting it from its `nn.ModuleList`
(REFERENCE.md, "Making a pruned transformers model reload and generate"): the
config's layer count and every per-layer config list must follow, every
`layer_idx` is renumbered (the KV cache is indexed by it), and whatever else a
layer derives from its index must give the same layer back (the family's
`renumber` hooks in `families.py`).

Sublayers cannot be dropped from a standard checkpoint, so "removing" one zeroes
its output projections: it then adds exactly zero to the residual stream. Its
parameters stay and its compute is still spent.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from lorp_fx.arch.families import (
    Family,
    family_of,
    finish_configs,
    layer_stacks,
    owner_of,
    renumber,
    sublayers,
    whole_layers_only,
)
from lorp_fx.core.budget import check_stack_budget
from lorp_fx.core.errors import NotRemovableError, PlanError, UnknownBlockError
from lorp_fx.core.plan import PruningPlan


class Surgery(NamedTuple):
    """A pruned model and where its kept layers went: `names` maps each kept layer's old
    name to its new one (`model.layers.12` -> `model.layers.10`)."""

    model: nn.Module
    names: dict[str, str]

    def rename(self, name: str) -> str:
        """The new name of anything under a kept layer (a sublayer, a parameter), or of the layer itself."""
        for old, new in self.names.items():
            if name == old or name.startswith(old + "."):
                return new + name[len(old) :]
        return name


def remove_layers(model: nn.Module, remove: list[str] | PruningPlan, *, inplace: bool = False) -> Surgery:
    """`model` without the named layers (a copy unless `inplace`), and the old -> new layer names.

    `remove` holds block names (`model.layers.3`, `transformer.h.5`,
    `encoder.block.2`, ...) or a `PruningPlan`. Sublayer names
    (`model.layers.3.self_attn`, `transformer.h.2.mlp`, `encoder.block.1.layer.0`)
    are "removed" by zeroing their output projections (module docstring).
    """
    names = list(remove.remove if isinstance(remove, PruningPlan) else remove)
    stacks = layer_stacks(model)
    layer_removals, sublayer_removals = _resolve_names(model, stacks, names)
    check_stack_budget({path: len(layers) for path, layers in stacks}, layer_removals)
    _check_layer_removals(model, layer_removals)

    pruned = model if inplace else copy.deepcopy(model)
    family = family_of(pruned)
    for name in sublayer_removals:
        layer_name, sub = _split_sublayer_name(pruned, stacks, name)
        if layer_name not in layer_removals:  # a removed layer's sublayers go with it
            _zero_sublayer_output(family, pruned.get_submodule(layer_name).get_submodule(sub), name)
    renames: dict[str, str] = {}
    for path, layers in stacks:
        drop = removed_indices(path, layer_removals)
        keep = [i for i in range(len(layers)) if i not in drop]
        if drop:
            _rebuild_stack(pruned, family, path, keep)
        renames.update({f"{path}.{old}": f"{path}.{new}" for new, old in enumerate(keep)})
    finish_configs(family, pruned)
    return Surgery(pruned, renames)


def removed_indices(path: str, layer_names: list[str]) -> set[int]:
    """Indices of the named layers that belong to the stack at `path`."""
    return {int(name.rpartition(".")[2]) for name in layer_names if name.rpartition(".")[0] == path}


def count_layers(model: nn.Module) -> int:
    return sum(len(layers) for _, layers in layer_stacks(model))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, each tied or shared tensor counted once.

    An offloaded model's weights are meta tensors, and accelerate's hooks put new ones in each module after every
    forward pass, so a tied head is a tensor of its own there: the tie targets the model declares are skipped."""
    tied_targets = set(getattr(model, "all_tied_weights_keys", None) or ())
    seen: set[tuple] = set()
    total = 0
    for name, param in model.named_parameters():  # already drops repeated Parameter objects
        if param.device.type == "meta":
            if name in tied_targets:
                continue
            key: tuple = (id(param),)
        else:
            key = (param.device.type, param.data_ptr(), param.shape)
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total


# --------------------------------------------------------------------------- names


def _resolve_names(model, stacks, names: list[str]) -> tuple[list[str], list[str]]:
    layer_names = {f"{path}.{i}" for path, layers in stacks for i in range(len(layers))}
    layer_removals, sublayer_removals, unknown = [], [], []
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:  # as `lorp_fx.prune` refuses them: a repeated name is a mistake in the plan, not a request
        raise PlanError(f"blocks named more than once: {duplicates}; name each block once")
    for name in names:
        if name in layer_names:
            layer_removals.append(name)
        elif _split_sublayer_name(model, stacks, name) is not None:
            sublayer_removals.append(name)
        elif (layer := _enclosing_layer(name, layer_names)) is not None and not sublayers(model, model.get_submodule(layer)):
            raise NotRemovableError(_no_sublayers_reason(model, name, layer))
        else:
            unknown.append(name)
    if unknown:
        raise UnknownBlockError(f"unknown block name(s) {unknown}; valid names are {_describe_valid_names(model, stacks)}")
    return layer_removals, sublayer_removals


def _no_sublayers_reason(model, name: str, layer: str) -> str:
    kind = type(model.get_submodule(layer)).__name__
    why = whole_layers_only(getattr(model.config, "model_type", None))
    return f"cannot remove {name}: {kind} has no removable sublayers, because {why}; remove the whole layer {layer} instead"


def _enclosing_layer(name: str, layer_names: set[str]) -> str | None:
    return next((layer for layer in layer_names if name.startswith(layer + ".")), None)


def _split_sublayer_name(model, stacks, name: str) -> tuple[str, str] | None:
    """(layer name, sublayer name relative to the layer) for a valid sublayer name, else None."""
    for path, layers in stacks:
        if not name.startswith(path + "."):
            continue
        index, _, sub = name[len(path) + 1 :].partition(".")
        if index.isdigit() and int(index) < len(layers) and sub in sublayers(model, layers[int(index)]):
            return f"{path}.{index}", sub
    return None


def _describe_valid_names(model, stacks) -> str:
    parts = []
    for path, layers in stacks:
        subs = sorted(sublayers(model, layers[0]))
        sub_text = f", and sublayers <layer>.{{{','.join(subs)}}}" if subs else ""
        parts.append(f"layers {path}.0 .. {path}.{len(layers) - 1}{sub_text}")
    return "; ".join(parts)


def _check_layer_removals(model, layer_removals: list[str]) -> None:
    for name in layer_removals:
        layer = model.get_submodule(name)
        if any(getattr(m, "has_relative_attention_bias", False) for m in layer.modules()):
            raise NotRemovableError(
                f"cannot remove {name}: it holds the relative position bias (has_relative_attention_bias=True) that "
                "every later block of its stack reuses, and a T5 checkpoint can only keep that bias in the first block; "
                f"remove other blocks of this stack, or only this block's sublayers (such as {name}.layer.0)"
            )


# --------------------------------------------------------------------------- rebuilding


def _rebuild_stack(model: nn.Module, family: Family, path: str, keep: list[int]) -> None:
    """Replace the layer list at `path` by its `keep` layers and make the model consistent again."""
    owner = owner_of(model, path)
    attribute = path.rpartition(".")[2]
    old = getattr(owner, attribute)
    kept = [old[i] for i in keep]
    setattr(owner, attribute, nn.ModuleList(kept))
    config = _update_configs(model, owner, keep, len(old))
    renumber(family, config, kept, keep)


def _update_configs(model: nn.Module, owner: nn.Module, keep: list[int], old_count: int):
    """Set the new layer count and slice per-layer lists; returns the stack's own config."""
    top = getattr(model, "config", None)
    own = getattr(owner, "config", None) or top
    if own is not None:
        overrides = _take_per_layer_overrides(own, keep)
        _slice_per_layer_lists(own, family_of(model), keep, old_count)
        own.num_hidden_layers = len(keep)  # attribute_map turns this into n_layer (GPT-2), num_layers (T5)
        if overrides is not None:
            own.per_layer_config = overrides
    if top is not None and top is not own:
        # T5: each stack has its own config copy; the model's config counts both stacks.
        key = "num_decoder_layers" if getattr(own, "is_decoder", False) and hasattr(top, "num_decoder_layers") else "num_hidden_layers"
        setattr(top, key, len(keep))
    return own


def _slice_per_layer_lists(config, family: Family, keep: list[int], old_count: int) -> None:
    for key, value in list(vars(config).items()):
        if key.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != old_count:
            continue
        if key in family.per_layer_config or key.endswith("_types"):
            setattr(config, key, type(value)(value[i] for i in keep))


def _take_per_layer_overrides(config, keep: list[int]) -> dict | None:
    """Renumbered `per_layer_config` overrides of a heterogeneous config (None if it has none).

    The overrides are detached from the config: it validates their indices against
    the layer count, which is about to change.
    """
    if not getattr(config, "is_heterogeneous", False):
        return None
    overrides = config._heterogeneity_spec.per_layer_overrides
    renumbered = {new: copy.deepcopy(overrides[old]) for new, old in enumerate(keep) if old in overrides}
    config.per_layer_config = None
    return renumbered


@torch.no_grad()
def _zero_sublayer_output(family: Family, module: nn.Module, full_name: str) -> None:
    """Zero every output projection (weight and bias) of one sublayer, MoE experts included."""
    zeroed = 0
    for param_name, param in module.named_parameters():
        parts = param_name.split(".")
        owner_name = parts[-2] if len(parts) > 1 else ""
        leaf = parts[-1]
        # Linear/Conv1D projections own `weight`/`bias`; fused MoE experts hold
        # `down_proj` (and sometimes `down_proj_bias`) as parameters directly.
        names = family.output_projections
        if owner_name in names or leaf in names or leaf.removesuffix("_bias") in names:
            param.zero_()
            zeroed += 1
    if zeroed == 0:
        raise NotRemovableError(
            f"cannot remove sublayer {full_name}: found no output projection ({', '.join(sorted(family.output_projections))}) to zero in it"
        )
