"""The GraphModule class lorp-fx returns: one that survives `torch.save`/`torch.load`.

torch.fx pickles a GraphModule as its generated Python code and traces that code
again when loading. For a graph that came from `torch.export` this fails (the
exporter's tracer class and guard module cannot be rebuilt), and where it works it
loses the node metadata that names residual blocks. `LoRPGraphModule` pickles the
graph itself: every node with its operation, its arguments and the metadata
lorp-fx reads (module paths, value shapes), plus the code generator that binds
calls (`calls.py`). A loaded graph runs, prunes and pickles like the saved one.

Value shapes are saved with their example sizes: symbolic sizes only matter while
exporting, and block finding compares shapes, which example sizes keep apart.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import _get_qualified_name

_KEPT_META = ("nn_module_stack", "val", "stack_trace")


class LoRPGraphModule(GraphModule):
    """A GraphModule that pickles its graph and metadata rather than its generated code.

    Its `forward` shows the model's signature to `inspect.signature` when the
    graph binds calls the model's way (`calls.TracedCallCodeGen`).
    """

    def recompile(self):
        code = super().recompile()
        call = getattr(self.graph._codegen, "call", None)
        if call is not None:
            shown = call.signature()
            self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
            type(self).forward.__signature__ = shown.replace(parameters=[self_param, *shown.parameters.values()])
        return code

    def __reduce__(self):
        state = self.__dict__.copy()
        del state["_graph"]
        for generated in ("_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec"):
            state.pop(generated, None)  # recompile() makes them again
        return (_restore, (state, _graph_record(self.graph), type(self).__name__))


def graph_module(root: nn.Module, graph: Graph, class_name: str) -> LoRPGraphModule:
    return LoRPGraphModule(root, graph, class_name=class_name)


class _Holder(nn.Module):
    def __init__(self, state: dict):
        super().__init__()
        self.__dict__ = state


def _restore(state: dict, record: dict, class_name: str) -> LoRPGraphModule:
    gm = LoRPGraphModule(_Holder(dict(state)), _rebuild_graph(record), class_name=class_name)
    for key, value in state.items():  # attributes the graph does not reference (as torch.fx does)
        if not hasattr(gm, key):
            setattr(gm, key, value)
    gm.meta = state.get("meta", {})
    gm.train(state.get("training", True))
    return gm


# --------------------------------------------------------------------------- saving


class _Ref:
    """A node named in another node's arguments."""

    def __init__(self, name: str):
        self.name = name


def _graph_record(graph: Graph) -> dict:
    nodes = [
        (node.name, node.op, _target_record(node.target), _arg_record(node.args), _arg_record(node.kwargs), _meta_record(node.meta))
        for node in graph.nodes
    ]
    return {"nodes": nodes, "codegen": graph._codegen}


def _target_record(target: Any) -> tuple:
    if isinstance(target, str):
        return ("str", target)
    if isinstance(target, torch._ops.OpOverload):
        return ("op", target.namespace, target._schema.name.split("::")[-1], target._overloadname)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return ("packet", *target._qualified_op_name.split("::"))
    if isinstance(target, torch._ops.HigherOrderOperator):
        return ("higher_order", target.name())
    try:
        name = _get_qualified_name(target)  # "torch.tanh", "_operator.getitem", "torch.sym_float"
    except Exception:  # noqa: BLE001 - not a named callable: pickle the object itself
        return ("object", target)
    return ("python", name) if "<locals>" not in name else ("object", target)


def _arg_record(value: Any) -> Any:
    if isinstance(value, Node):
        return _Ref(value.name)
    if isinstance(value, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return ("__lorp_fx_target__", _target_record(value))
    if isinstance(value, tuple):
        return tuple(_arg_record(v) for v in value)
    if isinstance(value, list):
        return [_arg_record(v) for v in value]
    if isinstance(value, dict):
        return {k: _arg_record(v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_arg_record(value.start), _arg_record(value.stop), _arg_record(value.step))
    return value


def _meta_record(meta: dict) -> dict:
    kept = {}
    for key, value in meta.items():
        if key == "nn_module_stack":
            kept[key] = {k: (v[0], _class_name(v[1])) if isinstance(v, tuple) else str(v) for k, v in value.items()}
        elif key == "val":
            kept[key] = _value_record(value)
        elif key in _KEPT_META or key.startswith("lorp_fx"):
            kept[key] = value
    return kept


def _class_name(cls: Any) -> str:
    if isinstance(cls, str):
        return cls
    return f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', str(cls))}"


def _value_record(value: Any) -> Any:
    """A picklable stand-in for a node's example value: meta tensors of the example sizes."""
    if isinstance(value, torch.Tensor):
        shape = [_hint(s) for s in value.shape]
        return torch.empty(shape, dtype=value.dtype, device="meta")
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _hint(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_value_record(v) for v in value) if isinstance(value, list) else tuple(_value_record(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None


def _hint(size: Any) -> Any:
    if isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        node = size.node
        return node.hint if node.has_hint() else 2
    return size


# --------------------------------------------------------------------------- loading


def _rebuild_graph(record: dict) -> Graph:
    graph = Graph()
    graph._codegen = record["codegen"]
    env: dict[str, Node] = {}
    for name, op, target, args, kwargs, meta in record["nodes"]:
        node = graph.create_node(op, _target(target), _args(args, env), _args(kwargs, env), name=name)
        node.meta.update(meta)
        env[name] = node
    return graph


def _target(record: tuple) -> Any:
    kind, *rest = record
    if kind == "str":
        return rest[0]
    if kind == "op":
        namespace, name, overload = rest
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    if kind == "packet":
        namespace, name = rest
        return getattr(getattr(torch.ops, namespace), name)
    if kind == "higher_order":
        return getattr(torch.ops.higher_order, rest[0])
    if kind == "python":
        return _import(rest[0])
    return rest[0]


def _import(qualified: str) -> Any:
    """The object named `package.module.attribute.attribute`: the longest importable module, then attributes."""
    parts = qualified.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            value = getattr(value, part)
        return value
    raise ImportError(f"cannot import {qualified}")


def _args(value: Any, env: dict[str, Node]) -> Any:
    if isinstance(value, _Ref):
        return env[value.name]
    if isinstance(value, tuple):
        if len(value) == 2 and value[0] == "__lorp_fx_target__":
            return _target(value[1])
        return tuple(_args(v, env) for v in value)
    if isinstance(value, list):
        return [_args(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _args(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_args(value.start, env), _args(value.stop, env), _args(value.step, env))
    return value
