"""The judge's windows: one dict per window, its source label, its next-token loss, and the layer statistics
from the states the judge cached for them."""

from __future__ import annotations

import torch

from lorp_fx.core.errors import CalibrationError, ConfigError
from lorp_fx.core.stats import (
    LayerStatistics,
    SimilarityAccumulator,
    check_finite_states,
)
from lorp_fx.judge.loss import as_loss, next_token_cross_entropy


class StateStatistics:
    """The layer statistics `observe.collect_statistics` computes, summed window by window from the states
    entering each layer and the final state of `runner`'s single residual stream (as they are computed, in
    the model's dtype, before the judge packs them); `result(reduce)` sums them over the processes once."""

    def __init__(self, runner):
        self.runner = runner
        self.points = [group[0] for group in runner.layer_units] + [len(runner.units)]
        blocks = runner.layers
        self.names = [f"{blocks[0].name}:in"] + [f"{b.name}:out" for b in blocks]
        self.accumulator = SimilarityAccumulator(len(self.points))
        self.error: CalibrationError | None = None  # raised by `result`, where the statistics are asked for
        self._result: LayerStatistics | None = None

    def add(self, batch: dict, states: dict) -> None:
        if self.error is not None:
            return
        try:  # a window statistics refuse (NaN states, only padding) fails `result`, not the judge's other uses
            check_finite_states([states[p] for p in self.points], self.names)
            self.accumulator.update([states[p] for p in self.points], batch.get("attention_mask"))
        except CalibrationError as error:
            self.error = error

    def result(self, reduce=None) -> LayerStatistics:
        if self.error is not None:
            raise self.error
        if self._result is None:
            if reduce is not None:
                self.accumulator.reduce(reduce)
            blocks = self.runner.layers
            self._result = self.accumulator.statistics(
                self.names, [b.name for b in blocks], [(i, i + 1) for i in range(len(blocks))],
                [b.kind for b in blocks], [b.removable for b in blocks],
            )
        return self._result


def statistics_of_states(runner, pairs: list[tuple[dict, dict]], reduce=None) -> LayerStatistics:
    """The layer statistics `observe.collect_statistics` computes on the same windows, from (window, the states
    entering each layer and the final state) `pairs` of `runner`'s single residual stream; `reduce` sums them
    over the processes."""
    statistics = StateStatistics(runner)
    for batch, states in pairs:
        statistics.add(batch, states)
    return statistics.result(reduce)


def window_labels(sources: list[str] | None, windows: int) -> list[str]:
    """A calibration-source label per window ("calibration" for all when none are given)."""
    if sources is None:
        return ["calibration"] * windows
    if len(sources) != windows:
        raise ConfigError(f"sources labels {len(sources)} windows, but the calibration batches hold {windows}")
    return [str(s) for s in sources]


def window_rows(batches: list[dict], inputs: set[str]) -> list[dict]:
    """Every window of `batches` as its own dict of (1, seq) tensors, keys limited to the graph's inputs."""
    rows = []
    for batch in batches:
        tensors = {k: v for k, v in batch.items() if k in inputs and isinstance(v, torch.Tensor)}
        for r in range(tensors["input_ids"].shape[0]):
            rows.append({k: v[r : r + 1] for k, v in tensors.items()})
    return rows


def next_token_loss(output, batch: dict) -> float:
    """`loss.next_token_cross_entropy` of a graph output (NaN counts as +inf), as `calibration_loss` measures it."""
    return as_loss(next_token_cross_entropy(output, batch))
