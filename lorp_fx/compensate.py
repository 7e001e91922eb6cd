"""Training-free compensation of removed layers: fit a linear map per gap, fold it into the weights.

Removing a run of residual units leaves a gap in the residual stream. Following
ReplaceMe (arXiv 2505.02819, ../shared/REFERENCE.md), each gap is closed by a
linear map T (d x d) fitted on calibration activations and folded into the
output projection of the last kept unit before the gap, so that the pruned
model has exactly the parameters (and the latency) of the uncompensated one.

Formulation
-----------
A *unit* is one residual sublayer of a pre-norm layer: Llama's `self_attn` and
`mlp`, GPT-2's `attn` and `mlp`, T5's `layer.k`. Along one residual stream the
units U_0 .. U_{K-1} read and write points p_0 .. p_K (p_u enters U_u, p_K is
the stack's output before its final norm), and every unit computes

    p_{u+1} = p_u + P_u(z_u)

where P_u is the unit's output projection (MLP `down_proj`, attention
`o_proj`, GPT-2 `c_proj`, T5 `o`/`wo`, every MoE expert's down projection and
the shared expert's) and z_u depends on p_u only. Removing whole layers removes
all their units; removing a sublayer removes one unit.

A gap is a maximal run of removed units U_i .. U_j. The pruned model hands the
output of the last kept unit before it, p_{i-1} + P_{i-1}(z), to U_{j+1},
which in the dense model read p_{j+1}. Replacing P_{i-1} by T P_{i-1} changes
that state into x + T m, with x = p_{i-1} (the unit's skip input) and
m = P_{i-1}(z) = p_i - p_{i-1} (its branch output). So T is fitted on

    x_t + T m_t  ~  y_t,    i.e.   T m_t ~ r_t := y_t - x_t,    y_t = p_{j+1}

over calibration tokens t: only the branch output is mapped, the skip input
passes unchanged, which is what makes the fold exact. (A map of the whole state
x + m cannot be folded: x does not go through any weight of the unit.) For the
usual layer removal this is ReplaceMe's fit: input the MLP output of the layer
before the gap, target the dense state after the gap minus the residual that
the MLP adds to.

With T = I the model is the uncompensated pruned one. T minimises

    sum_t w_t |T m_t - r_t|^2  +  ridge * (tr(A) / d) * |T - I|_F^2,    A = sum_t w_t m_t m_t^T

a ridge that shrinks towards the identity (towards "no compensation") rather
than towards zero, with a strength relative to the mean eigenvalue of A:

    T^T = (A + lam I)^-1 (B + lam I),    B = sum_t w_t m_t r_t^T,    lam = ridge * tr(A) / d.

A and B are accumulated in float64 while calibration batches stream through
the model: O(d^2) memory per gap, never the activations. `ridge="auto"` (the
default) keeps them per fold of the calibration sequences (sequence r in fold
r % 4) and picks, per gap, the grid value with the lowest 4-fold
cross-validated error of the method's own objective; a d x d map fitted on a
few thousand tokens overfits without it (SmolLM2, d = 576: see
docs/compensation.md).

Methods (`method`):

* `"lstsq"`: w_t = 1, plain least squares (ReplaceMe's LS variant). A few
  tokens of LLMs carry "massive activations" (on SmolLM2 the first token of
  every window: a state norm of ~28,000 against a median of ~200); they
  dominate this objective, and a map fitted to them hurts every other token.
  (Outlier *dimensions* alone would not matter: the rows of T are separate
  least-squares problems, so rescaling or whitening output dimensions does not
  change the solution. The outliers that hurt are tokens.)
* `"cosine"`: w_t = 1 / |y_t|^2, i.e. least squares on each token's error
  relative to its target norm, |x_t + T m_t - y_t| / |y_t|. Every token weighs
  the same, whatever its norm, as in ReplaceMe's cosine objective
  (1 - cos is half the squared distance of the unit vectors), but it keeps a
  closed form and streams. The next layer and the final norm read the state
  through an RMS/LayerNorm, so a relative error is what matters downstream.
  An exact cosine objective has no closed form (it needs gradient descent
  over stored activations, as in ReplaceMe): docs/compensation.md compares
  them.

Statistics come from the dense model by default (one pass for all gaps): for
the first gap of a stack that *is* the pruned model's view (everything before
it is unchanged); a later gap sees dense inputs, not those of the pruned model.
With `sequential=True`, gaps are fitted in depth order from the pruned model's
view: the skip input and branch output come from the pruned model with the
earlier gaps already compensated, the target still from the dense model (one
extra pass per gap, both models on the same batch).

Granularity: a removed sublayer is one unit, so sublayer removals are handled
like layer removals. A removed MLP is compensated in the attention's `o_proj`
of the same layer (attention output = o_proj(heads), linear in o_proj), a
removed attention in the previous layer's MLP; consecutive removed units form
one gap (e.g. an MLP and the next layer's attention).

What is supported
-----------------
Pre-norm layers whose units end in a linear output projection: the Llama
family (Llama, Qwen2/3, Mistral, SmolLM2, ...), MoE layers of that family
(Mixtral, Qwen2-MoE: the map is folded into every expert and the shared
expert; the router and the shared-expert gate read the unit's input, not its
projection, so sum_e g_e T W_e u_e = T sum_e g_e W_e u_e), GPT-2, and T5
(encoder and decoder stacks, self- cross-attention and feed-forward). Layer
and sublayer removals alike, any number of gaps.

Refused with `CompensationError` (a `LoRPError`):

* post-norm layers (BERT): the residual sum is normalised inside the layer,
  so no weight sees the branch output alone;
* Gemma2/Gemma3-style "sandwich" norms: the branch output is normalised
  (`post_feedforward_layernorm`) before the add; RMSNorm(T m) != T RMSNorm(m),
  so a fold into the projection is not exact;
* a gap with no kept unit before it in its stack (the first layer, or its
  first sublayer, removed): the embedding could absorb it, but it is usually
  tied to the LM head, and selectors protect the first layer by default;
* an output projection shared with another part of the model.

Every fold is also checked numerically before the calibration pass
(`verify=True`): a random map folded into the unit must multiply its branch
output exactly, so a family that slipped through these rules is refused too.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CalibrationError, InputMismatchError, LoRPError
from .export import _OUTPUT_PROJECTIONS, layer_containers, remove_layers
from .plan import PruningPlan

METHODS = ("lstsq", "cosine")
DEFAULT_RIDGE = "auto"
# Candidate ridges for ridge="auto" (relative to tr(A)/d), chosen per gap by cross-validation.
RIDGE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
FALLBACK_RIDGE = 1e-1  # what "auto" uses when there are too few sequences to cross-validate
CV_FOLDS = 4

_MASK_NAMES = ("attention_mask", "decoder_attention_mask")
_SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


class CompensationError(LoRPError):
    """A model or a removal that a folded linear map cannot compensate exactly."""


# --------------------------------------------------------------------------- structure


@dataclass
class _Unit:
    """One residual sublayer: `entry` is the module whose first input is the state entering it."""

    layer: str  # full layer name, e.g. "model.layers.3"
    name: str  # sublayer name relative to the layer, as `export.sublayers` names it
    module: nn.Module  # holds the output projection(s)
    entry: nn.Module

    @property
    def full_name(self) -> str:
        return f"{self.layer}.{self.name}"


@dataclass
class _Stack:
    path: str
    layers: nn.ModuleList
    units: list[_Unit]

    def point(self, index: int) -> tuple[str, nn.Module, str]:
        """(key, module, "pre"|"out") that reads point p_index of this stack."""
        if index < len(self.units):
            return f"{self.path}:{index}", self.units[index].entry, "pre"
        return f"{self.path}:{index}", self.layers[len(self.layers) - 1], "out"


def _layer_units(layer: nn.Module, layer_name: str) -> list[_Unit]:
    """The units of one layer, in the order they run; CompensationError where unsupported."""
    kind = type(layer).__name__
    if any(isinstance(getattr(layer, n, None), nn.Module) for n in _SANDWICH_NORMS):
        raise CompensationError(
            f"cannot compensate {kind} ({layer_name}): it normalises each branch output before the residual add "
            "(Gemma2/Gemma3 'sandwich' norms), so a linear map folded into the output projection would be undone by "
            "the norm (RMSNorm(T m) != T RMSNorm(m)); prune this model without compensation"
        )
    stack = getattr(layer, "layer", None)
    if isinstance(stack, nn.ModuleList) and all(isinstance(getattr(m, "layer_norm", None), nn.Module) for m in stack):
        # T5: every sublayer is `x + dropout(f(layer_norm(x)))` and receives x as its first input.
        return [_Unit(layer_name, f"layer.{k}", m, m) for k, m in enumerate(stack)]
    mlp = next((getattr(layer, n) for n in ("mlp", "block_sparse_moe", "feed_forward") if isinstance(getattr(layer, n, None), nn.Module)), None)
    mlp_name = next((n for n in ("mlp", "block_sparse_moe", "feed_forward") if isinstance(getattr(layer, n, None), nn.Module)), None)
    if all(isinstance(getattr(layer, n, None), nn.Module) for n in ("input_layernorm", "post_attention_layernorm", "self_attn")) and mlp is not None:
        # Llama family: x + attn(input_layernorm(x)), then h + mlp(post_attention_layernorm(h)).
        return [
            _Unit(layer_name, "self_attn", layer.self_attn, layer.input_layernorm),
            _Unit(layer_name, mlp_name, mlp, layer.post_attention_layernorm),
        ]
    if all(isinstance(getattr(layer, n, None), nn.Module) for n in ("ln_1", "attn", "ln_2", "mlp")):
        # GPT-2: x + attn(ln_1(x)), [h + crossattention(ln_cross_attn(h)),] h + mlp(ln_2(h)).
        units = [_Unit(layer_name, "attn", layer.attn, layer.ln_1)]
        if isinstance(getattr(layer, "crossattention", None), nn.Module):
            units.append(_Unit(layer_name, "crossattention", layer.crossattention, layer.ln_cross_attn))
        units.append(_Unit(layer_name, "mlp", layer.mlp, layer.ln_2))
        return units
    if any("LayerNorm" in type(m).__name__ or "Norm" in type(m).__name__ for m in layer.modules()) and not any(
        isinstance(getattr(layer, n, None), nn.Module) for n in ("input_layernorm", "ln_1")
    ):
        raise CompensationError(
            f"cannot compensate {kind} ({layer_name}): it is not a pre-norm layer (BERT-style layers normalise the "
            "residual sum inside the layer, so no weight sees a branch output alone); compensation supports pre-norm "
            "layers of the Llama family (incl. MoE), GPT-2 and T5"
        )
    raise CompensationError(
        f"cannot compensate {kind} ({layer_name}): not a layer structure lorp-fx knows how to fold a map into; "
        "compensation supports pre-norm layers of the Llama family (incl. MoE), GPT-2 and T5"
    )


def check_compensable(model: nn.Module) -> None:
    """Raise CompensationError, naming the reason, if no layer of `model` can take a folded map.

    A family check only, cheap enough to run before calibration; a plan can still be
    refused later for its own reasons (a gap at the very first layer).
    """
    _stacks(model)


def _stacks(model: nn.Module) -> list[_Stack]:
    stacks = []
    for path, layers in layer_containers(model):
        units = [u for i, layer in enumerate(layers) for u in _layer_units(layer, f"{path}.{i}")]
        stacks.append(_Stack(path, layers, units))
    return stacks


# --------------------------------------------------------------------------- projections and folding


@dataclass
class _Projection:
    name: str  # parameter path relative to the model
    param: nn.Parameter
    layout: str  # "out_in" (Linear, (out, in)), "in_out" (Conv1D), "e_out_in", "e_in_out", "vector", "e_vector"


def _projections(model: nn.Module, unit: _Unit, d: int) -> list[_Projection]:
    """Every parameter that writes the unit's branch output, with how to fold a map into it."""
    prefix = _module_name(model, unit.module)
    found: list[_Projection] = []
    for module_name, module in unit.module.named_modules():
        leaf = module_name.rpartition(".")[2]
        full = f"{prefix}.{module_name}" if module_name else prefix
        if leaf in _OUTPUT_PROJECTIONS and isinstance(module, nn.Linear):
            _expect(module.out_features == d, full, module.weight.shape, d)
            found.append(_Projection(f"{full}.weight", module.weight, "out_in"))
            if module.bias is not None:
                found.append(_Projection(f"{full}.bias", module.bias, "vector"))
            continue
        if leaf in _OUTPUT_PROJECTIONS and type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
            _expect(module.weight.shape[1] == d, full, module.weight.shape, d)
            found.append(_Projection(f"{full}.weight", module.weight, "in_out"))
            if module.bias is not None:
                found.append(_Projection(f"{full}.bias", module.bias, "vector"))
            continue
        for param_name, param in module.named_parameters(recurse=False):
            # Fused MoE experts hold `down_proj` (num_experts, out, in) directly, `down_proj_bias` (num_experts, out).
            if param_name in _OUTPUT_PROJECTIONS and param.dim() == 3:
                transposed = bool(getattr(module, "is_transposed", False))
                _expect(param.shape[2 if transposed else 1] == d, f"{full}.{param_name}", param.shape, d)
                found.append(_Projection(f"{full}.{param_name}", param, "e_in_out" if transposed else "e_out_in"))
            elif param_name.endswith("_bias") and param_name.removesuffix("_bias") in _OUTPUT_PROJECTIONS and param.dim() == 2:
                _expect(param.shape[1] == d, f"{full}.{param_name}", param.shape, d)
                found.append(_Projection(f"{full}.{param_name}", param, "e_vector"))
    if not any(p.layout != "vector" and p.layout != "e_vector" for p in found):
        raise CompensationError(
            f"cannot compensate a gap after {unit.full_name}: found no output projection "
            f"({', '.join(sorted(_OUTPUT_PROJECTIONS))}) in it to fold the map into"
        )
    _check_not_shared(model, found)
    return found


def _expect(ok: bool, name: str, shape, d: int) -> None:
    if not ok:
        raise CompensationError(f"output projection {name} has shape {tuple(shape)}, which does not write the {d}-wide residual stream")


def _check_not_shared(model: nn.Module, projections: list[_Projection]) -> None:
    counts: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        counts.setdefault(id(param), []).append(name)
    for projection in projections:
        names = counts.get(id(projection.param), [])
        if len(names) > 1:
            raise CompensationError(
                f"cannot fold a map into {projection.name}: the same tensor is also {', '.join(n for n in names if n != projection.name)}, "
                "which the map would change too"
            )


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise CompensationError("internal error: a unit's module is not part of the model")


@torch.no_grad()
def _fold(projections: list[_Projection], transform: torch.Tensor) -> None:
    """Replace every projection P by T P (in place): the unit's branch output m becomes T m."""
    for projection in projections:
        param = projection.param
        t = transform.to(device=param.device, dtype=torch.float64)
        w = param.detach().to(torch.float64)
        if projection.layout == "out_in":
            new = t @ w
        elif projection.layout == "in_out":
            new = w @ t.T
        elif projection.layout == "e_out_in":
            new = torch.einsum("ij,ejk->eik", t, w)
        elif projection.layout == "e_in_out":
            new = w @ t.T
        elif projection.layout == "vector":
            new = t @ w
        else:  # "e_vector"
            new = w @ t.T
        param.copy_(new.to(param.dtype))


# --------------------------------------------------------------------------- gaps


@dataclass
class _Gap:
    stack: int
    first: int  # first removed unit index in the stack
    last: int  # last removed unit index
    removed: list[str]  # unit full names
    fold_unit: _Unit


def _removed_units(stacks: list[_Stack], names: list[str]) -> set[str]:
    """Full unit names removed by a plan's layer and sublayer names."""
    layer_units: dict[str, list[str]] = {}
    all_units: set[str] = set()
    for stack in stacks:
        for unit in stack.units:
            layer_units.setdefault(unit.layer, []).append(unit.full_name)
            all_units.add(unit.full_name)
    removed, unknown = set(), []
    for name in names:
        if name in layer_units:
            removed.update(layer_units[name])
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


def _gaps(stacks: list[_Stack], removed: set[str]) -> list[_Gap]:
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
            last = u - 1
            names = [stack.units[k].full_name for k in range(first, last + 1)]
            if first == 0:
                raise CompensationError(
                    f"cannot compensate the removal of {names[0]}: it is the first unit of {stack.path}, so no kept "
                    "layer before it has an output projection to fold a map into; protect the first layer (every "
                    "selector does by default) or prune without compensation"
                )
            gaps.append(_Gap(s, first, last, names, stack.units[first - 1]))
    return gaps


# --------------------------------------------------------------------------- statistics


class GapStatistics:
    """Streaming normal equations of one gap: A = sum w m m^T, B = sum w m r^T, and error sums."""

    def __init__(self, d: int, method: str, device: torch.device | str = "cpu"):
        self.d, self.method = d, method
        self.A = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.B = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.weight_sum = 0.0
        self.target_sum = 0.0  # sum w |y|^2
        self.residual_sum = 0.0  # sum w |r|^2
        self.before_sum = 0.0  # sum w |r - m|^2: the error without compensation
        self.tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_out: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """One batch: the fold unit's input `x` and output `x_out`, the dense state `y` after the gap.

        Tensors are (..., d); `keep` (same leading shape, bool) drops padding tokens.
        """
        x, x_out, y = (t.reshape(-1, self.d) for t in (x, x_out, y))
        if keep is not None:
            keep = keep.reshape(-1).to(x.device).bool()
            x, x_out, y = x[keep], x_out[keep], y[keep]
        if x.shape[0] == 0:
            return
        device = self.A.device
        x, x_out, y = (t.to(device=device, dtype=torch.float64) for t in (x, x_out, y))
        m = x_out - x
        r = y - x
        if self.method == "cosine":
            w = 1.0 / (y * y).sum(1).clamp_min(torch.finfo(torch.float64).tiny)
        else:
            w = torch.ones(x.shape[0], dtype=torch.float64, device=device)
        wm = m * w[:, None]
        self.A += wm.T @ m
        self.B += wm.T @ r
        self.weight_sum += float(w.sum())
        self.target_sum += float((w * (y * y).sum(1)).sum())
        self.residual_sum += float((w * (r * r).sum(1)).sum())
        self.before_sum += float((w * ((r - m) ** 2).sum(1)).sum())
        self.tokens += x.shape[0]

    def merge(self, other: "GapStatistics") -> None:
        self.A += other.A.to(self.A.device)
        self.B += other.B.to(self.B.device)
        for name in ("weight_sum", "target_sum", "residual_sum", "before_sum", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def minus(self, other: "GapStatistics") -> "GapStatistics":
        """The statistics of the tokens in `self` but not in `other` (a sub-collection of them)."""
        out = GapStatistics(self.d, self.method, self.A.device)
        out.A, out.B = self.A - other.A, self.B - other.B
        for name in ("weight_sum", "target_sum", "residual_sum", "before_sum", "tokens"):
            setattr(out, name, getattr(self, name) - getattr(other, name))
        return out

    def error_sum(self, transform: torch.Tensor) -> float:
        """sum w |x + T m - y|^2 over these tokens (T fitted elsewhere: a held-out error)."""
        t = transform.to(self.A)
        return self.residual_sum - 2.0 * float(torch.trace(t @ self.B)) + float(((t @ self.A) * t).sum())

    def solve(self, ridge: float = 1e-1) -> torch.Tensor:
        """T minimising sum w |T m - r|^2 + ridge * tr(A)/d * |T - I|^2 (float64, on the statistics' device)."""
        if self.tokens == 0:
            raise CalibrationError("no calibration tokens reached this gap: the calibration batches are empty or all padding")
        eye = torch.eye(self.d, dtype=torch.float64, device=self.A.device)
        scale = float(torch.trace(self.A)) / self.d
        if not math.isfinite(scale):
            raise CalibrationError("NaN or Inf in the calibration activations; use float32 or bfloat16 rather than float16")
        lam = ridge * scale if scale > 0 else 1.0
        system = self.A + lam * eye
        rhs = self.B + lam * eye
        try:
            factor = torch.linalg.cholesky(system)
            transposed = torch.cholesky_solve(rhs, factor)
        except RuntimeError:  # not positive definite in floating point: fall back to a least-squares solve
            transposed = torch.linalg.lstsq(system, rhs).solution
        return transposed.T.contiguous()

    def relative_error(self, transform: torch.Tensor | None = None) -> float:
        """sum w |x + T m - y|^2 / sum w |y|^2 on the calibration tokens (T = I: uncompensated)."""
        err = self.before_sum if transform is None else self.error_sum(transform)
        return max(err, 0.0) / max(self.target_sum, 1e-300)


class _GapAccumulator:
    """The statistics of one gap, split into folds by sequence for ridge="auto" (one fold otherwise).

    Sequence r of the calibration data (counting rows across batches) goes to fold
    r % folds: tokens of one sequence are correlated, so they stay together.
    """

    def __init__(self, d: int, method: str, folds: int, device):
        self.folds = [GapStatistics(d, method, device) for _ in range(folds)]

    def update(self, x, x_out, y, keep, first_row: int) -> None:
        n = len(self.folds)
        if n == 1 or x.dim() < 3:
            self.folds[0].update(x, x_out, y, keep)
            return
        rows = torch.arange(x.shape[0], device=x.device) + first_row
        for k in range(n):
            pick = (rows % n) == k
            if bool(pick.any()):
                self.folds[k].update(x[pick], x_out[pick], y[pick], None if keep is None else keep[pick])

    def total(self) -> GapStatistics:
        total = GapStatistics(self.folds[0].d, self.folds[0].method, self.folds[0].A.device)
        for fold in self.folds:
            total.merge(fold)
        return total

    def choose_ridge(self, total: GapStatistics) -> tuple[float, dict[float, float]]:
        """The grid ridge with the lowest cross-validated error (relative), and every candidate's error."""
        usable = [f for f in self.folds if f.tokens > 0]
        if len(usable) < 2:
            return FALLBACK_RIDGE, {}
        errors = {}
        for ridge in RIDGE_GRID:
            held_out = 0.0
            for fold in usable:
                held_out += fold.error_sum(total.minus(fold).solve(ridge))
            errors[ridge] = held_out / max(total.target_sum, 1e-300)
        return min(errors, key=errors.get), errors


@dataclass
class GapFit:
    """What compensation did for one gap (names are the dense model's)."""

    removed: list[str]
    fold_into: str
    projections: list[str]
    transform: torch.Tensor = field(repr=False)
    tokens: int
    error_before: float  # relative calibration error of the uncompensated pruned state at the gap
    error_after: float  # the same with the map folded in (in-sample)
    ridge: float | None = None  # the ridge used (chosen by cross-validation with ridge="auto")
    cv_errors: dict = field(default_factory=dict)  # ridge -> cross-validated relative error ("auto")

    def to_dict(self) -> dict:
        return {
            "removed": list(self.removed),
            "fold_into": self.fold_into,
            "projections": list(self.projections),
            "tokens": int(self.tokens),
            "error_before": float(self.error_before),
            "error_after": float(self.error_after),
            "ridge": None if self.ridge is None else float(self.ridge),
            "cv_errors": {str(k): float(v) for k, v in self.cv_errors.items()},
        }


# --------------------------------------------------------------------------- hooks


class _Stop(Exception):
    """Raised from a hook once every state a pass needs has been captured."""


class _Capture:
    """Forward hooks that store residual states by key; optionally stop the forward once all are in."""

    def __init__(self, points: dict[str, tuple[nn.Module, str]], stop_early: bool = True):
        self.points = points
        self.stop_early = stop_early
        self.states: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for key, (module, kind) in self.points.items():
            if kind == "pre":
                self._handles.append(module.register_forward_pre_hook(self._pre(key), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._out(key), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def _store(self, key: str, state) -> None:
        if not isinstance(state, torch.Tensor):
            raise CompensationError(f"internal error: the hook for {key} saw no hidden-state tensor")
        self.states[key] = state.detach()
        if self.stop_early and len(self.states) == len(self.points):
            raise _Stop

    def _pre(self, key: str):
        def hook(module, args, kwargs):
            self._store(key, args[0] if args else kwargs.get("hidden_states"))

        return hook

    def _out(self, key: str):
        def hook(module, args, kwargs, output):
            self._store(key, output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    def run(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        self.states = {}
        try:
            model(**batch)
        except _Stop:
            pass
        missing = set(self.points) - set(self.states)
        if missing:
            raise CompensationError(f"internal error: the forward pass never reached {sorted(missing)}")
        return self.states


# --------------------------------------------------------------------------- batches


def _prepare_batches(model: nn.Module, batches: Iterable) -> list[dict]:
    device = next(model.parameters()).device
    try:
        accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts_cache = False
    prepared = []
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch if batch.dim() == 2 else batch.unsqueeze(0)}
        elif not isinstance(batch, dict):
            raise InputMismatchError(
                f"calibration batches must be LongTensors of token ids or dicts of model inputs, got {type(batch).__name__}"
            )
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if accepts_cache:
            batch.setdefault("use_cache", False)
        prepared.append(batch)
    if not prepared:
        raise CalibrationError("no calibration batch was given: compensation needs calibration activations")
    return prepared


def _keep_mask(batch: dict, state: torch.Tensor, stack_path: str) -> torch.Tensor | None:
    """The padding mask matching a stack's (batch, seq), preferring the decoder's for a decoder stack."""
    shape = tuple(state.shape[:2])
    order = list(reversed(_MASK_NAMES)) if "decoder" in stack_path else list(_MASK_NAMES)
    for name in order:
        mask = batch.get(name)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == shape:
            return mask.bool()
    return None


class _Setup:
    """What every fit starts from: checked arguments, units, gaps, batches, projections (and the fold probe)."""

    def __init__(self, model, plan, calibration_batches, method, ridge, verify):
        _check_method(method)
        self.folds = _fold_count(ridge)
        self.method = method
        self.names = list(plan.remove if isinstance(plan, PruningPlan) else plan)
        self.stacks = _stacks(model)
        self.gaps = _gaps(self.stacks, _removed_units(self.stacks, self.names))
        self.batches = _prepare_batches(model, calibration_batches)
        self.d = _width(model)
        self.device = next(model.parameters()).device
        self.projections = [_projections(model, gap.fold_unit, self.d) for gap in self.gaps]
        if verify:
            _verify_folds(model, self.stacks, self.gaps, self.projections, self.batches[0], self.d)

    def accumulator(self) -> "_GapAccumulator":
        return _GapAccumulator(self.d, self.method, self.folds, self.device)


# --------------------------------------------------------------------------- public API


def fit_compensation(
    model: nn.Module,
    plan: PruningPlan | list[str],
    calibration_batches: Iterable,
    method: str = "cosine",
    *,
    ridge: float | str = DEFAULT_RIDGE,
    verify: bool = True,
    progress: bool = False,
) -> list[GapFit]:
    """Fit one map per gap from the dense `model` (one calibration pass for all gaps); nothing is folded.

    The arguments are those of `compensate`. Returns one `GapFit` per gap, in
    depth order; `apply_compensation` folds them into the pruned model.
    """
    setup = _Setup(model, plan, calibration_batches, method, ridge, verify)
    if not setup.gaps:
        return []
    points = {}
    for gap in setup.gaps:
        stack = setup.stacks[gap.stack]
        for index in (gap.first - 1, gap.first, gap.last + 1):
            key, module, kind = stack.point(index)
            points[key] = (module, kind)
    statistics = [setup.accumulator() for _ in setup.gaps]
    first_row = 0
    with torch.no_grad(), _Capture(points) as capture:
        for batch in _progress(setup.batches, progress, "compensation statistics"):
            states = capture.run(model, batch)
            for gap, stats in zip(setup.gaps, statistics):
                _update(stats, setup.stacks[gap.stack], gap, states, states, batch, first_row)
            first_row += _rows(batch)
    return [_fit(gap, stats, proj, ridge) for gap, stats, proj in zip(setup.gaps, statistics, setup.projections)]


def compensate(
    model: nn.Module,
    plan: PruningPlan | list[str],
    calibration_batches: Iterable,
    method: str = "cosine",
    *,
    ridge: float | str = DEFAULT_RIDGE,
    sequential: bool = False,
    verify: bool = True,
    progress: bool = False,
    return_fits: bool = False,
):
    """A pruned copy of the dense `model` without `plan`'s blocks, each gap closed by a folded linear map.

    * `model`: the dense eager `transformers` model the plan was made for (not modified).
    * `plan`: a `PruningPlan` or a list of layer and sublayer names, as
      `export.remove_layers` takes them.
    * `calibration_batches`: LongTensors of token ids (n, seq), or dicts of model
      inputs (an `attention_mask` drops padding tokens; T5 needs
      `decoder_input_ids`). A list is best: `sequential` reads it once per gap.
    * `method`: "cosine" (token-normalised least squares, the default) or "lstsq"
      (plain least squares); see the module docstring.
    * `ridge`: shrinkage towards the identity, relative to tr(A)/d; "auto" (the
      default) picks it per gap from `RIDGE_GRID` by 4-fold cross-validation
      over the calibration sequences (4x the O(d^2) statistics memory).
    * `sequential`: fit the gaps one after the other from the pruned model's
      view (one extra pass per gap) instead of from one pass over the dense model.
    * `verify`: first check every fold numerically on a slice of one batch.

    The result has the parameter count and config of `export.remove_layers(model,
    plan)` and saves, reloads and generates like it. With `return_fits`, returns
    `(pruned_model, fits)`: one `GapFit` per gap with its calibration errors.
    """
    if isinstance(model, torch.fx.GraphModule):
        raise CompensationError(
            "compensate folds maps into the weights of the eager model: pass the transformers model the graph was "
            "traced from, then lorp_fx.trace the compensated model if you need its graph"
        )
    names = list(plan.remove if isinstance(plan, PruningPlan) else plan)
    if not sequential:
        fits = fit_compensation(model, names, calibration_batches, method, ridge=ridge, verify=verify, progress=progress)
        pruned = remove_layers(model, names)
        _apply(pruned, names, fits)
    else:
        pruned, fits = _compensate_sequential(model, names, calibration_batches, method, ridge, verify, progress)
    return (pruned, fits) if return_fits else pruned


def apply_compensation(pruned: nn.Module, plan: PruningPlan | list[str], fits: list[GapFit]) -> nn.Module:
    """Fold fitted maps into `pruned` (= `export.remove_layers(dense, plan)`), in place; returns it."""
    names = list(plan.remove if isinstance(plan, PruningPlan) else plan)
    _apply(pruned, names, fits)
    return pruned


# --------------------------------------------------------------------------- internals


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise LoRPError(f"unknown compensation method {method!r}; choose one of {', '.join(METHODS)}")


def _width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise CompensationError(f"cannot tell the residual width of {type(model).__name__}: its config has no hidden_size")


def _progress(items, enabled: bool, description: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="batch")


def _fold_count(ridge) -> int:
    if ridge == "auto":
        return CV_FOLDS
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise LoRPError(f"ridge must be 'auto' or a number >= 0, got {ridge!r}")
    return 1


def _rows(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return 1


def _update(
    stats: _GapAccumulator,
    stack: _Stack,
    gap: _Gap,
    unit_states: dict,
    target_states: dict,
    batch: dict,
    first_row: int,
    unit_stack: _Stack | None = None,
    unit_index: int | None = None,
) -> None:
    unit_stack = unit_stack or stack
    unit_index = gap.first - 1 if unit_index is None else unit_index
    x = unit_states[unit_stack.point(unit_index)[0]]
    x_out = unit_states[unit_stack.point(unit_index + 1)[0]]
    y = target_states[stack.point(gap.last + 1)[0]]
    if x.shape != y.shape:
        raise CompensationError(f"internal error: states of shapes {tuple(x.shape)} and {tuple(y.shape)} at one gap")
    stats.update(x, x_out, y, _keep_mask(batch, y, stack.path), first_row)


def _fit(gap: _Gap, accumulator: _GapAccumulator, projections: list[_Projection], ridge) -> GapFit:
    stats = accumulator.total()
    if stats.tokens == 0:
        raise CalibrationError("no calibration tokens reached this gap: the calibration batches are empty or all padding")
    cv_errors: dict = {}
    if ridge == "auto":
        ridge, cv_errors = accumulator.choose_ridge(stats)
    transform = stats.solve(float(ridge))
    return GapFit(
        removed=list(gap.removed),
        fold_into=gap.fold_unit.full_name,
        projections=[p.name for p in projections],
        transform=transform.cpu(),
        tokens=stats.tokens,
        error_before=stats.relative_error(None),
        error_after=stats.relative_error(transform),
        ridge=float(ridge),
        cv_errors=cv_errors,
    )


def _pruned_unit_name(unit: str, names: list[str], containers: list[str]) -> str:
    """The name that unit `unit` of the dense model has after `remove_layers(model, names)`."""
    for path in containers:
        if unit.startswith(path + "."):
            index, _, sub = unit[len(path) + 1 :].partition(".")
            removed_below = {
                n for n in names
                if n.rpartition(".")[0] == path and n.rpartition(".")[2].isdigit() and int(n.rpartition(".")[2]) < int(index)
            }
            return f"{path}.{int(index) - len(removed_below)}.{sub}"
    raise CompensationError(f"internal error: {unit} is in no layer list")


def _apply(pruned: nn.Module, names: list[str], fits: list[GapFit]) -> None:
    if not fits:
        return
    d = _width(pruned)
    containers = [path for path, _ in layer_containers(pruned)]
    units = {u.full_name: u for s in _stacks(pruned) for u in s.units}
    for fit in fits:
        target = _pruned_unit_name(fit.fold_into, names, containers)
        if target not in units:
            raise CompensationError(f"the pruned model has no unit {target} to fold the map of {fit.fold_into} into")
        _fold(_projections(pruned, units[target], d), fit.transform)


@torch.no_grad()
def _verify_folds(model, stacks, gaps, projections, batch, d) -> None:
    """Fold a random map into each fold unit of the dense model, check its branch output becomes T m, restore."""
    if not gaps:
        return
    probe = {k: (v[:1, :32] if isinstance(v, torch.Tensor) and v.dim() >= 2 and k != "encoder_outputs" else v) for k, v in batch.items()}
    generator = torch.Generator().manual_seed(0)
    for gap, projs in zip(gaps, projections):
        stack = stacks[gap.stack]
        entry, exit_ = stack.point(gap.first - 1), stack.point(gap.first)
        points = {entry[0]: entry[1:], exit_[0]: exit_[1:]}
        with _Capture(points) as capture:
            before = dict(capture.run(model, probe))
        transform = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
        saved = [p.param.detach().clone() for p in projs]
        try:
            _fold(projs, transform)
            with _Capture(points) as capture:
                after = dict(capture.run(model, probe))
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
                f"cannot compensate the gap after {gap.fold_unit.full_name}: a map folded into its output projection(s) "
                f"({', '.join(p.name for p in projs)}) does not transform its branch output linearly (the branch is "
                "normalised or otherwise non-linear after the projection); prune this model without compensation"
            )


def _compensate_sequential(model, names, calibration_batches, method, ridge, verify, progress):
    """Fit gaps in depth order, each from the pruned model with the earlier gaps already compensated.

    The skip input and branch output of the fold unit come from the pruned model,
    the target (the state after the gap) from the dense model, on the same batch.
    """
    setup = _Setup(model, names, calibration_batches, method, ridge, verify)
    pruned = remove_layers(model, setup.names)
    containers = [s.path for s in setup.stacks]
    pruned_stacks = {s.path: s for s in _stacks(pruned)}
    fits = []
    for gap, projections in zip(setup.gaps, setup.projections):
        stack = setup.stacks[gap.stack]
        p_stack = pruned_stacks[stack.path]
        target = _pruned_unit_name(gap.fold_unit.full_name, setup.names, containers)
        p_index = next(k for k, u in enumerate(p_stack.units) if u.full_name == target)
        key, module, kind = stack.point(gap.last + 1)
        dense_points = {key: (module, kind)}
        pruned_points = {}
        for index in (p_index, p_index + 1):
            key, module, kind = p_stack.point(index)
            pruned_points[key] = (module, kind)
        stats = setup.accumulator()
        first_row = 0
        with torch.no_grad(), _Capture(dense_points) as dense_capture, _Capture(pruned_points) as pruned_capture:
            for batch in _progress(setup.batches, progress, f"compensation statistics ({gap.fold_unit.full_name})"):
                target_states = dict(dense_capture.run(model, batch))
                unit_states = dict(pruned_capture.run(pruned, batch))
                _update(stats, stack, gap, unit_states, target_states, batch, first_row, unit_stack=p_stack, unit_index=p_index)
                first_row += _rows(batch)
        fit = _fit(gap, stats, projections, ridge)
        _fold(_projections(pruned, p_stack.units[p_index], setup.d), fit.transform)
        fits.append(fit)
    return pruned, fits
