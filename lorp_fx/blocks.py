"""Step 2 of the pipeline: find the residual blocks of a traced model.

A residual block is found from the graph's structure alone: an `add(x, f(x))`
whose skip operand `x` is an ancestor of the other operand, and whose branch
`f` does work with parameters. Rotary embeddings (`q*cos + rot(q)*sin`), norm
epsilons (`mean + 1e-6`) and position arithmetic (`arange + 0`) fail that test.

Residual adds chain into *streams*: the skip operand of one add is the previous
add, reached through value-preserving ops (dropout, dtype casts) and, in
post-norm models such as BERT, a normalisation: `norm(x + f(x))`. An
encoder-decoder has two streams; the encoder comes first.

Each add is a sublayer (attention, MLP, cross-attention). Sublayers are grouped
into layers by the module that owns them (`nn_module_stack`): the outermost
module path that is an element of a list (`model.layers.3`, `encoder.block.2`).
Module metadata only names and groups what the structure found; where it is
missing, blocks are named after their residual add.
"""

from __future__ import annotations

import operator
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch.fx import GraphModule, Node

from .errors import NoResidualBlocksError
from .outputs import output_names, producing_options

GRANULARITIES = ("layer", "sublayer")

_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_PASSTHROUGH_NAMES = {"dropout", "to", "_to_copy", "clone", "contiguous", "alias", "detach", "type_as", "float", "type"}
_NORM_NAMES = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm", "LayerNorm", "RMSNorm"}
_ATTENTION_NAMES = {"scaled_dot_product_attention", "flex_attention", "_scaled_dot_product_flash_attention"}
# Eager attention multiplies two activations (q @ k^T); a MoE router's softmax does not.
_MATMUL_NAMES = {"matmul", "bmm", "baddbmm", "einsum", "__matmul__"}


@dataclass(eq=False)
class ResidualBlock:
    """One removable unit: `exit = x + f(x)` (or `norm(x + f(x))`) with `x = entry`.

    `nodes` are the graph nodes the block owns: removing the block erases them and
    hands `entry` to every user of `exit`. A block that is not `removable` owns a
    node that something outside it uses; `reason` says which.
    """

    name: str
    index: int
    kind: str
    entry: Node
    exit: Node
    residual_add: Node
    stream: int
    nodes: list[Node] = field(repr=False, default_factory=list)
    sublayers: list[str] = field(default_factory=list)
    removable: bool = True
    reason: str | None = None

    def __repr__(self) -> str:
        state = "" if self.removable else f", not removable: {self.reason}"
        return f"ResidualBlock({self.index}: {self.name!r}, {self.kind}, {self.entry.name} -> {self.exit.name}{state})"


def find_blocks(gm: GraphModule, granularity: str = "layer") -> list[ResidualBlock]:
    """The residual blocks of `gm` (a GraphModule or a `torch.export.ExportedProgram`) in depth order.

    Encoder blocks come before decoder blocks.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    if isinstance(gm, torch.export.ExportedProgram):
        from .program import program_blocks  # program.py builds on this module

        return program_blocks(gm, granularity)
    graph = _GraphIndex(gm)
    streams = _residual_streams(graph)
    if not streams:
        raise NoResidualBlocksError(
            f"{type(gm).__name__} has no residual block: no add(x, f(x)) whose branch f uses parameters. "
            "lorp-fx prunes residual networks (transformers, ResNets); "
            "check that the model adds its input back to a parametric branch"
        )
    sublayers = _sublayers(graph, streams)
    blocks = [sub for sub, _ in sublayers] if granularity == "sublayer" else _group_into_layers(sublayers)
    for index, block in enumerate(blocks):
        block.index = index
        _claim_nodes(graph, block)
    return blocks


# --------------------------------------------------------------------------- graph helpers


class _GraphIndex:
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


def _op_name(node: Node) -> str:
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


def _is_add(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in ("add", "add_", "__add__", "__iadd__")
    return node.op == "call_function" and node.target in _ADD_TARGETS


def _tensor_operands(node: Node) -> list[Node]:
    return [a for a in node.args[:2] if isinstance(a, Node)]


WEIGHT_META = "lorp_fx_weight"  # marks a placeholder that holds a parameter (ExportedProgram graphs)


def is_weight(node: Node) -> bool:
    """A parameter, buffer or constant: a get_attr node, or a lifted one in an ExportedProgram graph."""
    return node.op == "get_attr" or (node.op == "placeholder" and bool(node.meta.get(WEIGHT_META)))


def _uses_parameters(node: Node) -> bool:
    if node.op == "call_module":
        return any(True for _ in node.graph.owning_module.get_submodule(node.target).parameters())
    return any(is_weight(parent) for parent in node.all_input_nodes)


def _same_shape(a: Node, b: Node) -> bool:
    """False only when both shapes are known and differ."""
    sa, sb = _shape(a), _shape(b)
    return sa is None or sb is None or sa == sb


def _shape(node: Node):
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(str(s) for s in shape)


def _module_paths(node: Node) -> list[str]:
    """Owning module paths, outermost first (empty when the tracer kept none)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if path and path not in paths:
            paths.append(path)
    return paths


def _module_class(node: Node) -> str:
    """Class name of the innermost owning module ('' when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    value = list(stack.values())[-1]
    cls = value[1] if isinstance(value, tuple) and len(value) > 1 else ""
    return (getattr(cls, "__name__", None) or str(cls)).rsplit(".", 1)[-1]


def _is_tensor(node: Node) -> bool:
    """False for shape arithmetic (SymInt values), True when unknown."""
    value = node.meta.get("val")
    return value is None or isinstance(value, (torch.Tensor, tuple, list))


def _is_passthrough(node: Node) -> bool:
    return node.op != "placeholder" and _op_name(node) in _PASSTHROUGH_NAMES and len(_stream_inputs(node)) == 1


def _is_norm(node: Node) -> bool:
    return _op_name(node) in _NORM_NAMES and len(_stream_inputs(node)) == 1


def _stream_inputs(node: Node) -> list[Node]:
    return [p for p in node.all_input_nodes if not is_weight(p)]


# --------------------------------------------------------------------------- residual streams


@dataclass(eq=False)
class _Residual:
    add: Node
    skip: Node  # the operand x in x + f(x)
    entry: Node = None  # the stream node this sublayer reads
    exit: Node = None  # the stream node it writes: the add, or norm(add)
    stream: int = 0


def _residual_adds(graph: _GraphIndex) -> list[_Residual]:
    found = []
    for node in graph.nodes:
        if not _is_add(node):
            continue
        operands = _tensor_operands(node)
        if len(operands) != 2 or operands[0] is operands[1]:
            continue
        for skip, branch in (operands, operands[::-1]):
            if _same_shape(skip, node) and graph.is_ancestor(skip, branch):
                inside = graph.between(skip, node)
                if any(_uses_parameters(n) for n in inside):
                    found.append(_Residual(add=node, skip=skip))
                    break
    return found


def _walk_back(node: Node, through_norms: bool) -> tuple[Node, list[Node]]:
    """Follow value-preserving ops up from `node`; returns where it stopped and the path."""
    path = []
    while _is_passthrough(node) or (through_norms and _is_norm(node)):
        path.append(node)
        node = _stream_inputs(node)[0]
    return node, path


def _residual_streams(graph: _GraphIndex) -> list[list[_Residual]]:
    residuals = _residual_adds(graph)
    by_add = {r.add: r for r in residuals}
    streams: list[list[_Residual]] = []
    for residual in residuals:
        origin, path = _walk_back(residual.skip, through_norms=True)
        previous = by_add.get(origin)
        if previous is not None and previous.exit is None:
            norms = [n for n in path if _is_norm(n)]
            previous.exit = norms[0] if norms else previous.add  # path runs upward: first norm is the last one applied
            residual.entry = previous.exit
            residual.stream = previous.stream
            streams[residual.stream].append(residual)
        else:
            residual.entry, _ = _walk_back(residual.skip, through_norms=False)
            residual.stream = len(streams)
            streams.append([residual])
    for stream in streams:
        _close_stream(stream)
    return streams


def _close_stream(stream: list[_Residual]) -> None:
    """Set the exit of a stream's last sublayer: its add, or the norm after it in a post-norm model."""
    last = stream[-1]
    last.exit = last.add
    users = list(last.add.users)
    if len(users) != 1 or not _is_norm(users[0]):
        return
    post_norm_links = [r for r in stream[:-1] if r.exit is not r.add]
    layer = _layer_path(last.add)
    if stream[:-1] and len(post_norm_links) == len(stream) - 1:
        last.exit = users[0]
    elif len(stream) == 1 and layer and any(p.startswith(layer + ".") for p in _module_paths(users[0])):
        last.exit = users[0]


# --------------------------------------------------------------------------- naming and grouping

_LIST_ELEMENT = re.compile(r"\.\d+$")


def _layer_path(node: Node) -> str | None:
    """The outermost owning module that is an element of a module list."""
    for path in _module_paths(node):
        if _LIST_ELEMENT.search(path):
            return path
    return None


def _common_path(paths: Iterable[str]) -> str:
    parts = None
    for path in paths:
        pieces = path.split(".")
        if parts is None:
            parts = pieces
            continue
        keep = 0
        while keep < min(len(parts), len(pieces)) and parts[keep] == pieces[keep]:
            keep += 1
        parts = parts[:keep]
    return ".".join(parts or [])


def _is_attention(node: Node) -> bool:
    name = _op_name(node)
    if name in _ATTENTION_NAMES:
        return True
    return name in _MATMUL_NAMES and len(_stream_inputs(node)) >= 2


def _sublayer_kind(inside: set[Node], foreign: set[Node], own: set[Node]) -> str:
    """'attention', 'cross_attention' (attends to another stream's states) or 'mlp'."""
    if not any(_is_attention(n) for n in inside):
        return "mlp"
    reads = {p for n in inside for p in n.all_input_nodes if p not in inside}
    if any(p in foreign and p not in own for p in reads):
        return "cross_attention"
    return "attention"


def _sublayer_name(inside: set[Node], residual: _Residual, kind: str, layer: str | None) -> str:
    # The branch's own module: where its parametric, non-norm work lives.
    # Weights often reach the branch through a transpose or cast outside it: look one step up.
    candidates = set(inside) | {p for n in inside for p in n.all_input_nodes if not is_weight(p)}
    candidates.discard(residual.entry)
    working = [n for n in candidates if _uses_parameters(n) and not _is_norm(n) and "Norm" not in _module_class(n)]
    paths = [_module_paths(n)[-1] for n in working if _module_paths(n)]
    common = _common_path(paths) if paths else ""
    add_paths = _module_paths(residual.add)
    own = add_paths[-1] if add_paths else ""
    # T5 wraps each sublayer with its residual add (encoder.block.1.layer.0): name the wrapper.
    if layer and own.startswith(layer + ".") and (common == own or common.startswith(own + ".")):
        return own
    if common and common != layer and (layer is None or common.startswith(layer + ".")):
        return common
    if layer:
        return f"{layer}:{kind}"
    return f"{residual.add.name}:{kind}"


def _sublayers(graph: _GraphIndex, streams: list[list[_Residual]]) -> list[tuple[ResidualBlock, str]]:
    """Every residual add as a block, with the path of the layer that owns it."""
    downstream_of_start = [graph.descendants(stream[0].entry) for stream in streams]
    downstream_of_end = [graph.descendants(stream[-1].exit) for stream in streams]
    blocks = []
    for s, stream in enumerate(streams):
        foreign = set().union(*(d for i, d in enumerate(downstream_of_end) if i != s))
        for residual in stream:
            inside = graph.between(residual.entry, residual.add)
            kind = _sublayer_kind(inside, foreign, downstream_of_start[s])
            layer = _layer_path(residual.add)
            block = ResidualBlock(
                name=_sublayer_name(inside, residual, kind, layer),
                index=len(blocks),
                kind=kind,
                entry=residual.entry,
                exit=residual.exit,
                residual_add=residual.add,
                stream=s,
            )
            blocks.append((block, layer or residual.add.name))
    return blocks


def _group_into_layers(sublayers: list[tuple[ResidualBlock, str]]) -> list[ResidualBlock]:
    layers: list[ResidualBlock] = []
    for sub, owner in sublayers:
        current = layers[-1] if layers else None
        if current is not None and current.name == owner and current.stream == sub.stream and _named_layer(owner):
            current.exit = sub.exit
            current.residual_add = sub.residual_add
            current.sublayers.append(sub.name)
            continue
        layers.append(
            ResidualBlock(
                name=owner if _named_layer(owner) else sub.name,
                index=len(layers),
                kind="layer",
                entry=sub.entry,
                exit=sub.exit,
                residual_add=sub.residual_add,
                stream=sub.stream,
                sublayers=[sub.name],
            )
        )
    return layers


def _named_layer(path: str) -> bool:
    return bool(_LIST_ELEMENT.search(path))


# --------------------------------------------------------------------------- ownership


def _claim_nodes(graph: _GraphIndex, block: ResidualBlock) -> None:
    """Collect the nodes `block` owns and decide whether it can be removed.

    A block owns the nodes between its entry and exit, the nodes of its own module
    that feed it without touching the stream (T5's relative position bias), and
    side-effect-only nodes hanging off them (shape asserts). It is removable when
    none of those is used outside the block, except by the graph's output: a
    returned copy of the entry (a recorded hidden state) is not owned and stays, and
    a returned value of the block's own (attention weights) becomes None.
    """
    inside = graph.between(block.entry, block.exit)
    owned = set(inside) | {block.exit}
    scopes = _block_scopes(block)
    queue = deque(owned)
    while queue:
        for parent in queue.popleft().all_input_nodes:
            if parent in owned or parent is block.entry or parent.op in ("placeholder", "get_attr"):
                continue
            if scopes and any(_in_scope(path, scopes) for path in _module_paths(parent)[-1:]):
                owned.add(parent)
                queue.append(parent)
    # Side-effect-only nodes (shape asserts) on the block's values or weights go with it.
    weights = {p for n in owned for p in n.all_input_nodes if is_weight(p)}
    allowed = owned | weights | {block.entry}
    for node in list(owned | weights):
        for user in node.users:
            if not user.users and user.op != "output" and user not in owned and set(user.all_input_nodes) <= allowed:
                owned.add(user)
    # Shape arithmetic is shared freely between layers (export deduplicates it): it is
    # never erased explicitly, and dead code elimination drops what nobody needs.
    owned = {n for n in owned if _is_tensor(n)}
    owned -= _stream_copies_in_output(graph, block, owned)
    block.nodes = [n for n in graph.nodes if n in owned]
    for node in block.nodes:
        if node is block.exit:
            continue
        # The output may read the block's own values (attention weights, router logits):
        # removing the block returns None there. Any other reader outside blocks removal.
        outside = [u for u in _external_users(node, owned) if not (u.op == "output" and node in u.all_input_nodes)]
        if outside:
            block.removable = False
            block.reason = _used_outside(graph, node, outside[0])
            return


def _stream_copies_in_output(graph: _GraphIndex, block: ResidualBlock, owned: set[Node]) -> set[Node]:
    """Value-preserving copies of the block's entry that the graph returns (hidden states).

    transformers records a layer's input hidden state from inside the layer (a dtype
    cast in its first norm). Such a copy stays when the block goes: it still reads
    the entry, so the returned state of a removed layer is the state before it.
    """
    output_reads = set(graph.output.all_input_nodes) if graph.output is not None else set()
    kept: set[Node] = set()
    for node in owned & output_reads:
        chain, current = [], node
        while current is not block.entry and current in owned and _is_passthrough(current):
            chain.append(current)
            current = _stream_inputs(current)[0]
        if current is block.entry and node is not block.exit:
            kept.update(chain)
    return kept


def _used_outside(graph: _GraphIndex, node: Node, user: Node) -> str:
    outputs = _outputs_fed_by(graph, user)
    if outputs:
        options = producing_options(graph.gm, outputs)
        shown = ", ".join(outputs[:4]) + (", ..." if len(outputs) > 4 else "")
        reason = (
            f"its node {node.name} ({_describe(node)}) feeds the graph's output {shown} through {_describe(user)}, "
            "which has no value without the block"
        )
        if options:
            traced = ", ".join(f"{k}={v!r}" for k, v in options.items())
            undo = ", ".join(f"{k}=False" for k in options)
            return f"{reason}; that output comes from tracing with {traced}: trace again with {undo} to remove it"
        return f"{reason}; trace a call that does not return it"
    where = "the graph's output" if user.op == "output" else _describe(user)
    return (
        f"its node {node.name} ({_describe(node)}) is also used by {where}; "
        "removing it would break that user (e.g. a position bias shared with later layers, or a cache entry)"
    )


def _outputs_fed_by(graph: _GraphIndex, user: Node) -> list[str]:
    """Outputs computed from `user` outside every layer (a loss over all layers' router logits, say)."""
    if _layer_path(user) is not None:
        return []
    seen, queue = {user}, deque([user])
    while queue:
        for nxt in queue.popleft().users:
            if nxt not in seen and nxt.op != "output" and _layer_path(nxt) is None:
                seen.add(nxt)
                queue.append(nxt)
    names = graph.output_names()
    return [name for n in graph.nodes if n in seen for name in names.get(n, [])]


def _external_users(node: Node, owned: set[Node]) -> list[Node]:
    """Users of `node` outside `owned`, seen through shape arithmetic (sym_size of a tensor)."""
    found, queue, seen = [], deque(node.users), set()
    while queue:
        user = queue.popleft()
        if user in owned or user in seen:
            continue
        seen.add(user)
        if _is_tensor(user) or user.op == "output":
            found.append(user)
        else:
            queue.extend(user.users)
    return found


def _block_scopes(block: ResidualBlock) -> list[str]:
    """Module paths the block stands for; names with ':' are made up and have no module."""
    return [n for n in [block.name, *block.sublayers] if ":" not in n]


def _in_scope(path: str, scopes: list[str]) -> bool:
    return any(path == s or path.startswith(s + ".") for s in scopes)


def _describe(node: Node) -> str:
    paths = _module_paths(node)
    return f"{_op_name(node)} in {paths[-1]}" if paths else _op_name(node)
