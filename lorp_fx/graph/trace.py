"""Step 1 of the pipeline: turn a model into a `torch.fx.GraphModule`.

`transformers` models go through `torch.export` (non-strict), because
`torch.fx.symbolic_trace` cannot follow their control flow; plain modules try
`symbolic_trace` first, which keeps `call_module` nodes and needs no inputs.
Either way the result is a GraphModule (`graphs.LoRPGraphModule`) that can be
called the way the model was: positionally, by keyword or both, with the
non-tensor arguments it was traced with (`calls.py` checks them on every call).
It supports `.eval()`/`.train()` (Lightning calls them), `copy.deepcopy` and
`torch.save`, and exported graphs accept other batch sizes and sequence lengths.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Mapping

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils._sympy.numbers import int_oo

from lorp_fx.core.errors import ConfigError, InputMismatchError, TraceError, first_line
from lorp_fx.core.model import eval_mode, is_transformers_model
from lorp_fx.graph.module import graph_module
from lorp_fx.graph.traced_call import (
    FIXED,
    TENSOR,
    UNUSED,
    SizeRule,
    TracedCall,
    TracedCallCodeGen,
    TracedParameter,
)

ExampleInputs = Mapping[str, Any] | tuple | list | torch.Tensor


def trace(model: nn.Module, example_inputs: ExampleInputs | None = None, *, frontend: str = "auto") -> torch.fx.GraphModule:
    """Trace `model` into a GraphModule that behaves like it.

    `example_inputs` is a dict of keyword arguments (or a tuple of positional ones).
    Tensors become graph inputs with dynamic sizes; other values (such as
    `use_cache=False`) are fixed into the graph: the graph accepts them again with
    the same value, or left out, and raises `FixedArgumentError` for another value.
    A `transformers` model traced without `use_cache` is traced with
    `use_cache=False` (a KV cache cannot be traced). The fixed values are in
    `gm.meta["lorp_fx_fixed_arguments"]`, the ones lorp-fx chose itself in
    `gm.meta["lorp_fx_chosen_arguments"]` (name -> why).
    `frontend` is "auto", "export" or "symbolic_trace".
    """
    if frontend not in ("auto", "export", "symbolic_trace"):
        raise ConfigError(f"frontend must be 'auto', 'export' or 'symbolic_trace', not {frontend!r}")
    args, kwargs = _split_inputs(example_inputs)
    failures: list[str] = []
    order = _frontend_order(model, frontend, have_inputs=bool(args or kwargs))
    for name in order:
        try:
            gm = _symbolic_trace(model) if name == "symbolic_trace" else _export(model, args, kwargs)
        except InputMismatchError:
            raise
        except Exception as error:  # noqa: BLE001 - every frontend failure is reported together below
            failures.append(f"{name}: {type(error).__name__}: {first_line(error)}")
            continue
        if args or kwargs:
            _check_runs(gm, model, args, kwargs)
        return gm
    raise TraceError(
        f"could not trace {type(model).__name__} into a torch.fx graph ({'; '.join(failures)}). "
        + _cache_hint(failures)
        + "Pass example_inputs that the model accepts (a dict of keyword arguments), "
        "try the other frontend with frontend='export' or frontend='symbolic_trace', "
        "or make data-dependent Python control flow in forward() depend only on shapes."
    )


def _cache_hint(failures: list[str]) -> str:
    if not any("cache" in failure.lower() for failure in failures):
        return ""
    return "The model builds a KV cache (DynamicCache), which cannot be traced: pass use_cache=False in example_inputs. "


def _frontend_order(model: nn.Module, frontend: str, have_inputs: bool) -> list[str]:
    if frontend != "auto":
        return [frontend]
    if is_transformers_model(model):
        return ["export"]
    return ["symbolic_trace", "export"] if have_inputs else ["symbolic_trace"]



def _split_inputs(example_inputs: ExampleInputs | None) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise InputMismatchError(
        f"example_inputs must be a dict of keyword arguments or a tuple of positional arguments, "
        f"not {type(example_inputs).__name__}"
    )


def _symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    traced = torch.fx.symbolic_trace(model)
    return graph_module(traced, traced.graph, class_name=type(traced).__name__)


class _FixedArguments(nn.Module):
    """Calls a model with its tensor inputs by name and its other keyword arguments fixed.

    The model's children are registered under their own names, so parameter paths
    and `nn_module_stack` names in the exported graph are the model's
    (`model.layers.3`), not `wrapped.model.layers.3`.
    """

    def __init__(self, model: nn.Module, fixed: dict[str, Any]):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        self._model_forward = model.forward
        self._fixed = fixed

    def forward(self, **kwargs):
        return self._model_forward(**kwargs, **self._fixed)


def _named_signature_wrapper(model: nn.Module, fixed: dict[str, Any], names: list[str]) -> nn.Module:
    """A `_FixedArguments` whose forward declares `names` as parameters.

    torch.export binds inputs and dynamic shapes through `inspect.signature`, which
    a bare `**kwargs` forward does not give it.
    """

    def forward(self, **kwargs):
        return self._model_forward(**kwargs, **self._fixed)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
    )
    cls = type(type(model).__name__, (_FixedArguments,), {"forward": forward})
    return cls(model, fixed)


def _export(model: nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    if not (args or kwargs):
        raise TraceError("torch.export needs example inputs: pass example_inputs={'input_ids': ...}")
    if args:
        names = _positional_names(model, len(args))
        kwargs = {**dict(zip(names, args)), **kwargs}
    chosen = _chosen_arguments(model, kwargs)
    kwargs = {**kwargs, **{name: value for name, (value, _) in chosen.items()}}
    # Fresh contiguous copies: export guards a view through its base tensor, and a
    # later call without that base then fails inside the guard.
    tensors = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    tensors = _widen_batch(tensors)
    dynamic = {k: {d: Dim.AUTO for d in range(v.dim())} for k, v in tensors.items()}
    wrapper = _named_signature_wrapper(model, fixed, list(tensors))
    with eval_mode(model), torch.no_grad():
        program = torch.export.export(wrapper, (), kwargs=tensors, dynamic_shapes=dynamic, strict=False)
    # No guard submodule (a local object that cannot be pickled): TracedCall checks sizes itself.
    exported = program.module(check_guards=False)
    graph = exported.graph
    call = _traced_call(
        model, graph, fixed, {name: why for name, (_, why) in chosen.items()}, program.range_constraints, _config_defaults(model, fixed)
    )
    graph._codegen = TracedCallCodeGen(graph._codegen.pytree_info, call)
    # Our own GraphModule: the exported module's class refuses .eval()/.train(),
    # re-checks input names and cannot be pickled.
    gm = graph_module(exported, graph, class_name=type(model).__name__ + "Graph")
    gm.meta["lorp_fx_frontend"] = "export"
    gm.meta["lorp_fx_fixed_arguments"] = call.fixed
    gm.meta["lorp_fx_chosen_arguments"] = dict(call.chosen)
    return gm


# transformers options that take the config's value when left out of a call
_CONFIG_OPTIONS = ("return_dict", "output_attentions", "output_hidden_states", "output_router_logits", "use_cache")


def _config_defaults(model: nn.Module, passed: dict) -> dict[str, Any]:
    """What a transformers model uses for an option left out of the traced call: its config value."""
    config = getattr(model, "config", None)
    if not is_transformers_model(model) or config is None:
        return {}
    found = {}
    for name in _CONFIG_OPTIONS:
        value = getattr(config, name, None)
        if name not in passed and isinstance(value, bool):
            found[name] = value
    return found


def _chosen_arguments(model: nn.Module, kwargs: dict) -> dict[str, tuple[Any, str]]:
    """Arguments lorp-fx passes itself when the caller did not: use_cache=False for transformers models."""
    if not is_transformers_model(model) or "use_cache" in kwargs or "use_cache" not in _parameters(model):
        return {}
    return {"use_cache": (False, "a KV cache cannot be traced")}


def _parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _traced_call(
    model: nn.Module, graph: torch.fx.Graph, fixed: dict, chosen: dict, ranges: dict, defaults: dict
) -> TracedCall:
    """The model's forward signature, with each parameter's role in the trace.

    `defaults` are values the model uses for options left out (its config's); passing
    them explicitly is the same call, so the graph accepts them.
    """
    tensors = list(graph._codegen.pytree_info.orig_args)
    declared = _parameters(model)
    params, var_keyword = [], False
    for p in declared.values():
        if p.kind == p.VAR_KEYWORD:
            var_keyword = True
        elif p.kind != p.VAR_POSITIONAL:
            params.append(_traced_parameter(p.name, p.kind, p.default, tensors, fixed, defaults))
    for name in [*tensors, *fixed, *defaults]:
        if name not in declared and (var_keyword or name not in defaults):  # through the model's **kwargs
            params.append(_traced_parameter(name, inspect.Parameter.KEYWORD_ONLY, None, tensors, fixed, defaults))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values = {name: node.meta.get("val") for name, node in zip(tensors, placeholders)}
    return TracedCall(
        model=type(model).__name__,
        parameters=params,
        tensors=tensors,
        rank={name: v.dim() for name, v in values.items() if isinstance(v, torch.Tensor)},
        dtypes={name: v.dtype for name, v in values.items() if isinstance(v, torch.Tensor)},
        sizes=_size_rules(values, ranges),
        var_keyword=var_keyword,
        chosen=chosen,
    )


def _traced_parameter(name: str, kind, default: Any, tensors: list[str], fixed: dict, defaults: dict) -> TracedParameter:
    if name in tensors:
        return TracedParameter(name, kind, TENSOR)
    if name in fixed:
        return TracedParameter(name, kind, FIXED, fixed[name])
    return TracedParameter(name, kind, UNUSED, default, same=(defaults[name],) if name in defaults else ())


def _size_rules(values: dict[str, Any], ranges: dict) -> list[SizeRule]:
    """What the exported graph assumes about input sizes: fixed sizes, ranges, equal sizes."""
    rules = []
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            continue
        for dim, size in enumerate(value.shape):
            if isinstance(size, int):
                rules.append(SizeRule(name, dim, size=size))
                continue
            expr = size.node.expr
            if not expr.is_Symbol:
                continue  # derived sizes (2 * s0) follow from the others
            bounds = ranges.get(expr)
            low = _finite(bounds.lower) if bounds is not None else None
            high = _finite(bounds.upper) if bounds is not None else None
            # 0 and 1 are special-cased while tracing, not real limits (torch.export does the same)
            rules.append(SizeRule(name, dim, symbol=str(expr), low=low if low and low > 2 else None, high=high))
    return rules


def _finite(bound: Any) -> int | None:
    if bound in (int_oo, -int_oo) or not getattr(bound, "is_finite", True):
        return None
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _positional_names(model: nn.Module, count: int) -> list[str]:
    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) < count:
        raise InputMismatchError(f"{type(model).__name__}.forward takes {len(params)} positional inputs, got {count}")
    return params[:count]


def _widen_batch(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Repeat a batch of one to two, so export does not specialise the batch size to 1."""
    if not tensors or any(t.dim() == 0 or t.shape[0] != 1 for t in tensors.values()):
        return tensors
    return {k: v.expand(2, *v.shape[1:]).clone() for k, v in tensors.items()}


def _check_runs(gm: torch.fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        with torch.no_grad():
            gm(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise InputMismatchError(
            f"the traced {type(model).__name__} does not run on the example inputs "
            f"({type(error).__name__}: {first_line(error)}); check their names, shapes and dtypes"
        ) from None


def skeleton_graph(model: nn.Module, example: dict) -> GraphModule:
    """The graph of a meta-device copy of `model` (its class and config): for finding blocks, not for running."""
    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        skeleton = type(model)(config)
    skeleton.eval()
    meta_example = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in example.items()}
    return trace(skeleton, meta_example)
