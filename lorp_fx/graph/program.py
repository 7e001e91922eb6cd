"""`prune` for a `torch.export.ExportedProgram`: the same rewrite, with the program kept valid.

An ExportedProgram's graph takes its parameters as inputs ("lifted"), described by
its graph signature. The rewrite runs on a copy of that graph with the parameter
inputs marked as weights (so `find_blocks` treats them like `get_attr` nodes);
afterwards the inputs of removed parameters are dropped from the graph, the
signature, the state dict and the constants. The result is a new ExportedProgram
that `torch.export.save`/`load`, `.module()` and AOTInductor accept.
"""

from __future__ import annotations

import copy

from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ConstantArgument,
    ExportGraphSignature,
    InputSpec,
    OutputKind,
    OutputSpec,
)
from torch.fx import Graph, GraphModule

from lorp_fx.core.errors import NotRemovableError
from lorp_fx.graph.erase import REMOVED_META, remove_blocks
from lorp_fx.graph.lifted import WEIGHT_KINDS, weights_marked


def prune_program(program: ExportedProgram, names: list[str]) -> ExportedProgram:
    """A new ExportedProgram without the named residual blocks; `program` is left as it was."""
    gm = _copy_graph_module(program.graph_module)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = list(program.graph_signature.input_specs)
    with weights_marked(placeholders, specs):
        removed = remove_blocks(gm, names)
    kept_specs = _drop_unused_inputs(gm, placeholders, specs)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    signature = ExportGraphSignature(input_specs=kept_specs, output_specs=_output_specs(gm, program))
    targets = {spec.target for spec in kept_specs if spec.target is not None}
    pruned = ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=signature,
        state_dict={k: v for k, v in program.state_dict.items() if k in targets},
        range_constraints=copy.copy(program.range_constraints),
        module_call_graph=copy.deepcopy(program.module_call_graph),
        example_inputs=program.example_inputs,
        constants={k: v for k, v in program.constants.items() if k in targets},
        verifiers=program.verifiers,
    )
    pruned.graph_module.meta.update(program.graph_module.meta)
    pruned.graph_module.meta[REMOVED_META] = [*program.graph_module.meta.get(REMOVED_META, []), *removed]
    return pruned




def _copy_graph_module(gm: GraphModule) -> GraphModule:
    graph = Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    copied = GraphModule(gm, graph, class_name=type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied


def _drop_unused_inputs(gm: GraphModule, placeholders: list, specs: list[InputSpec]) -> list[InputSpec]:
    """Erase the parameter inputs nothing reads any more; the user's inputs all stay."""
    kept = []
    for node, spec in zip(placeholders, specs):
        if spec.kind in WEIGHT_KINDS and not node.users:
            gm.graph.erase_node(node)
        else:
            kept.append(spec)
    return kept


def _output_specs(gm: GraphModule, program: ExportedProgram) -> list[OutputSpec]:
    """The old output specs, pointing at the nodes the pruned graph returns."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    specs = []
    for value, old in zip(output.args[0], program.graph_signature.output_specs):
        if value is None:
            if old.kind != OutputKind.USER_OUTPUT:
                raise NotRemovableError(f"the program's output {old.arg} ({old.kind.name}) comes from a removed block")
            specs.append(OutputSpec(OutputKind.USER_OUTPUT, ConstantArgument(name="", value=None), None))
        elif isinstance(old.arg, ConstantArgument):
            specs.append(old)
        else:
            specs.append(OutputSpec(old.kind, type(old.arg)(name=value.name), old.target))
    return specs


def is_program(value: object) -> bool:
    return isinstance(value, ExportedProgram)

