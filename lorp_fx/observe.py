"""Step 3 of the pipeline: watch the residual stream while a network runs, and keep only sums.

`ResidualObserver` stands in for a network. On its first call it traces the network
with the inputs it was given (`trace`), finds its blocks (`find_blocks`) and adds a
recording node after every residual point of a copy of the graph. Every call then
runs that copy, hands the states of the batch to a `SimilarityAccumulator` per
residual stream and drops them: memory holds O(P^2) sums and one batch's states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from .batches import stream_mask, with_model_defaults
from .blocks import ResidualBlock, find_blocks
from .errors import CalibrationError, InputMismatchError
from .rewrite import prune
from .stats import LayerStatistics, SimilarityAccumulator
from .trace import trace

class _Recorder(nn.Module):
    """The call_module target that the instrumented graph hands each residual state to."""

    _is_impure = True  # keeps dead-code elimination away from it

    def __init__(self):
        super().__init__()
        self.states: dict[int, torch.Tensor] = {}

    def forward(self, state: torch.Tensor, index: int) -> None:
        self.states[index] = state.detach()


@dataclass
class _Stream:
    points: list[int]  # indices into the recorded states, in depth order
    accumulator: SimilarityAccumulator


class ResidualObserver(nn.Module):
    """A drop-in for `network` that collects residual-stream statistics as it runs.

    Attributes other than `forward` (such as `config`) are looked up on the network.
    Non-tensor keyword arguments are fixed into the traced graph; a call with a new
    set of them traces again. For `transformers` models that take `use_cache`, it
    defaults to False: a calibration pass needs no cache.
    """

    def __init__(self, network: nn.Module, granularity: str = "layer"):
        super().__init__()
        self.network = network
        self.granularity = granularity
        self.graph: GraphModule | None = None  # the clean traced graph (what `prune` works on)
        self.blocks: list[ResidualBlock] = []
        self._observed: GraphModule | None = None
        self._signature: tuple | None = None
        self._recorder = _Recorder()
        self._streams: list[_Stream] = []
        self._point_names: list[str] = []
        self._block_points: list[tuple[int, int]] = []
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("network"), name)

    # ------------------------------------------------------------------ running

    def forward(self, *args, **kwargs):
        kwargs = with_model_defaults(self.network, kwargs)
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        signature = (len(args), tuple(sorted(tensors)), tuple((k, repr(v)) for k, v in sorted(kwargs.items()) if k not in tensors))
        if signature != self._signature:
            self._prepare(args, kwargs, signature)
        self._recorder.states.clear()
        output = self._observed(*args, **(tensors if self._exported else kwargs))
        self._accumulate(kwargs)
        self._recorder.states.clear()
        self.calls += 1
        return output

    @property
    def _exported(self) -> bool:
        return self.graph is not None and self.graph.meta.get("lorp_fx_frontend") == "export"

    def _prepare(self, args: tuple, kwargs: dict, signature: tuple) -> None:
        example = kwargs if not args else (args if not kwargs else None)
        if example is None:
            raise InputMismatchError(
                "call the network with keyword arguments only, or positional arguments only, while calibrating"
            )
        graph = trace(self.network, example)
        blocks = find_blocks(graph, self.granularity)
        if self.graph is not None and [b.name for b in blocks] != [b.name for b in self.blocks]:
            raise InputMismatchError("the network shows different residual blocks for different inputs")
        self.graph, self.blocks, self._signature = graph, blocks, signature
        self._observed = self._instrument(graph)

    def _instrument(self, graph: GraphModule) -> GraphModule:
        observed = prune(graph, [])  # a copy sharing the parameters
        blocks = find_blocks(observed, self.granularity)
        observed.add_submodule("lorp_recorder", self._recorder)
        points: list = []
        index_of: dict = {}
        block_points = []
        streams: list[list[int]] = []
        for block in blocks:
            ends = []
            for node in (block.entry, block.exit):
                if node not in index_of:
                    index_of[node] = len(points)
                    points.append(node)
                    if block.stream >= len(streams):
                        streams.append([])
                    streams[block.stream].append(index_of[node])
                ends.append(index_of[node])
            block_points.append(tuple(ends))
        for index, node in enumerate(points):
            with observed.graph.inserting_after(node):
                observed.graph.call_module("lorp_recorder", (node, index))
        observed.recompile()
        if not self._streams:
            self._streams = [_Stream(ids, SimilarityAccumulator(len(ids))) for ids in streams]
            self._block_points = block_points
            self._point_names = _point_names(blocks, block_points, len(points))
        return observed

    def _accumulate(self, kwargs: dict) -> None:
        states = self._recorder.states
        for stream_index, stream in enumerate(self._streams):
            points = [states[i] for i in stream.points]
            _check_finite(points, [self._point_names[i] for i in stream.points])
            stream.accumulator.update(points, stream_mask(kwargs, points[0], decoder=stream_index > 0))

    # ------------------------------------------------------------------ results

    def accumulators(self) -> list[SimilarityAccumulator]:
        return [stream.accumulator for stream in self._streams]

    def statistics(self) -> LayerStatistics:
        """The statistics so far; cross-stream pairs (encoder vs decoder) get cosine 0."""
        if not self._streams or not self.calls:
            raise CalibrationError(
                "no calibration batch was seen: the calibration loader is empty or never called the network"
            )
        total = len(self._point_names)
        similarity = torch.zeros(total, total, dtype=torch.float64)
        angular = torch.full((total, total), 0.5, dtype=torch.float64)
        last = torch.full((total, total), 0.5, dtype=torch.float64)
        tokens = sequences = 0
        for stream in self._streams:
            stats = stream.accumulator.statistics(["?"] * len(stream.points), [], [])
            grid = torch.tensor(stream.points)
            rows, cols = grid[:, None], grid[None, :]
            similarity[rows, cols] = torch.as_tensor(stats.similarity.copy())
            angular[rows, cols] = torch.as_tensor(stats.angular.copy())
            last[rows, cols] = torch.as_tensor(stats.last_token_angular.copy())
            tokens, sequences = max(tokens, stats.token_count), max(sequences, stats.sequence_count)
        return LayerStatistics(
            points=list(self._point_names),
            blocks=[b.name for b in self.blocks],
            block_points=list(self._block_points),
            similarity=similarity.numpy(),
            angular=angular.numpy(),
            last_token_angular=last.numpy(),
            token_count=tokens,
            sequence_count=sequences,
            block_kinds=[b.kind for b in self.blocks],
            removable=[b.removable for b in self.blocks],
        )


def _point_names(blocks: list[ResidualBlock], block_points: list[tuple[int, int]], count: int) -> list[str]:
    names = [""] * count
    for block, (entry, exit) in zip(blocks, block_points):
        names[entry] = names[entry] or f"{block.name}:in"
        names[exit] = f"{block.name}:out"
    return names


def _check_finite(states: list[torch.Tensor], names: list[str]) -> None:
    for state, name in zip(states, names):
        if not bool(torch.isfinite(state).all()):
            where = f"the output of {name[:-4]}" if name.endswith(":out") else f"the input of {name[:-3]}"
            raise CalibrationError(
                f"NaN or Inf in the residual stream, first at {where}; check the model's dtype "
                "(fp16 overflows are common: try float32 or bfloat16) and the calibration inputs"
            )


def collect_statistics(
    network: nn.Module,
    batches,
    *,
    granularity: str = "layer",
    progress: bool = True,
    description: str = "calibrating",
) -> tuple[LayerStatistics, GraphModule]:
    """Run `network` on `batches` (dicts of keyword arguments) under a `ResidualObserver`.

    The plain-Python path to what `LoRPCallback` collects inside `Trainer.validate`;
    returns the statistics and the traced graph (for `prune`).
    """
    from tqdm.auto import tqdm

    observer = ResidualObserver(network, granularity)
    with torch.no_grad():
        for batch in tqdm(batches, desc=description, unit="batch", disable=not progress):
            observer(**batch)
    return observer.statistics(), observer.graph
