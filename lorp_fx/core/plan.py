"""`PruningPlan`: which blocks to remove, and the evidence for it.

A plan read from a dict or a plan.json (`from_dict`, `load`) is validated field by
field: a `PlanError` names the field and what it must be, so a hand-edited or
truncated plan never prunes the wrong blocks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorp_fx.core.budget import check_stream_budget
from lorp_fx.core.errors import BudgetError, PlanError
from lorp_fx.core.files import read_text
from lorp_fx.core.stats import LayerStatistics

GRANULARITIES = ("layer", "sublayer")
_FIELDS = ("format", "remove", "method", "granularity", "scores", "rls", "clusters", "details", "statistics")
PLAN_FORMAT = 1  # the plan.json layout this version writes and reads; a newer one is refused, not misread


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
            "format": PLAN_FORMAT,
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
        """The plan `data` describes (as `to_dict` writes it), validated: PlanError names a bad field."""
        if not isinstance(data, dict):
            raise PlanError(f"a pruning plan is a JSON object with the fields {', '.join(_FIELDS)}; got a {_kind(data)}")
        unknown = sorted(set(map(str, data)) - set(_FIELDS))
        if unknown:
            raise PlanError(f"plan field(s) {', '.join(map(repr, unknown))} unknown; a plan has {', '.join(_FIELDS)}")
        for required in ("remove", "method"):
            if required not in data:
                raise PlanError(f"plan field '{required}' is missing; a plan needs at least remove and method")
        _format(data.get("format", PLAN_FORMAT))  # plans written before the field existed are format 1
        statistics = _statistics(data.get("statistics"))
        plan = cls(
            remove=_names(data["remove"], "remove"),
            method=_method(data["method"]),
            granularity=_granularity(data.get("granularity", "layer")),
            scores=_scores(data.get("scores")),
            rls=_number(data.get("rls"), "rls"),
            clusters=_clusters(data.get("clusters")),
            statistics=statistics,
            details=_details(data.get("details")),
        )
        if statistics is not None:
            plan.check_against_statistics()
        return plan

    def check_against_statistics(self) -> None:
        """PlanError unless every named block is one of the statistics' blocks and the removal keeps the budget rule."""
        blocks = set(self.statistics.blocks)
        for what, names in (("remove", self.remove), ("scores", self.scores),
                            ("clusters", [b for c in self.clusters or [] for b in c])):
            strangers = [n for n in names if n not in blocks]
            if strangers:
                raise PlanError(f"plan field '{what}' names {strangers[0]!r}, which is not one of the plan's blocks "
                                f"({', '.join(self.statistics.blocks[:3])}, ...)")
        if self.remove:
            streams = [[self.statistics.blocks[b] for b in stream] for stream in self.statistics.streams()]
            try:
                check_stream_budget(streams, self.remove, what="blocks")
            except BudgetError as error:
                raise PlanError(f"plan field 'remove' breaks the budget rule: {error}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, atomically (a reader never sees half a file); PlanError naming the folder
        where it cannot be written."""
        path = Path(path).expanduser()
        check_plan_folder(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(self.to_json())
            os.replace(tmp, path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise PlanError(f"cannot write the plan to {path}: {error.strerror or error}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruningPlan":
        """The plan in the JSON file `path`, validated (`from_dict`)."""
        path = Path(path).expanduser()
        text = read_text(path, "plan file", PlanError)
        try:
            data = json.loads(text)
        except ValueError as error:
            raise PlanError(f"plan file {path} is not valid JSON ({error})") from None
        return cls.from_dict(data)


def check_plan_folder(path: str | os.PathLike) -> None:
    """PlanError unless `path` names a file in an existing, writable folder (checked before any work that ends
    in writing the plan there)."""
    path = Path(path).expanduser()
    folder = path.parent
    if path.is_dir():
        raise PlanError(f"plan path {path} is a folder; name a file in it, such as {path / 'plan.json'}")
    if not folder.is_dir():
        raise PlanError(f"cannot write a plan to {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise PlanError(f"cannot write a plan to {path}: the folder {folder} is not writable")


# --------------------------------------------------------------------------- field checks


def _kind(value) -> str:
    return {dict: "JSON object", list: "list", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def _text(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PlanError(f"plan field '{name}' must be a non-empty string, got {value!r}")
    return value


def _format(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"plan field 'format' must be a whole number (this lorp-fx writes {PLAN_FORMAT}), got {value!r}")
    if value > PLAN_FORMAT:
        raise PlanError(f"the plan is in format {value}, newer than this lorp-fx reads ({PLAN_FORMAT}); upgrade lorp-fx")


def _method(value) -> str:
    """A method's name: one word or a few (`lorp`, `lorp-paper`, `manual`), never several lines."""
    _text(value, "method")
    if len(value) > 80 or not value.isprintable():
        raise PlanError(f"plan field 'method' must be a short name such as 'lorp' or 'manual', got {value[:40]!r}")
    return value


def _block_name(value, name: str) -> str:
    """A block name as `find_blocks` writes it: a dotted module path (`model.layers.3.self_attn`)."""
    _text(value, name)
    if any(c.isspace() for c in value) or not value.isprintable():
        raise PlanError(f"plan field '{name}' holds {value[:40]!r}, which is not a block name "
                        "(a dotted module path such as 'model.layers.3')")
    return value


def _names(value, name: str) -> list[str]:
    if isinstance(value, str):
        raise PlanError(f"plan field '{name}' must be a list of block names, got the string {value!r}; "
                        f"write {json.dumps([value])}")
    if not isinstance(value, (list, tuple)):
        raise PlanError(f"plan field '{name}' must be a list of block names, got a {_kind(value)}")
    for item in value:
        _block_name(item, f"{name}[]")
    duplicates = sorted({n for n in value if list(value).count(n) > 1})
    if duplicates:
        raise PlanError(f"plan field '{name}' names {duplicates[0]!r} more than once")
    return list(value)


def _granularity(value) -> str:
    if value not in GRANULARITIES:
        raise PlanError(f"plan field 'granularity' must be one of {', '.join(GRANULARITIES)}, got {value!r}")
    return value


def _number(value, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise PlanError(f"plan field '{name}' must be a number (not NaN) or null, got {value!r}")
    return float(value)


def _scores(value) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PlanError(f"plan field 'scores' must map block names to numbers, got a {_kind(value)}")
    return {_text(k, "scores"): _number(v, f"scores[{k!r}]") for k, v in value.items()}


def _clusters(value) -> list[list[str]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise PlanError(f"plan field 'clusters' must be a list of lists of block names, got a {_kind(value)}")
    return [_names(cluster, "clusters[]") for cluster in value]


def _details(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PlanError(f"plan field 'details' must be a JSON object, got a {_kind(value)}")
    return dict(value)


def _statistics(value) -> LayerStatistics | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PlanError(f"plan field 'statistics' must be a JSON object (LayerStatistics.to_dict), got a {_kind(value)}")
    required = ("points", "blocks", "block_points", "similarity", "angular", "last_token_angular", "token_count", "sequence_count")
    missing = [k for k in required if k not in value]
    if missing:
        raise PlanError(f"plan field 'statistics' lacks {', '.join(missing)}; write it with LayerStatistics.to_dict")
    for name in ("points", "blocks"):
        _names(value[name], f"statistics.{name}")
    try:
        stats = LayerStatistics.from_dict(value)
    except (TypeError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise PlanError(f"plan field 'statistics' is malformed ({type(error).__name__}: {first_line})") from None
    _check_statistics_shapes(stats)
    return stats


def _check_statistics_shapes(stats: LayerStatistics) -> None:
    points, blocks = len(stats.points), len(stats.blocks)
    for name in ("similarity", "angular", "last_token_angular"):
        matrix = getattr(stats, name)
        if matrix.shape != (points, points) or not np.isfinite(matrix).all():
            raise PlanError(f"plan field 'statistics.{name}' must be a finite {points} x {points} matrix "
                            f"(one row per point), got shape {matrix.shape}")
    if len(stats.block_points) != blocks or any(len(p) != 2 or not all(0 <= i < points for i in p) for p in stats.block_points):
        raise PlanError(f"plan field 'statistics.block_points' must hold one (entry, exit) pair of point indices "
                        f"below {points} for each of the {blocks} blocks")
    if len(stats.block_kinds) != blocks or len(stats.removable) != blocks:
        raise PlanError(f"plan fields 'statistics.block_kinds' and 'statistics.removable' must have one entry per block ({blocks})")
    if len(set(stats.blocks)) != blocks:
        raise PlanError("plan field 'statistics.blocks' names a block more than once")
