"""`PruningPlan`: which blocks to remove, and the evidence for it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .stats import LayerStatistics


@dataclass
class PruningPlan:
    """The output of a selector and the input of `lorp_fx.prune`.

    `scores` maps each block to the method's score for it (its meaning is the
    method's: Block Influence for ShortGPT, redundancy for LoRP, ...); `details`
    holds anything else a method wants to report, as JSON-able values.
    """

    remove: list[str]
    method: str
    granularity: str = "layer"
    scores: dict[str, float] = field(default_factory=dict)
    rls: float | None = None
    clusters: list[list[str]] | None = None
    statistics: LayerStatistics | None = None
    details: dict = field(default_factory=dict)

    @property
    def similarity(self) -> np.ndarray | None:
        return None if self.statistics is None else self.statistics.similarity

    @property
    def points(self) -> list[str] | None:
        return None if self.statistics is None else self.statistics.points

    @property
    def keep(self) -> list[str]:
        if self.statistics is None:
            raise ValueError("this plan carries no statistics, so it does not know the kept blocks")
        removed = set(self.remove)
        return [b for b in self.statistics.blocks if b not in removed]

    def to_dict(self) -> dict:
        return {
            "remove": list(self.remove),
            "method": self.method,
            "granularity": self.granularity,
            "scores": {k: float(v) for k, v in self.scores.items()},
            "rls": None if self.rls is None else float(self.rls),
            "clusters": self.clusters,
            "details": self.details,
            "statistics": None if self.statistics is None else self.statistics.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        stats = data.get("statistics")
        return cls(
            remove=list(data["remove"]),
            method=data["method"],
            granularity=data.get("granularity", "layer"),
            scores=dict(data.get("scores") or {}),
            rls=data.get("rls"),
            clusters=data.get("clusters"),
            statistics=None if stats is None else LayerStatistics.from_dict(stats),
            details=dict(data.get("details") or {}),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, atomically (a reader never sees half a file)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruningPlan":
        return cls.from_dict(json.loads(Path(path).read_text()))
