"""Folding a fitted map T into the weights of the unit before a gap, so its branch output m becomes T m.

The map goes into every projection that writes the branch output (Llama's
`o_proj`/`down_proj`, every MoE expert's and the shared expert's down projection,
GPT-2's `c_proj`, T5's `o`/`wo`), so the pruned model keeps exactly its parameter
count and speed. Where the branch output is normalised before the add (Gemma's
sandwich norms), only a per-channel map folds exactly, into that norm's weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorp_fx.arch.anatomy import Gap, Stack, UnitRef
from lorp_fx.arch.families import Family
from lorp_fx.calibration.capture import Capture
from lorp_fx.core.errors import CompensationError


@dataclass
class Projection:
    name: str  # parameter path relative to the model
    param: nn.Parameter
    layout: str  # "out_in" (Linear), "in_out" (Conv1D), "e_out_in"/"e_in_out" (fused experts), "vector", "e_vector", "scale"


def projections(model: nn.Module, family: Family, unit: UnitRef, d: int, form: str) -> list[Projection]:
    """Every parameter that writes the unit's branch output, with how to fold a map into it."""
    if unit.branch_norm is not None:
        if form != "diagonal":
            raise CompensationError(
                f"cannot fold a full map into {unit.full_name}: its branch output is normalised before the residual add "
                "(sandwich norms), which only a per-channel map passes exactly; use the diagonal form"
            )
        weight = unit.branch_norm.weight
        _expect(weight.dim() == 1 and weight.shape[0] == d, f"{_module_name(model, unit.branch_norm)}.weight", weight.shape, d)
        return [Projection(f"{_module_name(model, unit.branch_norm)}.weight", weight, "scale")]
    prefix = _module_name(model, unit.module)
    found: list[Projection] = []
    for module_name, module in unit.module.named_modules():
        leaf = module_name.rpartition(".")[2]
        full = f"{prefix}.{module_name}" if module_name else prefix
        if leaf in family.output_projections and isinstance(module, nn.Linear):
            _expect(module.out_features == d, full, module.weight.shape, d)
            found.append(Projection(f"{full}.weight", module.weight, "out_in"))
            if module.bias is not None:
                found.append(Projection(f"{full}.bias", module.bias, "vector"))
            continue
        if leaf in family.output_projections and type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
            _expect(module.weight.shape[1] == d, full, module.weight.shape, d)
            found.append(Projection(f"{full}.weight", module.weight, "in_out"))
            if module.bias is not None:
                found.append(Projection(f"{full}.bias", module.bias, "vector"))
            continue
        for param_name, param in module.named_parameters(recurse=False):
            # Fused MoE experts hold `down_proj` (num_experts, out, in) directly, `down_proj_bias` (num_experts, out).
            if param_name in family.output_projections and param.dim() == 3:
                transposed = bool(getattr(module, "is_transposed", False))
                _expect(param.shape[2 if transposed else 1] == d, f"{full}.{param_name}", param.shape, d)
                found.append(Projection(f"{full}.{param_name}", param, "e_in_out" if transposed else "e_out_in"))
            elif param_name.endswith("_bias") and param_name.removesuffix("_bias") in family.output_projections and param.dim() == 2:
                _expect(param.shape[1] == d, f"{full}.{param_name}", param.shape, d)
                found.append(Projection(f"{full}.{param_name}", param, "e_vector"))
    if not any(p.layout not in ("vector", "e_vector") for p in found):
        raise CompensationError(
            f"cannot compensate a gap after {unit.full_name}: found no output projection "
            f"({', '.join(sorted(family.output_projections))}) in it to fold the map into"
        )
    _check_not_shared(model, found)
    return found


def _expect(ok: bool, name: str, shape, d: int) -> None:
    if not ok:
        raise CompensationError(f"output projection {name} has shape {tuple(shape)}, which does not write the {d}-wide residual stream")


def _check_not_shared(model: nn.Module, found: list[Projection]) -> None:
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for projection in found:
        names = owners.get(id(projection.param), [])
        if len(names) > 1:
            others = ", ".join(n for n in names if n != projection.name)
            raise CompensationError(f"cannot fold a map into {projection.name}: the same tensor is also {others}, which the map would change too")


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise CompensationError("internal error: a unit's module is not part of the model")


@torch.no_grad()
def fold(found: list[Projection], transform: torch.Tensor, norm_weight_offset: float = 0.0) -> None:
    """Replace every projection P by T P (in place): the unit's branch output m becomes T m."""
    for projection in found:
        param = projection.param
        t = transform.to(device=param.device, dtype=torch.float64)
        w = param.detach().to(torch.float64)
        layout = projection.layout
        if layout in ("out_in", "vector"):
            new = t @ w
        elif layout in ("in_out", "e_in_out", "e_vector"):
            new = w @ t.T
        elif layout == "e_out_in":
            new = torch.einsum("ij,ejk->eik", t, w)
        else:  # "scale": a norm weight, used as (offset + w); T is diagonal here
            new = torch.diagonal(t) * (norm_weight_offset + w) - norm_weight_offset
        param.copy_(new.to(param.dtype))


@torch.no_grad()
def verify_folds(model, family: Family, stacks: list[Stack], gaps: list[Gap], found: list[list[Projection]], batch: dict, d: int, form: str) -> None:
    """Fold a random map into each fold unit of the dense model, check its branch output becomes T m, restore."""
    if not gaps:
        return
    probe = {k: (v[:1, :32] if isinstance(v, torch.Tensor) and v.dim() >= 2 and k != "encoder_outputs" else v) for k, v in batch.items()}
    generator = torch.Generator().manual_seed(0)
    for gap, projs in zip(gaps, found):
        stack = stacks[gap.stack]
        entry, exit_ = stack.point(gap.first - 1), stack.point(gap.first)
        points = {entry[0]: entry[1:], exit_[0]: exit_[1:]}
        before = dict(Capture(points).run(model, probe))
        noise = 0.3 * torch.randn(d, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
        transform = torch.eye(d, dtype=torch.float64) + (torch.diag(torch.diagonal(noise) * math.sqrt(d)) if form == "diagonal" else noise)
        saved = [p.param.detach().clone() for p in projs]
        try:
            fold(projs, transform, family.norm_weight_offset)
            after = dict(Capture(points).run(model, probe))
        finally:
            for p, original in zip(projs, saved):
                p.param.copy_(original)
        x = before[entry[0]].double()
        m = before[exit_[0]].double() - x
        expected = m @ transform.to(m.device).T
        got = after[exit_[0]].double() - after[entry[0]].double()
        scale = float(m.abs().max()) or 1.0
        tolerance = 1e-4 if before[entry[0]].dtype == torch.float32 else 5e-2
        if not torch.allclose(after[entry[0]].double(), x, atol=tolerance * scale) or float((got - expected).abs().max()) > tolerance * scale * 10:
            raise CompensationError(
                f"cannot compensate the gap after {gap.fold_unit.full_name}: a map folded into "
                f"{', '.join(p.name for p in projs)} does not transform its branch output linearly (the branch is "
                "normalised or otherwise non-linear after the projection); prune this model without compensation"
            )
