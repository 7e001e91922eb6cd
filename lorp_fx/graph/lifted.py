"""Lifted parameters: an ExportedProgram's graph takes its weights as inputs.

Block discovery tells a parametric branch by its weights (`get_attr` nodes in a
GraphModule). In a program's graph they are placeholders described by the graph
signature, so they are marked as weights for the time a pass needs it.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch.export.graph_signature import (
    InputKind,
    InputSpec,
)

from lorp_fx.graph.nodes import WEIGHT_META

WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


@contextmanager
def weights_marked(placeholders: list, specs: list[InputSpec]):
    """Mark the parameter inputs as weights for block finding, and unmark them afterwards."""
    for node, spec in zip(placeholders, specs):
        if spec.kind in WEIGHT_KINDS:
            node.meta[WEIGHT_META] = True
    try:
        yield
    finally:
        for node in placeholders:
            node.meta.pop(WEIGHT_META, None)
