"""Step 1 of the pipeline: turn a model into a `torch.fx.GraphModule`.

`transformers` models go through `torch.export` (non-strict), because
`torch.fx.symbolic_trace` cannot follow their control flow; plain modules try
`symbolic_trace` first, which keeps `call_module` nodes and needs no inputs.
Either way the result is an ordinary GraphModule: it can be called with the same
keyword arguments as the model, it supports `.eval()`/`.train()` (Lightning calls
them), and exported graphs accept other batch sizes and sequence lengths.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn
from torch.export import Dim

from .errors import InputMismatchError, TraceError

ExampleInputs = Mapping[str, Any] | tuple | list | torch.Tensor


def trace(model: nn.Module, example_inputs: ExampleInputs | None = None, *, frontend: str = "auto") -> torch.fx.GraphModule:
    """Trace `model` into a GraphModule that behaves like it.

    `example_inputs` is a dict of keyword arguments (or a tuple of positional ones).
    Tensors become graph inputs with dynamic sizes; other values (such as
    `use_cache=False`) are fixed into the graph and need not be passed again.
    `frontend` is "auto", "export" or "symbolic_trace".
    """
    if frontend not in ("auto", "export", "symbolic_trace"):
        raise ValueError(f"frontend must be 'auto', 'export' or 'symbolic_trace', not {frontend!r}")
    args, kwargs = _split_inputs(example_inputs)
    failures: list[str] = []
    order = _frontend_order(model, frontend, have_inputs=bool(args or kwargs))
    for name in order:
        try:
            gm = _symbolic_trace(model) if name == "symbolic_trace" else _export(model, args, kwargs)
        except InputMismatchError:
            raise
        except Exception as error:  # noqa: BLE001 - every frontend failure is reported together below
            failures.append(f"{name}: {type(error).__name__}: {_first_line(error)}")
            continue
        if args or kwargs:
            _check_runs(gm, model, args, kwargs)
        return gm
    raise TraceError(
        f"could not trace {type(model).__name__} into a torch.fx graph ({'; '.join(failures)}). "
        "Pass example_inputs that the model accepts (a dict of keyword arguments), "
        "try the other frontend with frontend='export' or frontend='symbolic_trace', "
        "or make data-dependent Python control flow in forward() depend only on shapes."
    )


def _frontend_order(model: nn.Module, frontend: str, have_inputs: bool) -> list[str]:
    if frontend != "auto":
        return [frontend]
    if _is_transformers_model(model):
        return ["export"]
    return ["symbolic_trace", "export"] if have_inputs else ["symbolic_trace"]


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(model)


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
    # Fresh contiguous copies: export guards a view through its base tensor, and a
    # later call without that base then fails inside the guard.
    tensors = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    tensors = _widen_batch(tensors)
    dynamic = {k: {d: Dim.AUTO for d in range(v.dim())} for k, v in tensors.items()}
    wrapper = _named_signature_wrapper(model, fixed, list(tensors))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, (), kwargs=tensors, dynamic_shapes=dynamic, strict=False)
    finally:
        model.train(was_training)
    exported = program.module()
    # A plain GraphModule: the exported module's class refuses .eval()/.train()
    # and re-checks input names, both of which get in Lightning's way.
    gm = torch.fx.GraphModule(exported, exported.graph, class_name=type(model).__name__ + "Graph")
    gm.meta["lorp_fx_frontend"] = "export"
    return gm


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
    if gm.meta.get("lorp_fx_frontend") == "export":
        if args:
            kwargs = {**dict(zip(_positional_names(model, len(args)), args)), **kwargs}
            args = ()
        kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    try:
        with torch.no_grad():
            gm(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise InputMismatchError(
            f"the traced {type(model).__name__} does not run on the example inputs "
            f"({type(error).__name__}: {_first_line(error)}); check their names, shapes and dtypes"
        ) from None
