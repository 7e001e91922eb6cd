"""Step 5 of the pipeline: the graph rewrite that removes residual blocks.

Removing block `exit = x + f(x)` means: every user of `exit` reads `x` instead,
and the nodes of `f` are erased, with the parameters only they used. The input
GraphModule is never modified: the pass works on a copy of the graph that shares
the (unchanged) parameter tensors.

The output keeps its structure. A graph that returns per-layer values keeps one
entry per layer: a hidden state recorded at a removed layer is the state before
it (the removed layer acts as the identity), so `hidden_states` keeps its length
and `hidden_states[i + 1] == hidden_states[i]` for a removed layer i. Eager
deletion of the layer instead gives a tuple shorter by one. A value that only the
removed layer computes (its attention weights) is None in its slot.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.fx import GraphModule
from torch.fx.node import map_arg
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .blocks import GRANULARITIES, ResidualBlock, find_blocks
from .budget import check_kept
from .errors import CallError, NotRemovableError, PlanError, UnknownBlockError
from .graphs import graph_module
from .outputs import output_node
from .plan import PruningPlan
from .program import is_program, prune_program

REMOVED_META = "lorp_fx_removed"  # gm.meta: names of the blocks removed so far, in removal order


def prune(gm, remove: Iterable[str] | PruningPlan = ()):
    """A new GraphModule (or ExportedProgram) without the named residual blocks.

    `remove` is a list of block names (layers such as `model.layers.3`, or
    sublayers such as `model.layers.3.self_attn`, as `find_blocks` names them) or a
    `PruningPlan`. `gm` is a GraphModule from `trace` (or any torch.fx graph), or a
    `torch.export.ExportedProgram`, which gives an ExportedProgram back. Raises
    `UnknownBlockError` for a name the graph does not have and `NotRemovableError`
    for a block whose nodes are used outside it.
    """
    if isinstance(remove, str):
        raise CallError("remove must be a list of block names, not a single string: use remove=[name]")
    names = list(remove.remove if isinstance(remove, PruningPlan) else remove)
    if is_program(gm):
        return prune_program(gm, names)
    pruned = _copy(gm)
    if names:
        remove_blocks(pruned, names)
        _clean(pruned)
    return pruned


def remove_blocks(gm: GraphModule, names: list[str]) -> list[str]:
    """Remove the named blocks from `gm` in place (no clean-up); returns the names removed."""
    chosen = _resolve(gm, names)
    for block in sorted(chosen, key=lambda b: b.index, reverse=True):
        _remove_block(gm, block)
    gm.meta[REMOVED_META] = [*gm.meta.get(REMOVED_META, []), *names]
    return names


class PruneBlocks(PassBase):
    """`prune` as a `torch.fx.passes.infra` pass, for pass managers and compiler pipelines.

    The pass returns a new GraphModule in its `PassResult`; the one it is given is
    left as it was. It is idempotent: on a graph whose blocks are already gone
    (a `PassManager` run for several steps) it returns that graph with
    `modified=False`.
    """

    def __init__(self, remove: Iterable[str] | PruningPlan):
        super().__init__()
        self.remove = list(remove.remove if isinstance(remove, PruningPlan) else remove)

    def call(self, graph_module: GraphModule) -> PassResult:
        done = set(graph_module.meta.get(REMOVED_META, []))
        todo = [name for name in self.remove if name not in done]
        if not todo:
            return PassResult(graph_module, False)
        return PassResult(prune(graph_module, todo), True)

    def ensures(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()


def _copy(gm: GraphModule) -> GraphModule:
    graph = torch.fx.Graph(owning_module=None, tracer_cls=gm.graph._tracer_cls)
    graph._codegen = gm.graph._codegen  # the pytree in/out specs and the traced call; never mutated
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    copied = graph_module(gm, graph, class_name=type(gm).__name__)
    copied.meta.update(gm.meta)
    copied.train(gm.training)
    return copied


def _resolve(gm: GraphModule, names: list[str]) -> list[ResidualBlock]:
    by_name: dict[str, ResidualBlock] = {}
    for granularity in GRANULARITIES:
        for block in find_blocks(gm, granularity):
            by_name.setdefault(block.name, block)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PlanError(f"blocks named more than once: {duplicates}; name each block once")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        gone = set(gm.meta.get(REMOVED_META, []))
        if unknown[0] in gone:
            raise UnknownBlockError(f"{unknown[0]!r} was already removed from this graph; name only blocks it still has")
        raise UnknownBlockError(
            f"no residual block named {unknown[0]!r}; the graph has: {', '.join(by_name)}"
        )
    chosen = [by_name[n] for n in names]
    _check_overlap(chosen)
    for block in chosen:
        if not block.removable:
            raise NotRemovableError(f"{block.name} cannot be removed: {block.reason}")
    _check_budget(gm, chosen)
    return chosen


def _check_budget(gm: GraphModule, chosen: list[ResidualBlock]) -> None:
    """The budget rule (lorp_fx/budget.py) at the plan's granularity: layers, or sublayers for a mixed plan."""
    granularity = "layer" if all(b.kind == "layer" for b in chosen) else "sublayer"
    blocks = find_blocks(gm, granularity)
    gone = {n for b in chosen for n in ([b.name] if granularity == "layer" or b.kind != "layer" else b.sublayers)}
    streams = {f"stream {b.stream}": 0 for b in blocks}
    removed = dict(streams)
    for block in blocks:
        streams[f"stream {block.stream}"] += 1
        removed[f"stream {block.stream}"] += block.name in gone
    check_kept(streams, removed, what=f"{granularity} blocks")


def _check_overlap(chosen: list[ResidualBlock]) -> None:
    for block in chosen:
        inner = [other for other in chosen if other is not block and other.name in block.sublayers]
        if inner:
            raise PlanError(
                f"{inner[0].name} is part of {block.name}, which is removed too; name one or the other"
            )


def _remove_block(gm: GraphModule, block: ResidualBlock) -> None:
    block.exit.replace_all_uses_with(block.entry)
    _return_none_for(gm, set(block.nodes))
    for node in reversed(block.nodes):
        _erase_dead_users(gm, node)
        gm.graph.erase_node(node)


def _return_none_for(gm: GraphModule, nodes: set) -> None:
    """Output slots that returned one of `nodes` (a removed layer's attention weights) return None."""
    output = output_node(gm)
    if any(n in nodes for n in output.all_input_nodes):
        output.args = map_arg(output.args, lambda n: None if n in nodes else n)


def _erase_dead_users(gm: GraphModule, node) -> None:
    """Erase the shape arithmetic that only the block's nodes needed (sym_size of its tensors)."""
    for user in list(node.users):
        _erase_dead_users(gm, user)
        if not user.users:
            gm.graph.erase_node(user)


def _clean(gm: GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
