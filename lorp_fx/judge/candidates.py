"""Cheap calibration-loss measurements for loss-judged selectors, with or without compensation.

`CandidateLoss(graph, batches)` is a `loss_fn`: called with the names of the removed
blocks, it returns the mean next-token loss of the model without them on the first
`loss_windows` calibration windows (the number `loss.calibration_loss` returns),
computed faster (`lorp_fx.judge.loss.calibration_loss` is the reference it equals):

* **depth locality.** The model without R computes what the dense model computes up
  to the first unit R changes. The states entering every unit are kept for the dense
  model and for the last few measured models; a measurement starts from the cached
  state of the model that agrees with it longest (a greedy's committed set R and a
  candidate R + {b} agree up to b's entry). The dense loss comes free with the
  caching pass.
* **checkpoints, not every state.** Only the states entering each layer (and the final
  state) are kept; a state inside a layer (the input of the unit a map folds into, a
  resume point between a layer's sublayers) is recomputed from the layer's entry when
  asked for (`_state`: one sublayer, about 1/60 of a pass on SmolLM2). That halves the
  cache of a two-sublayer decoder for the same results.
* **compensation without copies.** With `compensation="cosine"` (or "lstsq") the
  measured model is the compensated one: each gap (maximal run of removed units) is
  closed by `lorp_fx.compensation`'s map, applied on the branch output of the unit
  before the gap (`GraphRunner`), which is what folding it into that unit's output
  projection does (a per-channel map, `form="diagonal"`, where the branch is normalised
  before the add: Gemma's sandwich norms, folded into that norm's weight). The map is fitted from cached dense states (`gap_fit`): it depends
  on its gap only, so it is fitted once and shared by every candidate with that gap.
  With `fit_on="others"` (the default) the maps are fitted on the calibration windows
  *other* than the loss windows, so the compensated loss is a held-out number and an
  unhelpful map shows as one; `fit_on="all"` fits on every window, as `compensate`
  does. `final_fits(names)` returns the maps fitted on every window as `GapFit`s for
  `compensation.apply_compensation` (`eager_fits` names their parameters), so the final
  model needs no further pass; `sequential_fits(names)` fits gap after
  gap from the pruned model's view (as `compensate(..., sequential=True)`).

`weights` gives the graph's weights where its own are not real: the meta-device skeleton of a model that
accelerate offloads (`io.placement.streamed_weights` reads each from the offload store as a run needs it).

Costs are counted: `seconds`, `measurements`, and `passes()`: time in units of one plain
forward pass over all calibration windows, timed during the caching pass.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch.fx import GraphModule
from tqdm.auto import tqdm

from lorp_fx.compensation.solver import CV_FOLDS, METHODS
from lorp_fx.core.errors import CalibrationError, ConfigError
from lorp_fx.core.model import release_memory
from lorp_fx.core.stats import LayerStatistics
from lorp_fx.graph.runner import GraphRunner
from lorp_fx.judge.gap_maps import GapMaps
from lorp_fx.judge.head import head_loss
from lorp_fx.judge.layout import Reduce, WindowLayout, local_windows, reduce_sums
from lorp_fx.judge.states import half_precision_holds, pack, unpack
from lorp_fx.judge.windows import StateStatistics, window_labels, window_rows

KEPT = None
REMOVED = "removed"


class CandidateLoss(GapMaps):
    """`loss_fn(removed_names) -> float` from cached states, memoised, optionally compensated."""

    def __init__(
        self,
        graph: GraphModule,
        batches: list[dict],
        *,
        loss_windows: int = 8,
        compensation: str | None = None,
        ridge: float | str = "auto",
        form: str | None = None,
        fit_on: str = "others",
        cached_models: int = 3,
        reject_unhelpful_maps: bool = True,
        sources: list[str] | None = None,
        held_only: Iterable[str] = (),
        window_indices: list[int] | None = None,
        reduce: Reduce = None,
        progress: bool = False,
        half_states: bool = True,
        weights: Callable[[str], torch.Tensor] | None = None,
    ):
        if compensation is not None and compensation not in METHODS:
            raise ConfigError(f"unknown compensation method {compensation!r}; choose one of {', '.join(METHODS)} or None")
        if fit_on not in ("others", "all"):
            raise ConfigError(f"fit_on must be 'others' or 'all', got {fit_on!r}")
        if form not in (None, "full", "diagonal"):
            raise ConfigError(f"unknown compensation form {form!r}; choose full, diagonal or None (chosen per model)")
        self.runner = GraphRunner(graph, fetch=weights)
        self.compensation, self.ridge, self.reject = compensation, ridge, reject_unhelpful_maps
        normalised = any(self.runner.branch_normalised(u) for u in range(len(self.runner.units)))
        # As `compensation.default_form`: per channel where any branch is normalised before its add.
        self.form = form or ("diagonal" if normalised else "full")
        inputs = {n.name for n in graph.graph.nodes if n.op == "placeholder"}
        # One window per forward call: a call holds one window's logits (and their log-softmax), not a
        # batch's (SmolLM2: 50 MB instead of 200 MB each); the mean over equal windows is the same.
        windows = window_rows(batches, inputs)
        if not windows or "input_ids" not in windows[0]:
            raise CalibrationError("CandidateLoss needs causal-LM batches with input_ids")
        # What each window is for, decided from every window's label (judge/layout.py): the same in every
        # process, whichever windows it holds (`window_indices`, their global indices; `reduce` sums over them).
        total = len(sources) if sources is not None else (None if window_indices is not None else len(windows))
        if total is None:
            raise ConfigError("window_indices needs sources: a label for every window of every process")
        here = local_windows(window_indices, len(windows), total)
        self.layout = WindowLayout.plan(window_labels(sources, total), loss_windows, compensation is not None, fit_on,
                                        held_only)
        self.reduce, self.held_only, self.fit_on = reduce, self.layout.held_only, self.layout.fit_on
        by_index = dict(zip(here, windows))

        def held(indices) -> tuple[list[int], list[dict]]:
            mine = [i for i in indices if i in by_index]
            return mine, [by_index[i] for i in mine]

        self.loss_indices, self.loss_batches = held(self.layout.loss)
        self.fit_indices, self.fit_batches = held(self.layout.fit)
        self.guard_indices, self.guard_batches = held(self.layout.guard)
        self.loss_windows = len(self.layout.loss)
        self.calibration_batches = len(self.layout.labels)
        self.cached_models = cached_models
        self.memo: dict = {}
        self.window_losses: dict = {}  # memo key -> each loss window's loss
        self.released = False
        self.seconds = 0.0
        self.measurements = 0
        self._fits: dict = {}
        self._reports: dict = {}
        self._cache: OrderedDict = OrderedDict()
        self.device = windows[0]["input_ids"].device
        self._fit_keys = self.layout.part_keys([*self.layout.fit, *self.layout.guard], CV_FOLDS)
        self._every_keys = self.layout.part_keys(self.layout.every(), CV_FOLDS)
        self.checkpoints = frozenset([group[0] for group in self.runner.layer_units] + [len(self.runner.units)])
        self.half_states = half_states
        self._cache_dense(progress)
        release_memory(self.device)

    # ------------------------------------------------------------------ the loss

    def __call__(self, removed: Iterable[str]) -> float:
        return self.loss(removed)

    def loss(self, removed: Iterable[str], *, compensate: bool | None = None) -> float:
        """The calibration loss without `removed` (compensated unless `compensate=False`)."""
        units = self.runner.units_of(removed)
        compensate = bool(self.compensation) if compensate is None else compensate
        key = (units, compensate)
        if key not in self.memo:
            self._check_not_released()
            clock = time.perf_counter()
            self.window_losses[key] = self._measure(self._config(units, compensate))
            self.memo[key] = self.mean(self.window_losses[key])
            # A measurement frees a model's worth of states (the cache keeps a few); give the pages back
            # so that freed states do not stay resident under the next one (measured: -0.5 GiB on SmolLM2).
            # They hold no reference cycles, so no garbage collection is needed for that.
            release_memory(self.device, collect=False)
            self.seconds += time.perf_counter() - clock
            self.measurements += 1
        return self.memo[key]

    def mean(self, losses: list[float]) -> float:
        """The mean of per-window values over every process's loss windows (this process holds `losses`)."""
        total, count = reduce_sums([sum(losses), len(losses)], self.reduce)
        return total / count

    def source_means(self, values: list[float]) -> dict[str, float]:
        """Per source, the mean of values given for this process's loss windows, then its guard windows,
        over every process (the sources in the order of the first window of each)."""
        labels = [self.layout.labels[i] for i in (*self.loss_indices, *self.guard_indices)]
        sources = [s for s in self.layout.sources if s in {self.layout.labels[i] for i in (*self.layout.loss, *self.layout.guard)}]
        sums = [sum(v for v, label in zip(values, labels) if label == s) for s in sources]
        counts = [sum(1 for label in labels if label == s) for s in sources]
        reduced = reduce_sums([*sums, *counts], self.reduce)
        return {s: reduced[k] / reduced[len(sources) + k] for k, s in enumerate(sources)}

    def source_counts(self) -> dict[str, int]:
        """Per source, its loss and guard windows over every process."""
        windows = [self.layout.labels[i] for i in (*self.layout.loss, *self.layout.guard)]
        return {s: windows.count(s) for s in dict.fromkeys(windows)}

    @property
    def dense_loss(self) -> float:
        return self.memo[(frozenset(), False)]

    def passes(self, seconds: float | None = None) -> float:
        """`seconds` (default: all measurements so far) in plain forward passes over every calibration window."""
        return (self.seconds if seconds is None else seconds) / self.pass_seconds

    # ------------------------------------------------------------------ configurations

    def gaps(self, units: frozenset[int]) -> list[tuple[int, int]]:
        """Maximal runs (first, last) of removed units on one stream."""
        found: list[tuple[int, int]] = []
        for u in sorted(units):
            if found and found[-1][1] == u - 1 and self.runner.units[u].stream == self.runner.units[u - 1].stream:
                found[-1] = (found[-1][0], u)
            else:
                found.append((u, u))
        return found

    def _config(self, units: frozenset[int], compensate: bool) -> tuple:
        """Per unit: KEPT, REMOVED, or the gap (first, last) whose map it carries."""
        config = [REMOVED if u in units else KEPT for u in range(len(self.runner.units))]
        if compensate:
            for first, last in self.gaps(units):
                if self._fit(first, last) is not None:
                    config[first - 1] = (first, last)
        return tuple(config)

    # ------------------------------------------------------------------ measuring

    @torch.no_grad()
    def _measure(self, config: tuple) -> float:
        source, agree = self._closest(config)
        start = self._checkpoint(agree)  # the two agree before `agree`, hence before the checkpoint too
        removed = frozenset(u for u, s in enumerate(config) if s == REMOVED)
        maps = {u: self._fits[s].transform.float() for u, s in enumerate(config) if isinstance(s, tuple)}
        losses, states = [], []
        final = len(self.runner.units)
        # The model `_remember` would evict after this measurement goes now: one model fewer held while the new
        # one's states are recorded (the cache ends the same).
        if config not in self._cache:
            self._evict(keep=(self._dense_key, next(reversed(self._cache))), room=1)
        for batch, cached in zip(self.loss_batches, source):
            resume = self._resume(cached, start)
            recorded = self.runner.run(batch, removed, maps, resume=resume, record=True, stop=final)[1]
            losses.append(head_loss(self.runner, batch, recorded[final]))
            states.append({**{u: cached[u] for u in cached if u < (start or 0)}, **self._kept(recorded)})
        self._remember(config, states)
        return losses

    def _closest(self, config: tuple) -> tuple[list[dict], int]:
        """The cached model agreeing with `config` longest, and the first unit where they differ."""
        best, start = None, -1
        for key in self._cache:
            agree = next((u for u, (a, b) in enumerate(zip(key, config)) if a != b), len(config))
            if agree > start:
                best, start = key, agree
        self._cache.move_to_end(best)
        return self._cache[best], start

    def _checkpoint(self, unit: int) -> int | None:
        """The last checkpoint at or before `unit` (None: none, run from the inputs)."""
        return max((c for c in self.checkpoints if c <= unit), default=None)

    def _kept(self, recorded: dict) -> dict:
        """The checkpoints of recorded states, as they are cached (`judge.states.pack`)."""
        return {u: pack(state, self.half_states) for u, state in recorded.items() if u in self.checkpoints}

    def _resume(self, states: dict, start: int | None) -> tuple[int, torch.Tensor] | None:
        """`GraphRunner.run`'s resume point at checkpoint `start` of cached `states` (None: from the inputs)."""
        return (start, unpack(states[start], self.state_dtype)) if start else None

    def _state(self, states: dict, batch: dict, unit: int, removed: frozenset[int] = frozenset(),
               maps: dict | None = None) -> torch.Tensor:
        """The state entering `unit` of the model (`removed`, `maps`) whose checkpoints `states` holds:
        kept, or recomputed from the checkpoint before it."""
        if unit in states:
            return unpack(states[unit], self.state_dtype)
        start = self._checkpoint(unit)
        return self.runner.run(batch, removed, maps, resume=self._resume(states, start), record=True, stop=unit)[1][unit]

    def _remember(self, config: tuple, states: list[dict]) -> None:
        self._cache[config] = states
        self._cache.move_to_end(config)
        self._evict(keep=(self._dense_key,))

    def _evict(self, keep: tuple, room: int = 0) -> None:
        """Drop the least recently used models (never those in `keep`) until `room` more fit the cache."""
        while len(self._cache) + room > self.cached_models + 1:
            victim = next((k for k in self._cache if k not in keep), None)
            if victim is None:
                return
            del self._cache[victim]

    @torch.no_grad()
    def _cache_dense(self, progress: bool) -> None:
        """One pass: every layer's entry state on the loss and fit windows (and the guard windows'); the dense
        loss; the layer statistics, from the states as computed."""
        final = len(self.runner.units)
        shared = self.fit_on == "all"
        bar = tqdm(total=len(self.loss_batches) + (0 if shared else len(self.fit_batches)), unit="window",
                   desc="caching calibration states", disable=not progress)
        single_stream = len({u.stream for u in self.runner.units}) == 1
        self._statistics = StateStatistics(self.runner) if single_stream else None
        clock, checking = time.perf_counter(), 0.0
        loss_states, window_losses = [], []
        for batch in self.loss_batches:
            recorded = self.runner.run(batch, record=True, stop=final)[1]
            window_losses.append(head_loss(self.runner, batch, recorded[final]))
            kept = {u: state for u, state in recorded.items() if u in self.checkpoints}
            if self._statistics is not None:
                self._statistics.add(batch, kept)
            if not loss_states:  # the first window decides the states' precision, before any is packed
                check = time.perf_counter()
                self._choose_precision([batch], [kept], window_losses)
                checking = time.perf_counter() - check
            loss_states.append(self._kept(kept))
            bar.update()
        if not self.loss_batches:  # this process holds no loss window: time one of its windows instead
            some = self.runner.run((self.fit_batches or self.guard_batches)[0], record=True)[1]
            self._choose_precision([], [some], [])
        # A plain forward pass over every calibration window, timed on this process's first windows.
        self.pass_seconds = ((time.perf_counter() - clock - checking) / max(1, len(self.loss_batches))
                             * self.calibration_batches)
        self._fit_states = []
        self._guard_states, self._guard_dense = [], []  # the dense loss of a guard window: its head, now
        for batch in self.guard_batches if self.compensation else []:
            recorded = self.runner.run(batch, record=True, stop=final)[1]
            self._guard_dense.append(head_loss(self.runner, batch, recorded[final]))
            self._guard_states.append(self._kept(recorded))
        for i, batch in enumerate(self.fit_batches):
            if shared and i < len(loss_states):
                self._fit_states.append(loss_states[i])
            else:
                recorded = self.runner.run(batch, record=True, stop=final)[1]
                if self._statistics is not None and self.fit_on == "others":
                    self._statistics.add(batch, recorded)
                self._fit_states.append(self._kept(recorded))
                bar.update()
        bar.close()
        dense = self.mean(window_losses)
        self.memo[(frozenset(), False)] = self.memo[(frozenset(), True)] = dense
        self.window_losses[(frozenset(), False)] = self.window_losses[(frozenset(), True)] = window_losses
        self._dense_key = tuple([KEPT] * final)
        self._cache[self._dense_key] = loss_states

    def _choose_precision(self, batches: list[dict], states: list[dict], losses: list[float]) -> None:
        """The states' dtype and width (from `states[0]`), and whether they are cached in float16
        (`judge.states.half_precision_holds` on `batches`; every process takes part in its sum)."""
        some = next(iter(states[0].values()))
        self.state_dtype = some.dtype
        # the hidden width and where states live, for a gap this process holds no fit window of (its
        # statistics are zeros that the other processes' sums fill in)
        self.state_shape = (some.shape[-1], some.device)
        self.half_states = self.half_states and half_precision_holds(self.runner, batches, states, losses, self.reduce)

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> LayerStatistics:
        """The layer statistics `observe.collect_statistics` computes on the same windows, from
        the states the caching pass kept (no further pass). Needs every window cached, i.e.
        compensation on (fit windows) or only loss windows given; one residual stream."""
        self._check_not_released()
        if len({u.stream for u in self.runner.units}) != 1:
            raise CalibrationError("CandidateLoss.statistics supports single-stream (decoder-only) models")
        if self.fit_on != "others" and len(self.layout.fit) + len(self.layout.loss) < self.calibration_batches - len(self.layout.guard):
            raise CalibrationError("statistics need every calibration window cached: use fit_on='others'")
        return self._statistics.result(self.reduce)

    def _check_not_released(self) -> None:
        if self.released:
            raise CalibrationError("this CandidateLoss released its cached states; build a new one to measure more")

    def release(self) -> None:
        """Drop the cached states (the model's pruning and saving need the memory); the memoised
        losses stay, and a measurement after this is refused."""
        self._cache.clear()
        self._fit_states, self._guard_states = [], []
        self.released = True
        release_memory(self.device)
