"""`PruneResult`: what `prune_model` returns, and how it is saved.

`save` writes the checkpoint, report.json, plan.json and the heatmap into one directory
that appears complete or not at all, and for a model read from a GGUF file a pruned GGUF
file beside them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorp_fx.arch.surgery import Surgery
from lorp_fx.compensation.fit import GapFit
from lorp_fx.core.errors import LoRPError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.healing.plot import healing_curve
from lorp_fx.io.gguf.pruned_file import writer
from lorp_fx.io.checkpoint import save_pretrained_atomic
from lorp_fx.pipeline.plot import similarity_heatmap


@dataclass
class PruneResult:
    """What `prune_model` returns: the pruned model and everything that explains it."""

    model: nn.Module
    plan: PruningPlan
    fits: list[GapFit]
    timings: dict[str, float]
    report: dict
    names: dict[str, str] = field(default_factory=dict)  # kept layers: old name -> new name
    # The traced dense graph. It shares the model's weights, so it is None where `inplace` pruning folded
    # compensation maps into them (it would no longer compute the dense model) and for an offloaded model.
    graph: torch.fx.GraphModule | None = field(default=None, repr=False)
    gguf: object | None = field(default=None, repr=False)  # the GGUFSource the model was read from, if any

    def folded_parameters(self) -> list[str]:
        """The pruned model's parameters that compensation changed, and healing (`lorp_fx.heal`) after it."""
        folded = [Surgery(self.model, self.names).rename(p) for fit in self.fits for p in fit.projections]
        healed = (self.report.get("healing") or {}).get("changed_parameters", [])
        return list(dict.fromkeys([*folded, *healed]))

    def save(self, out_dir: str | os.PathLike, tokenizer=None, *, overwrite: bool = False, extra_files: dict | None = None,
             gguf_requantize: str | None = "original") -> Path:
        """The checkpoint with report.json, plan.json and the heatmap, atomically (complete or not at all).

        A model read from a GGUF file is also written as a pruned GGUF file of the same
        name, streamed, unless `gguf_requantize` is None (see `io.gguf.pruned_file.writer`).
        """
        files: dict = {}
        if self.gguf is not None and gguf_requantize is not None:
            self.report["gguf"] = {}
            files[self.gguf.path.name] = writer(self.gguf, self.plan, self.model, self.folded_parameters(),
                                                gguf_requantize, self.report["gguf"])
        # report.json is written after the GGUF file, whose writer adds to the report (with the path it wrote, in the
        # temporary directory that becomes `out_dir`: the report names where the file will be).
        final = Path(os.path.expanduser(str(out_dir))).resolve()

        def write_report(path: Path) -> None:
            if "file" in self.report.get("gguf", {}):
                self.report["gguf"]["path"] = str(final / self.report["gguf"]["file"])
            path.write_text(json.dumps(self.report, indent=1), encoding="utf-8")

        files["report.json"] = write_report
        files["plan.json"] = self.plan.to_json()
        files.update(heatmap_file(self.plan))
        files.update(healing_file(self.report))
        files.update(extra_files or {})
        return save_pretrained_atomic(self.model, tokenizer, out_dir, extra_files=files, overwrite=overwrite)


def heatmap_file(plan: PruningPlan) -> dict[str, bytes]:
    """{"similarity.png": PNG bytes}, or {} with a note where matplotlib is missing."""
    return _png("similarity.png", "heatmap", similarity_heatmap, plan)


def healing_file(report: dict) -> dict[str, bytes]:
    """{"healing.png": the healing curve} for a healed model, else {}."""
    return _png("healing.png", "healing curve", healing_curve, report["healing"]) if report.get("healing") else {}


def _png(name: str, what: str, draw, data) -> dict[str, bytes]:
    try:
        return {name: draw(data)}
    except LoRPError as error:  # matplotlib is an extra: say so, keep going
        print(f"lorp-fx: note: no {what} ({error})", file=sys.stderr)
        return {}
