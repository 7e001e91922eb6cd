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

from lorp_fx.core.errors import CallError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.graph.erase import REMOVED_META, remove_blocks
from lorp_fx.graph.module import graph_module
from lorp_fx.graph.program import is_program, prune_program


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














def _clean(gm: GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
