"""Where a folded map goes: the units of each residual stream, and the gaps a removal leaves.

Along one residual stream the units U_0 .. U_{K-1} (attention and MLP sublayers,
from `families.py`) read and write points p_0 .. p_K: p_u enters U_u, p_K is the
stack's output before its final norm. A gap is a maximal run of removed units
U_i .. U_j; its map is folded into the unit before it, U_{i-1}.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorp_fx.arch.families import (
    Family,
    family_of,
    layer_stacks,
    layer_units,
    supported_model_types,
    unit_entry,
)
from lorp_fx.core.errors import CompensationError


@dataclass
class UnitRef:
    """One residual sublayer of the model; `entry` is the module whose first input is the state entering it."""

    layer: str  # full layer name, e.g. "model.layers.3"
    name: str  # sublayer name relative to the layer, as families.py names it
    module: nn.Module  # holds the output projection(s)
    entry: nn.Module
    branch_norm: nn.Module | None  # the norm between projection and add (Gemma), else None

    @property
    def full_name(self) -> str:
        return f"{self.layer}.{self.name}"


@dataclass
class Stack:
    path: str
    layers: nn.ModuleList
    units: list[UnitRef]

    def point(self, index: int) -> tuple[str, nn.Module, str]:
        """(key, module, "pre"|"out") that reads point p_index of this stack."""
        if index < len(self.units):
            return f"{self.path}:{index}", self.units[index].entry, "pre"
        return f"{self.path}:{index}", self.layers[len(self.layers) - 1], "out"


@dataclass
class Gap:
    stack: int
    first: int  # first removed unit index in the stack
    last: int  # last removed unit index
    removed: list[str]  # unit full names
    fold_unit: UnitRef


def check_compensable(model: nn.Module) -> Family:
    """The model's family, or CompensationError naming why no map can be folded into it.

    A family check only, cheap enough to run before calibration; a plan can still be
    refused later for its own reasons (a gap at the very first layer).
    """
    family = family_of(model)
    kind = type(model).__name__
    if family.norm == "post":
        raise CompensationError(
            f"cannot compensate {kind}: it is post-norm (the residual sum is normalised inside each layer, so no "
            "weight sees a branch output alone); prune it without compensation"
        )
    if not family.units:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise CompensationError(
            f"cannot compensate {kind} (model_type {model_type!r}): its family is not described in "
            f"lorp_fx/families.py (described: {', '.join(supported_model_types())}); prune it without compensation"
        )
    return family


def stacks_of(model: nn.Module) -> list[Stack]:
    family = check_compensable(model)
    stacks = []
    for path, layers in layer_stacks(model):
        units = []
        for i, layer in enumerate(layers):
            for unit in layer_units(family, layer):
                norm = layer.get_submodule(unit.branch_norm) if unit.branch_norm else None
                units.append(UnitRef(f"{path}.{i}", unit.name, layer.get_submodule(unit.name), unit_entry(layer, unit), norm))
        stacks.append(Stack(path, layers, units))
    return stacks


def removed_units(stacks: list[Stack], names: list[str]) -> set[str]:
    """Full unit names removed by a plan's layer and sublayer names."""
    layer_units_: dict[str, list[str]] = {}
    all_units: set[str] = set()
    for stack in stacks:
        for unit in stack.units:
            layer_units_.setdefault(unit.layer, []).append(unit.full_name)
            all_units.add(unit.full_name)
    removed, unknown = set(), []
    for name in names:
        if name in layer_units_:
            removed.update(layer_units_[name])
        elif name in all_units:
            removed.add(name)
        else:
            unknown.append(name)
    if unknown:
        raise CompensationError(
            f"cannot compensate the removal of {unknown}: not a layer or sublayer of the model "
            f"(sublayers: {sorted({u.name for s in stacks for u in s.units})})"
        )
    return removed


def find_gaps(stacks: list[Stack], removed: set[str]) -> list[Gap]:
    gaps = []
    for s, stack in enumerate(stacks):
        u = 0
        while u < len(stack.units):
            if stack.units[u].full_name not in removed:
                u += 1
                continue
            first = u
            while u < len(stack.units) and stack.units[u].full_name in removed:
                u += 1
            names = [stack.units[k].full_name for k in range(first, u)]
            if first == 0:
                raise CompensationError(
                    f"cannot compensate the removal of {names[0]}: it is the first unit of {stack.path}, so no kept "
                    "layer before it has an output projection to fold a map into; protect the first layer (every "
                    "selector does by default) or prune without compensation"
                )
            gaps.append(Gap(s, first, u - 1, names, stack.units[first - 1]))
    return gaps
