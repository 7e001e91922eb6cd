"""Residual-stream statistics read by forward hooks on the eager model, for the blocks the graph found.

`ResidualObserver` (graph_observer.py) runs the traced graph. This reads the same residual
points from the eager model's modules: the input of the module that receives each
block's entry (a layer, or the norm in front of a sublayer) and the output of the
last layer of each stream. The points, their order and the statistics are the
graph observer's (tests/test_hook_observer.py compares them on every family).

Used where the eager model runs anyway or where the graph cannot run:

* self-calibration samples from the eager model; watching those steps gives the
  statistics of the generated windows with no second pass over them;
* a statistics pass stops at the last point, before the final norm and the output
  head (a fifth of SmolLM2's forward, and its largest activation, the logits);
* weights offloaded by accelerate (`--device-map`): export cannot trace them, so
  the blocks are found on the graph of a meta-device copy and read here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lorp_fx.arch.anatomy import stacks_of
from lorp_fx.arch.families import layer_stacks
from lorp_fx.calibration.batches import stream_mask, with_model_defaults
from lorp_fx.calibration.capture import StopForward, attach_state_hooks
from lorp_fx.core.errors import CalibrationError, ConfigError, LoRPError
from lorp_fx.core.stats import (
    LayerStatistics,
    SimilarityAccumulator,
    check_finite_states,
    combine_streams,
)
from lorp_fx.graph.blocks import ResidualBlock


@dataclass
class _Reader:
    name: str  # the point's name, "model.layers.3:in"
    module: nn.Module
    kind: str  # "pre": the module's first input; "out": its output (the first element of a tuple)


class HookObserver:
    """Sums of the residual-stream similarity of `blocks` (from `find_blocks` on the model's graph).

    `with observer.attached(): model(...)` then `observer.add(batch)` adds one batch;
    `observer.run(model, batch)` does both and stops the pass at the last point.
    Raises ConfigError when a block has no module to hook (a sublayer of a family
    `families.py` does not describe); the caller then runs the graph observer.
    """

    def __init__(self, model: nn.Module, blocks: list[ResidualBlock], granularity: str = "layer"):
        self.model, self.blocks, self.granularity = model, list(blocks), granularity
        self.readers, self.block_points, streams = _readers(model, self.blocks, granularity)
        self.streams = [(points, SimilarityAccumulator(len(points))) for points in streams]
        self.states: dict[int, torch.Tensor] = {}
        self.calls = 0
        self._stop = False

    # ------------------------------------------------------------------ watching

    @contextlib.contextmanager
    def attached(self, stop_at_last_point: bool = False):
        """Hooks on the model's modules while the block runs; with `stop_at_last_point` a pass ends
        (raising StopForward, which `run` catches) once every point is read."""
        self._stop, self.states = stop_at_last_point, {}
        handles = attach_state_hooks([(i, r.module, r.kind) for i, r in enumerate(self.readers)], self._store)
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def run(self, model: nn.Module, batch: dict) -> None:
        """One forward pass over `batch` up to the last point, added to the sums."""
        with self.attached(stop_at_last_point=True), torch.no_grad():
            try:
                model(**with_model_defaults(model, batch))
            except StopForward:
                pass
        self.add(batch)

    def add(self, batch: dict | None = None, *, last_tokens: bool = True) -> None:
        """Add the states the hooks read in the last pass; `last_tokens=False` for a step of
        generation that is not a window's last token (its tokens count, its last-token angles not)."""
        missing = [self.readers[i].name for i in range(len(self.readers)) if i not in self.states]
        if missing:
            raise CalibrationError(f"internal error: the forward pass never reached {missing[0]}")
        for stream_index, (points, accumulator) in enumerate(self.streams):
            states = [self.states[i] for i in points]
            check_finite_states(states, [self.readers[i].name for i in points])
            mask = None if batch is None else stream_mask(batch, states[0], decoder=stream_index > 0)
            # A few sequences at a time: the accumulator stacks all points of the tokens it is given.
            rows = max(1, SimilarityAccumulator.CHUNK_TOKENS // max(1, int(states[0].shape[1])))
            for first in range(0, int(states[0].shape[0]), rows):
                part = [state[first : first + rows] for state in states]
                part_mask = None if mask is None else mask[first : first + rows]
                if last_tokens:
                    accumulator.update(part, part_mask)
                else:
                    _update_tokens_only(accumulator, part, part_mask)
        self.states = {}
        self.calls += 1

    def _store(self, index: int, state) -> None:
        if not isinstance(state, torch.Tensor):
            raise CalibrationError(f"internal error: the hook for {self.readers[index].name} saw no hidden-state tensor")
        self.states[index] = state.detach()  # the accumulator moves it to where its float64 sums are kept
        if self._stop and len(self.states) == len(self.readers):
            raise StopForward

    # ------------------------------------------------------------------ results

    def accumulators(self) -> list[SimilarityAccumulator]:
        return [accumulator for _, accumulator in self.streams]

    def statistics(self) -> LayerStatistics:
        """The statistics so far, laid out as the graph observer lays them out."""
        if not self.calls:
            raise CalibrationError("no calibration batch was seen: there is no calibration text to measure")
        points = [reader.name for reader in self.readers]
        return combine_streams(self.streams, points, self.blocks, self.block_points)


def collect_hook_statistics(model: nn.Module, blocks: list[ResidualBlock], batches: list[dict], *, granularity: str = "layer",
                            progress: bool = True) -> LayerStatistics:
    """One pass over `batches` (on the model's input device), each stopped at the last residual point."""
    observer = HookObserver(model, blocks, granularity)
    for batch in tqdm(batches, desc="statistics", unit="batch", disable=not progress):
        observer.run(model, batch)
    return observer.statistics()


# --------------------------------------------------------------------------- which module reads which point


def _readers(model: nn.Module, blocks: list[ResidualBlock], granularity: str):
    """(a reader per point, (entry, exit) point indices per block, point indices per stream), in the
    graph observer's order: points numbered as the blocks first name them."""
    index_of: dict = {}
    nodes: list = []
    streams: list[list[int]] = []
    block_points = []
    for block in blocks:
        ends = []
        for node in (block.entry, block.exit):
            if node not in index_of:
                index_of[node] = len(nodes)
                nodes.append((node, block))
                while block.stream >= len(streams):
                    streams.append([])
                streams[block.stream].append(index_of[node])
            ends.append(index_of[node])
        block_points.append(tuple(ends))
    names = [""] * len(nodes)  # as the graph observer names them: a block's output, else the first block's input
    for block, (entry, exit_) in zip(blocks, block_points):
        names[entry] = names[entry] or f"{block.name}:in"
        names[exit_] = f"{block.name}:out"
    entered = {}
    for block in blocks:
        entered.setdefault(block.entry, block)
    readers = []
    for (node, first_block), name in zip(nodes, names):
        if node in entered:
            readers.append(_Reader(name, _entry_module(model, entered[node], granularity), "pre"))
        else:  # the end of a stream: the output of the layer holding the stream's last block
            readers.append(_Reader(name, _layer_module(model, first_block.name), "out"))
    return readers, block_points, [s for s in streams if s]


def _entry_module(model: nn.Module, block: ResidualBlock, granularity: str) -> nn.Module:
    """The module whose first input is the state entering `block`: the layer itself, or a sublayer's entry norm."""
    if granularity == "layer":
        return _submodule(model, block.name)

    try:
        units = {unit.full_name: unit for stack in stacks_of(model) for unit in stack.units}
    except LoRPError as error:
        raise ConfigError(f"cannot read sublayer states of {type(model).__name__} with hooks ({error})") from None
    if block.name not in units:
        raise ConfigError(f"cannot read the states of sublayer {block.name} with hooks: families.py names no such unit")
    return units[block.name].entry


def _layer_module(model: nn.Module, block_name: str) -> nn.Module:
    """The layer a block belongs to (the block itself at layer granularity)."""
    for path, layers in layer_stacks(model):
        for i in range(len(layers)):
            layer = f"{path}.{i}"
            if block_name == layer or block_name.startswith(layer + "."):
                return layers[i]
    return _submodule(model, block_name)


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"cannot read the states of block {name} with hooks: the model has no module of that name") from None


def _update_tokens_only(accumulator: SimilarityAccumulator, states: list[torch.Tensor], mask) -> None:
    """`update` without the last-token sums: a generation step's token is not its window's last."""
    last_angle_sum, sequence_count = accumulator.last_angle_sum.clone(), accumulator.sequence_count.clone()
    accumulator.update(states, mask)
    accumulator.last_angle_sum = last_angle_sum.to(accumulator.cos_sum.device)
    accumulator.sequence_count = sequence_count.to(accumulator.cos_sum.device)
