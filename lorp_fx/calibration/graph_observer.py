"""The statistics step on the traced graph: watch the residual stream while a network runs, and keep only sums.

`ResidualObserver` stands in for a network and takes any call the network takes
(`NetworkCall` names its arguments). On its first call it traces the network with
those inputs (`trace`), finds its blocks (`find_blocks`) and adds a recording node
after every residual point of a copy of the graph. Every call then runs that copy,
hands the states of the batch to a `SimilarityAccumulator` per residual stream and
drops them: memory holds O(P^2) sums and one batch's states. States of any shape
are read as token vectors (`stats.token_vectors`); a stream whose blocks hold a
convolution is read channels-first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from lorp_fx.calibration.batches import stream_mask
from lorp_fx.calibration.network_call import NetworkCall
from lorp_fx.core.errors import CalibrationError, InputMismatchError
from lorp_fx.core.stats import (
    LayerStatistics,
    SimilarityAccumulator,
    check_finite_states,
    combine_streams,
)
from lorp_fx.graph.blocks import ResidualBlock, find_blocks
from lorp_fx.graph.rewrite import copy_graph
from lorp_fx.graph.trace import trace


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
    channels_first: bool  # a convolutional stream: features in dim 1 (see `stats.token_vectors`)


class ResidualObserver(nn.Module):
    """A drop-in for `network` that collects residual-stream statistics as it runs.

    It takes whatever call the network takes: positional, keyword or both
    (`NetworkCall` names the arguments by the network's signature). Attributes other
    than `forward` (such as `config`) are looked up on the network. Non-tensor
    arguments are fixed into the traced graph; a call with other ones traces again.
    For `transformers` models that take `use_cache`, it defaults to False: a
    calibration pass needs no cache. `on_call(call, output)`, when given, sees every
    call as it happens (the callback checks the budget and the loss on the first).
    """

    def __init__(
        self,
        network: nn.Module,
        granularity: str = "layer",
        on_call: Callable[[NetworkCall, Any], None] | None = None,
    ):
        super().__init__()
        self.network = network
        self.granularity = granularity
        self.on_call = on_call
        self.graph: GraphModule | None = None  # the clean traced graph (what `prune` works on)
        self.blocks: list[ResidualBlock] = []
        self._observed: GraphModule | None = None
        self._key: tuple | None = None
        self._recorder = _Recorder()
        self._streams: list[_Stream] = []
        self._point_names: list[str] = []
        self._block_points: list[tuple[int, int]] = []
        self.calls = 0
        self.training = network.training  # its own flag only: train() would reset every submodule

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("network"), name)

    # ------------------------------------------------------------------ running

    def forward(self, *args, **kwargs):
        call = NetworkCall.bind(self.network, args, kwargs)
        if call.key() != self._key:
            self._prepare(call)
        self._recorder.states.clear()
        try:
            output = call.run(self._observed)
            self._accumulate(call)
        finally:
            self._recorder.states.clear()
        self.calls += 1
        if self.on_call is not None:
            self.on_call(call, output)
        return output

    def _prepare(self, call: NetworkCall) -> None:
        graph = trace(self.network, call.example())
        blocks = find_blocks(graph, self.granularity)
        if self.graph is not None and [b.name for b in blocks] != [b.name for b in self.blocks]:
            raise InputMismatchError("the network shows different residual blocks for different inputs")
        self.graph, self.blocks, self._key = graph, blocks, call.key()
        self._observed = self._instrument(graph)

    def _instrument(self, graph: GraphModule) -> GraphModule:
        observed = copy_graph(graph)  # sharing the parameters
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
            convolutional = [False] * len(streams)
            for block in blocks:
                convolutional[block.stream] |= any(_is_convolution(observed, node) for node in block.nodes)
            self._streams = [
                _Stream(ids, SimilarityAccumulator(len(ids)), conv) for ids, conv in zip(streams, convolutional)
            ]
            self._block_points = block_points
            self._point_names = _point_names(blocks, block_points, len(points))
        return observed

    def _accumulate(self, call: NetworkCall) -> None:
        states = self._recorder.states
        for stream_index, stream in enumerate(self._streams):
            points = [states[i] for i in stream.points]
            check_finite_states(points, [self._point_names[i] for i in stream.points])
            # A padding mask (batch, seq) belongs to sequence states (batch, seq, d) only.
            sequence = points[0].dim() == 3 and not stream.channels_first
            mask = stream_mask(call.inputs, points[0], decoder=stream_index > 0) if sequence else None
            stream.accumulator.update(points, mask, channels_first=stream.channels_first)

    # ------------------------------------------------------------------ results

    def accumulators(self) -> list[SimilarityAccumulator]:
        return [stream.accumulator for stream in self._streams]

    def statistics(self) -> LayerStatistics:
        """The statistics so far; cross-stream pairs (encoder vs decoder) get cosine 0."""
        if not self._streams or not self.calls:
            raise CalibrationError(
                "no calibration batch was seen: the calibration loader is empty or never called the network"
            )
        streams = [(stream.points, stream.accumulator) for stream in self._streams]
        return combine_streams(streams, self._point_names, self.blocks, self._block_points)


def _point_names(blocks: list[ResidualBlock], block_points: list[tuple[int, int]], count: int) -> list[str]:
    names = [""] * count
    for block, (entry, exit) in zip(blocks, block_points):
        names[entry] = names[entry] or f"{block.name}:in"
        names[exit] = f"{block.name}:out"
    return names


_CONVOLUTIONS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


def _is_convolution(graph: GraphModule, node) -> bool:
    """A convolution node: `nn.Conv*` modules (symbolic_trace) or conv functions and aten ops (torch.export)."""
    if node.op == "call_module":
        return isinstance(graph.get_submodule(node.target), nn.modules.conv._ConvNd)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[0] in _CONVOLUTIONS
    return False


def collect_statistics(
    network: nn.Module,
    batches,
    *,
    granularity: str = "layer",
    progress: bool = True,
    description: str = "calibrating",
) -> tuple[LayerStatistics, GraphModule]:
    """Run `network` on `batches` under a `ResidualObserver`: a dict is a call by keyword, a tuple or
    list a positional call, a tensor the one positional argument.

    The plain-Python path to what `LoRPCallback` collects inside `Trainer.validate`;
    returns the statistics and the traced graph (for `prune`).
    """
    observer = ResidualObserver(network, granularity)
    with torch.no_grad():
        for batch in tqdm(batches, desc=description, unit="batch", disable=not progress):
            if isinstance(batch, dict):
                observer(**batch)
            elif isinstance(batch, (tuple, list)):
                observer(*batch)
            else:
                observer(batch)
    return observer.statistics(), observer.graph
