"""What a graph node computes, as block discovery needs to know it: positions, ancestry, kinds of op.

`GraphIndex` holds a graph's topological order and answers ancestry questions;
the predicates name what a node computes (an add, a norm, attention, a
value-preserving cast) and which module owns it (`nn_module_stack`).
"""

from __future__ import annotations

import operator
import re
from collections import deque

import torch
from torch.fx import GraphModule, Node

from lorp_fx.graph.outputs import output_names

_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_PASSTHROUGH_NAMES = {"dropout", "to", "_to_copy", "clone", "contiguous", "alias", "detach", "type_as", "float", "type"}
_NORM_NAMES = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm", "LayerNorm", "RMSNorm"}
ATTENTION_NAMES = {"scaled_dot_product_attention", "flex_attention", "_scaled_dot_product_flash_attention"}
# Eager attention multiplies two activations (q @ k^T); a MoE router's softmax does not.
MATMUL_NAMES = {"matmul", "bmm", "baddbmm", "einsum", "__matmul__"}


class GraphIndex:
    """Topological positions and module paths of a graph's nodes."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.output = next((n for n in reversed(self.nodes) if n.op == "output"), None)
        self._output_names: dict[Node, list[str]] | None = None

    def output_names(self) -> dict[Node, list[str]]:
        if self._output_names is None:
            self._output_names = output_names(self.gm) if self.output is not None else {}
        return self._output_names

    def is_ancestor(self, ancestor: Node, node: Node) -> bool:
        floor = self.position[ancestor]
        seen, queue = {node}, deque([node])
        while queue:
            current = queue.popleft()
            for parent in current.all_input_nodes:
                if parent is ancestor:
                    return True
                if parent not in seen and self.position[parent] > floor:
                    seen.add(parent)
                    queue.append(parent)
        return False

    def descendants(self, node: Node) -> set[Node]:
        """`node` and everything computed from it."""
        found, queue = {node}, deque([node])
        while queue:
            for user in queue.popleft().users:
                if user not in found:
                    found.add(user)
                    queue.append(user)
        return found

    def between(self, entry: Node, exit: Node) -> set[Node]:
        """Nodes on some path from `entry` to `exit`, both excluded."""
        top, bottom = self.position[entry], self.position[exit]
        downstream, queue = set(), deque([entry])
        while queue:
            for user in queue.popleft().users:
                if user not in downstream and self.position[user] < bottom:
                    downstream.add(user)
                    queue.append(user)
        inside, queue = set(), deque([exit])
        while queue:
            for parent in queue.popleft().all_input_nodes:
                if parent in downstream and parent not in inside and self.position[parent] > top:
                    inside.add(parent)
                    queue.append(parent)
        return inside


def op_name(node: Node) -> str:
    """A short name for what a node computes: 'add', 'layer_norm', 'linear', ..."""
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__
    target = node.target
    if node.op == "call_method":
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def is_add(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in ("add", "add_", "__add__", "__iadd__")
    return node.op == "call_function" and node.target in _ADD_TARGETS


def tensor_operands(node: Node) -> list[Node]:
    return [a for a in node.args[:2] if isinstance(a, Node)]


WEIGHT_META = "lorp_fx_weight"  # marks a placeholder that holds a parameter (ExportedProgram graphs)


def is_weight(node: Node) -> bool:
    """A parameter, buffer or constant: a get_attr node, or a lifted one in an ExportedProgram graph."""
    return node.op == "get_attr" or (node.op == "placeholder" and bool(node.meta.get(WEIGHT_META)))


def uses_parameters(node: Node) -> bool:
    if node.op == "call_module":
        return any(True for _ in node.graph.owning_module.get_submodule(node.target).parameters())
    return any(is_weight(parent) for parent in node.all_input_nodes)


def same_shape(a: Node, b: Node) -> bool:
    """False only when both shapes are known and differ."""
    sa, sb = shape_of(a), shape_of(b)
    return sa is None or sb is None or sa == sb


def shape_of(node: Node):
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(str(s) for s in shape)


def module_paths(node: Node) -> list[str]:
    """Owning module paths, outermost first (empty when the tracer kept none)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if path and path not in paths:
            paths.append(path)
    return paths


def module_class(node: Node) -> str:
    """Class name of the innermost owning module ('' when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    value = list(stack.values())[-1]
    cls = value[1] if isinstance(value, tuple) and len(value) > 1 else ""
    return (getattr(cls, "__name__", None) or str(cls)).rsplit(".", 1)[-1]


def is_tensor(node: Node) -> bool:
    """False for shape arithmetic (SymInt values), True when unknown."""
    value = node.meta.get("val")
    return value is None or isinstance(value, (torch.Tensor, tuple, list))


def is_passthrough(node: Node) -> bool:
    return node.op != "placeholder" and op_name(node) in _PASSTHROUGH_NAMES and len(stream_inputs(node)) == 1


def is_norm(node: Node) -> bool:
    return op_name(node) in _NORM_NAMES and len(stream_inputs(node)) == 1


def stream_inputs(node: Node) -> list[Node]:
    return [p for p in node.all_input_nodes if not is_weight(p)]


LIST_ELEMENT = re.compile(r"\.\d+$")


def layer_path(node: Node) -> str | None:
    """The outermost owning module that is an element of a module list."""
    for path in module_paths(node):
        if LIST_ELEMENT.search(path):
            return path
    return None
