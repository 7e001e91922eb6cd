"""`lorp-fx analyze`: the statistics, RLS, clusters and Block Influence of a model, with the heatmap; removes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass

from torch import nn

from lorp_fx.calibration.batches import on_device, token_batches
from lorp_fx.calibration.graph_observer import collect_statistics
from lorp_fx.core.model import encoder_decoder, model_device
from lorp_fx.core.names import span
from lorp_fx.core.plan import PruningPlan
from lorp_fx.core.stats import LayerStatistics
from lorp_fx.pipeline.calibrate import Calibration, calibration_windows
from lorp_fx.pipeline.config import PruneConfig
from lorp_fx.pipeline.result import heatmap_file
from lorp_fx.selection.rls import paper_clusters


@dataclass
class Analysis:
    """What `analyze` measured: the statistics and the paper's diagnostics from them."""

    stats: LayerStatistics
    rls: float
    clusters: list[list[str]]
    influence: dict[str, float]  # Block Influence (ShortGPT) of each block
    source: str  # where the calibration text came from
    granularity: str = "layer"

    def files(self, model_name: str) -> dict:
        """report.json, statistics.json and similarity.png, as an output directory holds them."""
        report = {
            "model": model_name, "calibration": {"source": self.source, "tokens": self.stats.token_count},
            "rls": self.rls, "clusters": self.clusters, "block_influence": self.influence,
            "points": list(self.stats.points), "similarity": self.stats.similarity.tolist(),
        }
        plan = PruningPlan(remove=[], method="analyze", granularity=self.granularity, rls=self.rls,
                           clusters=self.clusters, statistics=self.stats, scores=self.influence)
        files = {"report.json": json.dumps(report, indent=1), "statistics.json": json.dumps(self.stats.to_dict())}
        files.update(heatmap_file(plan))
        return files

    def summary_lines(self) -> list[str]:
        lowest = sorted(self.influence, key=self.influence.get)[:5]
        return [f"RLS {self.rls:.3f} -> {len(self.clusters)} clusters: " + "; ".join(span(c) for c in self.clusters),
                "lowest Block Influence: " + ", ".join(f"{b} ({self.influence[b]:.3f})" for b in lowest)]


def analyze(model: nn.Module, calibration: Calibration, config: PruneConfig, tokenizer, granularity: str = "layer",
            progress: bool = True) -> Analysis:
    """Calibrate `model` on `calibration` (as `prune_model` takes it) and measure; nothing is removed."""
    windows, source = calibration_windows(model, calibration, config, tokenizer, progress=progress)
    batches = on_device(token_batches(windows, config.batch_size, encoder_decoder(model)), model_device(model))
    stats, _ = collect_statistics(model, batches, granularity=granularity, progress=progress)
    rls, clusters = paper_clusters(stats)
    influence = {b: float(v) for b, v in zip(stats.blocks, stats.block_influence())}
    return Analysis(stats, rls, clusters, influence, source, granularity)
