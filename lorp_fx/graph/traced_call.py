"""How a traced graph is called: with the model's own signature, and the traced values fixed.

`torch.export` traces one call of the model. Its tensors become graph inputs; every
other argument (`use_cache=False`, `return_dict=True`, `output_hidden_states=True`)
is baked into the graph. `TracedCall` remembers which is which, and
`TracedCallCodeGen` makes the graph's generated `forward` bind its arguments the
way the model's `forward` does: `gm(ids)`, `gm(input_ids=ids)` and
`gm(ids, use_cache=False)` all work. Each call is checked: a non-tensor argument
must be the value the graph was traced with (or left out), a parameter the trace
did not use must keep the model's default, and tensor sizes must fit the shapes
the graph was exported for. Anything else is an `InputMismatchError` that says
what to trace again with, rather than a wrong answer or an error deep in the graph.

The code generator lives on the graph (`graph._codegen`), so it survives every
copy of the graph: `prune`, `copy.deepcopy`, pickling (see `graphs.py`) and
`recompile()` after a pass edits the graph.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from lorp_fx.core.errors import CallError, FixedArgumentError, InputMismatchError

TENSOR, FIXED, UNUSED = "tensor", "fixed", "unused"
_NO_DEFAULT = inspect.Parameter.empty
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class TracedParameter:
    """One parameter of the model's forward, and what the trace made of it.

    `role` is TENSOR (a graph input), FIXED (`value` was traced into the graph) or
    UNUSED (not passed when tracing: only `value`, the model's default, is accepted).
    `same` are other values that the model treats as `value` (for a transformers
    option left out, the model's config value).
    """

    name: str
    kind: inspect._ParameterKind
    role: str
    value: Any = None
    same: tuple = ()


@dataclass(frozen=True)
class SizeRule:
    """`input.size(dim)` must equal `size`, or lie in [low, high] and equal every other dim of `symbol`."""

    input: str
    dim: int
    size: int | None = None
    symbol: str | None = None
    low: int | None = None
    high: int | None = None


@dataclass(eq=False)  # hashed by identity: fx registers it as a global of the generated code
class TracedCall:
    """The model's call signature as traced: the parameters, their roles and the size rules."""

    model: str
    parameters: list[TracedParameter]
    tensors: list[str]  # graph inputs, in the order the graph's input spec flattens them
    rank: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # of the traced tensors (the graph checks them exactly)
    sizes: list[SizeRule] = field(default_factory=list)
    var_keyword: bool = False
    chosen: dict[str, str] = field(default_factory=dict)  # fixed arguments lorp_fx picked, and why

    @property
    def fixed(self) -> dict[str, Any]:
        return {p.name: p.value for p in self.parameters if p.role == FIXED}

    def signature(self) -> inspect.Signature:
        """What `inspect.signature(gm.forward)` shows: the model's parameters, traced values as defaults."""
        params = []
        for p in self.parameters:
            default = _NO_DEFAULT if p.role == TENSOR else p.value
            if p.role == TENSOR and params and params[-1].default is not _NO_DEFAULT and p.kind in _POSITIONAL:
                default = None  # Python forbids a required positional after an optional one
            params.append(inspect.Parameter(p.name, p.kind, default=default))
        return inspect.Signature(_ordered(params))

    def bind(self, args: tuple, kwargs: dict) -> tuple:
        """The graph inputs of one call, in `self.tensors` order, after checking the call."""
        given = self._match(args, kwargs)
        for p in self.parameters:
            if p.name in given:
                self._check(p, given[p.name])
            elif p.role == TENSOR:
                raise InputMismatchError(
                    f"{self.model} graph: missing input {p.name!r}; the graph was traced with a tensor for it, pass one"
                )
        tensors = tuple(self._as_traced_dtype(name, given[name]) for name in self.tensors)
        self._check_sizes(tensors)
        return tensors

    # ------------------------------------------------------------------ checks

    def _match(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        positional = [p for p in self.parameters if p.kind in _POSITIONAL]
        if len(args) > len(positional):
            raise CallError(f"{self.model}.forward() takes {len(positional)} positional arguments but {len(args)} were given")
        given = {p.name: value for p, value in zip(positional, args)}
        names = {p.name: p for p in self.parameters}
        for name, value in kwargs.items():
            param = names.get(name)
            if param is None or param.kind == inspect.Parameter.POSITIONAL_ONLY:
                if self.var_keyword and value is None:
                    continue  # the model's **kwargs: None is what leaving it out means
                if self.var_keyword:
                    raise FixedArgumentError(f"{name}={_show(value)} was not passed when this graph was traced; {_again(name, value)}")
                raise CallError(f"{self.model}.forward() got an unexpected keyword argument {name!r}")
            if name in given:
                raise CallError(f"{self.model}.forward() got multiple values for argument {name!r}")
            given[name] = value
        return given

    def _check(self, param: TracedParameter, value: Any) -> None:
        if param.role == TENSOR:
            if not isinstance(value, torch.Tensor):
                raise FixedArgumentError(
                    f"{param.name}={_show(value)}, but this graph was traced with a tensor for {param.name}; "
                    + _again(param.name, value)
                )
            if value.dim() != self.rank.get(param.name, value.dim()):
                raise InputMismatchError(
                    f"{param.name} has {value.dim()} dimensions, but this graph was traced with "
                    f"{self.rank[param.name]}; trace again with inputs of this shape"
                )
        elif not any(same_value(value, v) for v in (param.value, *param.same)):
            if param.role == FIXED:
                why = f" (lorp_fx.trace chose it: {self.chosen[param.name]})" if param.name in self.chosen else ""
                raise FixedArgumentError(
                    f"{param.name}={_show(value)}, but this graph was traced with {param.name}={_show(param.value)}{why}; "
                    + _again(param.name, value)
                )
            raise FixedArgumentError(
                f"{param.name}={_show(value)} was not passed when this graph was traced; " + _again(param.name, value)
            )

    def _as_traced_dtype(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` in the dtype the graph was traced with, where the model itself would read it the same way:
        token ids and masks as any integer or bool dtype, or as floats holding whole numbers (a 0./1. mask).
        Anything else (fractional values for an integer input, ids for a float input) is refused here, in
        one line, instead of by the graph's own dtype guard deep inside torch."""
        traced = self.dtypes.get(name)
        if traced is None or value.dtype == traced:
            return value
        integral = not (traced.is_floating_point or traced.is_complex)
        if integral and (not value.dtype.is_floating_point or bool((value == value.trunc()).all())):
            return value.to(traced)
        raise InputMismatchError(
            f"{name} has dtype {str(value.dtype).removeprefix('torch.')}, but this graph was traced with "
            f"{str(traced).removeprefix('torch.')}; pass {name} as {str(traced).removeprefix('torch.')}"
        )

    def _check_sizes(self, tensors: tuple) -> None:
        by_name = dict(zip(self.tensors, tensors))
        seen: dict[str, tuple[str, int]] = {}
        for rule in self.sizes:
            size = int(by_name[rule.input].shape[rule.dim])
            where = f"{rule.input}.size({rule.dim})={size}"
            if rule.size is not None and size != rule.size:
                raise InputMismatchError(
                    f"{where}, but this graph was traced for size {rule.size} there; trace again with inputs of this shape"
                )
            if (rule.low is not None and size < rule.low) or (rule.high is not None and size > rule.high):
                raise InputMismatchError(
                    f"{where} is outside {rule.low}..{rule.high}, the sizes this graph was traced for (the model limits them)"
                )
            if rule.symbol is not None:
                other = seen.setdefault(rule.symbol, (where, size))
                if other[1] != size:
                    raise InputMismatchError(f"{where} must equal {other[0]}: the model needs them equal")


class TracedCallCodeGen(_PyTreeCodeGen):
    """The pytree code generator of `torch.export`, with `TracedCall` binding the arguments.

    Generated prologue:
        def forward(self, *_lorp_fx_args, **_lorp_fx_kwargs):
            input_ids, = _lorp_fx_call.bind(_lorp_fx_args, _lorp_fx_kwargs)
            input_ids, = fx_pytree.tree_flatten_spec(([], {'input_ids':input_ids}), self._in_spec)
    """

    def __init__(self, pytree_info: _PyTreeInfo, call: TracedCall):
        super().__init__(pytree_info)
        self.call = call

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        names = list(self.pytree_info.orig_args)
        head = f"def {self._func_name}(self, *_lorp_fx_args, **_lorp_fx_kwargs){maybe_return_annotation}:"
        head += f"\n    {', '.join(names)}, = _lorp_fx_call.bind(_lorp_fx_args, _lorp_fx_kwargs)"
        if free_vars:
            head += self.gen_var_bindings(names, free_vars, expanded_def)
        return head

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [("_lorp_fx_call", self.call)]


def same_value(given: Any, traced: Any) -> bool:
    """Whether a non-tensor argument is the traced one: identical, or equal and of the same type."""
    if given is traced:
        return True
    if type(given) is not type(traced) or isinstance(given, torch.Tensor):
        return False
    try:
        return bool(given == traced)
    except Exception:  # noqa: BLE001 - values without a usable == are simply different
        return False


def _again(name: str, value: Any) -> str:
    """What to do instead: advice that works (a graph cannot hold a KV cache, so tracing again with one fails)."""
    if name == "use_cache" and value is True:
        return ("a traced graph computes whole windows without a KV cache: call it without use_cache (or with "
                "use_cache=False), and generate with the eager model (lorp_fx.remove_layers keeps it a transformers model)")
    if isinstance(value, torch.Tensor):
        return f"trace again with a tensor for {name} in the example inputs"
    return f"trace again with {name}={_show(value)} in the example inputs"


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor of shape {tuple(value.shape)}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ordered(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Parameters in a valid order (positional before keyword-only before **kwargs)."""
    return sorted(params, key=lambda p: p.kind)
