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
missing, blocks are named after their residual add. What a node computes is in
`nodes.py`, how adds chain into streams in `streams.py`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch.fx import GraphModule, Node

from lorp_fx.core.errors import ConfigError, NoResidualBlocksError
from lorp_fx.core.plan import GRANULARITIES
from lorp_fx.graph.lifted import weights_marked
from lorp_fx.graph.nodes import (
    ATTENTION_NAMES,
    LIST_ELEMENT,
    MATMUL_NAMES,
    GraphIndex,
    is_norm,
    is_passthrough,
    is_tensor,
    is_weight,
    layer_path,
    module_class,
    module_paths,
    op_name,
    stream_inputs,
    uses_parameters,
)
from lorp_fx.graph.outputs import producing_options
from lorp_fx.graph.streams import Residual, residual_streams


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
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    if isinstance(gm, torch.export.ExportedProgram):  # its weights are inputs: marked while blocks are found
        placeholders = [n for n in gm.graph_module.graph.nodes if n.op == "placeholder"]
        with weights_marked(placeholders, gm.graph_signature.input_specs):
            return find_blocks(gm.graph_module, granularity)
    graph = GraphIndex(gm)
    streams = residual_streams(graph)
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


# --------------------------------------------------------------------------- naming and grouping

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
    name = op_name(node)
    if name in ATTENTION_NAMES:
        return True
    return name in MATMUL_NAMES and len(stream_inputs(node)) >= 2


def _sublayer_kind(inside: set[Node], foreign: set[Node], own: set[Node]) -> str:
    """'attention', 'cross_attention' (attends to another stream's states) or 'mlp'."""
    if not any(_is_attention(n) for n in inside):
        return "mlp"
    reads = {p for n in inside for p in n.all_input_nodes if p not in inside}
    if any(p in foreign and p not in own for p in reads):
        return "cross_attention"
    return "attention"


def _sublayer_name(inside: set[Node], residual: Residual, kind: str, layer: str | None) -> str:
    # The branch's own module: where its parametric, non-norm work lives.
    # Weights often reach the branch through a transpose or cast outside it: look one step up.
    candidates = set(inside) | {p for n in inside for p in n.all_input_nodes if not is_weight(p)}
    candidates.discard(residual.entry)
    working = [n for n in candidates if uses_parameters(n) and not is_norm(n) and "Norm" not in module_class(n)]
    paths = [module_paths(n)[-1] for n in working if module_paths(n)]
    common = _common_path(paths) if paths else ""
    add_paths = module_paths(residual.add)
    own = add_paths[-1] if add_paths else ""
    # T5 wraps each sublayer with its residual add (encoder.block.1.layer.0): name the wrapper.
    if layer and own.startswith(layer + ".") and (common == own or common.startswith(own + ".")):
        return own
    if common and common != layer and (layer is None or common.startswith(layer + ".")):
        return common
    if layer:
        return f"{layer}:{kind}"
    return f"{residual.add.name}:{kind}"


def _sublayers(graph: GraphIndex, streams: list[list[Residual]]) -> list[tuple[ResidualBlock, str]]:
    """Every residual add as a block, with the path of the layer that owns it."""
    downstream_of_start = [graph.descendants(stream[0].entry) for stream in streams]
    downstream_of_end = [graph.descendants(stream[-1].exit) for stream in streams]
    blocks = []
    for s, stream in enumerate(streams):
        foreign = set().union(*(d for i, d in enumerate(downstream_of_end) if i != s))
        for residual in stream:
            inside = graph.between(residual.entry, residual.add)
            kind = _sublayer_kind(inside, foreign, downstream_of_start[s])
            layer = layer_path(residual.add)
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
    return bool(LIST_ELEMENT.search(path))


# --------------------------------------------------------------------------- ownership


def _claim_nodes(graph: GraphIndex, block: ResidualBlock) -> None:
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
            if scopes and any(_in_scope(path, scopes) for path in module_paths(parent)[-1:]):
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
    owned = {n for n in owned if is_tensor(n)}
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


def _stream_copies_in_output(graph: GraphIndex, block: ResidualBlock, owned: set[Node]) -> set[Node]:
    """Value-preserving copies of the block's entry that the graph returns (hidden states).

    transformers records a layer's input hidden state from inside the layer (a dtype
    cast in its first norm). Such a copy stays when the block goes: it still reads
    the entry, so the returned state of a removed layer is the state before it.
    """
    output_reads = set(graph.output.all_input_nodes) if graph.output is not None else set()
    kept: set[Node] = set()
    for node in owned & output_reads:
        chain, current = [], node
        while current is not block.entry and current in owned and is_passthrough(current):
            chain.append(current)
            current = stream_inputs(current)[0]
        if current is block.entry and node is not block.exit:
            kept.update(chain)
    return kept


def _used_outside(graph: GraphIndex, node: Node, user: Node) -> str:
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


def _outputs_fed_by(graph: GraphIndex, user: Node) -> list[str]:
    """Outputs computed from `user` outside every layer (a loss over all layers' router logits, say)."""
    if layer_path(user) is not None:
        return []
    seen, queue = {user}, deque([user])
    while queue:
        for nxt in queue.popleft().users:
            if nxt not in seen and nxt.op != "output" and layer_path(nxt) is None:
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
        if is_tensor(user) or user.op == "output":
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
    paths = module_paths(node)
    return f"{op_name(node)} in {paths[-1]}" if paths else op_name(node)
