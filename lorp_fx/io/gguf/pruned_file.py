"""The pipeline's GGUF step: a model read from a GGUF file is also saved as a pruned GGUF file.

Checked before any work (`open_source`: the file parses and transformers can read
its architecture), checked again right after selection, before compensation and
saving (`check_removal`: the runtime would read every kept layer's role correctly),
and written tensor by tensor into the output directory (`writer`), the compensated
projections requantized (`lorp_fx/gguf_export.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from lorp_fx.core.names import layer_index
from lorp_fx.core.plan import PruningPlan
from lorp_fx.io.gguf.export import (
    GGUFSource,
    check_transformers_can_read,
    read_gguf,
    write_pruned_gguf,
)
from lorp_fx.io.gguf.layout import plan_metadata


def open_source(path: str | os.PathLike) -> GGUFSource:
    """The GGUF file, validated (parses, transformers can read its architecture), before the model loads."""
    source = check_transformers_can_read(read_gguf(path))
    source.close()  # its parsed metadata is not needed until the pruned file is written (~140 MB on SmolLM2)
    return source


def removed_layers(plan: PruningPlan) -> list[int]:
    """The 0-based layer indices a layer plan removes (a GGUF file has one stack of blocks)."""
    return sorted(i for i in (layer_index(name) for name in plan.remove) if isinstance(i, int))


def check_removal(source: GGUFSource, plan: PruningPlan) -> None:
    """GGUFError, with the removals that would work, if the runtime would misread a kept layer's role."""
    removed = set(removed_layers(plan))
    keep = [i for i in range(source.n_layers) if i not in removed]
    plan_metadata(source.architecture, source.meta, keep, source.n_layers)


def writer(source: GGUFSource, plan: PruningPlan, model: nn.Module, folded: list[str], requantize: str, report: dict):
    """A function that streams the pruned GGUF to the path it is given and records what it wrote in `report`.

    `folded` names the pruned model's parameters that compensation changed; they are
    requantized to their tensor's original type ("original") or written as Q8_0 ("q8_0").
    """
    parameters = dict(model.named_parameters())
    replaced = {name: parameters[name].detach() for name in folded}

    def write(path: Path) -> None:
        report.update(write_pruned_gguf(source, path, removed_layers(plan), replaced or None, progress=False,
                                        requantize_as="Q8_0" if requantize == "q8_0" else None))

    return write
