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
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from lorp_fx.core.errors import CallError, PlanError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.graph.erase import REMOVED_META, remove_blocks
from lorp_fx.graph.module import graph_module
from lorp_fx.graph.program import is_program, prune_program


def prune(gm, remove: Iterable[str] | PruningPlan, *, allow_empty: bool = False):
    """A new GraphModule (or ExportedProgram) without the named residual blocks.

    `remove` is a list of block names (layers such as `model.layers.3`, or
    sublayers such as `model.layers.3.self_attn`, as `find_blocks` names them) or a
    `PruningPlan`. `gm` is a GraphModule from `trace` (or any torch.fx graph), or a
    `torch.export.ExportedProgram`, which gives an ExportedProgram back. Raises
    `UnknownBlockError` for a name the graph does not have and `NotRemovableError`
    for a block whose nodes are used outside it. An empty `remove` is a mistake (a plan
    that removes nothing) and raises PlanError, unless `allow_empty=True` asks for a
    copy of the graph on purpose.
    """
    names = _names(remove, allow_empty)
    if is_program(gm):
        return prune_program(gm, names)
    pruned = copy_graph(gm)
    if names:
        remove_blocks(pruned, names)
        _clean(pruned)
    return pruned


def _names(remove, allow_empty: bool) -> list[str]:
    """The block names `remove` (a list or a PruningPlan) holds, refusing a lone string and, unless
    `allow_empty`, an empty removal."""
    if isinstance(remove, str):
        raise CallError("remove must be a list of block names, not a single string: use remove=[name]")
    if not isinstance(allow_empty, bool):
        raise CallError(f"allow_empty must be True or False, got {allow_empty!r}")
    names = list(remove.remove if isinstance(remove, PruningPlan) else remove)
    if not names and not allow_empty:
        raise PlanError("remove names no block, so nothing would be pruned; name at least one block "
                        "(find_blocks lists them), or pass allow_empty=True to get a copy of the graph on purpose")
    return names




class PruneBlocks(PassBase):
    """`prune` as a `torch.fx.passes.infra` pass, for pass managers and compiler pipelines.

    The pass returns a new GraphModule in its `PassResult`; the one it is given is
    left as it was. It is idempotent: on a graph whose blocks are already gone
    (a `PassManager` run for several steps) it returns that graph with
    `modified=False`.
    """

    def __init__(self, remove: Iterable[str] | PruningPlan, *, allow_empty: bool = False):
        super().__init__()
        self.remove = _names(remove, allow_empty)

    def call(self, graph_module: GraphModule) -> PassResult:
        done = set(graph_module.meta.get(REMOVED_META, []))
        todo = [name for name in self.remove if name not in done]
        if not todo:
            return PassResult(graph_module, False)
        return PassResult(prune(graph_module, todo), True)

    def ensures(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()


def copy_graph(gm: GraphModule) -> GraphModule:
    """A copy of `gm` with its own graph, sharing the (unchanged) parameter tensors."""
    graph = torch.fx.Graph(owning_module=None, tracer_cls=gm.graph._tracer_cls)
    graph._codegen = gm.graph._codegen  # the pytree in/out specs and the traced call; never mutated
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    copied = graph_module(gm, graph, class_name=type(gm).__name__)
    copied.meta.update(gm.meta)
    copied.train(gm.training)
    return copied














def _clean(gm: GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
