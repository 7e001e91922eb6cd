"""Residual streams: the chains of `x + f(x)` adds that block discovery groups into layers.

An add is residual when its skip operand `x` is an ancestor of the other operand
and the branch between them uses parameters. Adds chain into a stream when the
skip operand of one is the previous add, reached through value-preserving ops
and, in post-norm models, a norm: `norm(x + f(x))`. An encoder-decoder has two.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from lorp_fx.graph.nodes import (
    GraphIndex,
    is_add,
    is_norm,
    is_passthrough,
    layer_path,
    module_paths,
    same_shape,
    stream_inputs,
    tensor_operands,
    uses_parameters,
)


@dataclass(eq=False)
class Residual:
    add: Node
    skip: Node  # the operand x in x + f(x)
    entry: Node = None  # the stream node this sublayer reads
    exit: Node = None  # the stream node it writes: the add, or norm(add)
    stream: int = 0


def _residual_adds(graph: GraphIndex) -> list[Residual]:
    found = []
    for node in graph.nodes:
        if not is_add(node):
            continue
        operands = tensor_operands(node)
        if len(operands) != 2 or operands[0] is operands[1]:
            continue
        for skip, branch in (operands, operands[::-1]):
            if same_shape(skip, node) and graph.is_ancestor(skip, branch):
                inside = graph.between(skip, node)
                if any(uses_parameters(n) for n in inside):
                    found.append(Residual(add=node, skip=skip))
                    break
    return found


def _walk_back(node: Node, through_norms: bool) -> tuple[Node, list[Node]]:
    """Follow value-preserving ops up from `node`; returns where it stopped and the path."""
    path = []
    while is_passthrough(node) or (through_norms and is_norm(node)):
        path.append(node)
        node = stream_inputs(node)[0]
    return node, path


def residual_streams(graph: GraphIndex) -> list[list[Residual]]:
    residuals = _residual_adds(graph)
    by_add = {r.add: r for r in residuals}
    streams: list[list[Residual]] = []
    for residual in residuals:
        origin, path = _walk_back(residual.skip, through_norms=True)
        previous = by_add.get(origin)
        if previous is not None and previous.exit is None:
            norms = [n for n in path if is_norm(n)]
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


def _close_stream(stream: list[Residual]) -> None:
    """Set the exit of a stream's last sublayer: its add, or the norm after it in a post-norm model."""
    last = stream[-1]
    last.exit = last.add
    users = list(last.add.users)
    if len(users) != 1 or not is_norm(users[0]):
        return
    post_norm_links = [r for r in stream[:-1] if r.exit is not r.add]
    layer = layer_path(last.add)
    if stream[:-1] and len(post_norm_links) == len(stream) - 1:
        last.exit = users[0]
    elif len(stream) == 1 and layer and any(p.startswith(layer + ".") for p in module_paths(users[0])):
        last.exit = users[0]
