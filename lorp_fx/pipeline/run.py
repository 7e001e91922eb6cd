"""`prune_model`: the whole pipeline in one call, one function a step.

    result = lorp_fx.prune_model(model, windows, lorp_fx.PruneConfig(remove=6), tokenizer=tokenizer)
    result.save("pruned/", tokenizer)

Steps: check everything first -> trace the graph and find its blocks -> calibration
windows (given, read from files, or sampled from the model) -> residual-stream
statistics (read by module hooks: while sampling, or in one pass that stops at the
last residual point; on given text with a compensating judge, from the states its
caching pass keeps: no pass of their own) -> selection (loss-judged methods measure candidates on the
first `loss_windows` windows; with compensation on, by the loss of the *compensated*
model, its maps fitted on the other windows: `judge.candidates.CandidateLoss`) ->
layer surgery with compensation, applied only where it does not make that held-out
calibration loss worse -> report. The model runs where it is (any device, or spread
by accelerate: see judge/eager.py). The report gives every step's time in seconds and in
passes: one plain forward pass over all the calibration tokens, timed in the same
run. The command line is a thin shell over this.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lorp_fx.arch.anatomy import check_compensable
from lorp_fx.arch.families import check_dtype, check_sublayer_pruning
from lorp_fx.arch.surgery import count_layers, count_parameters
from lorp_fx.calibration.batches import on_device, one_window_each, token_batches
from lorp_fx.core.budget import check_budget
from lorp_fx.core.errors import CalibrationError, ConfigError, InputMismatchError
from lorp_fx.core.model import (
    causal_lm,
    check_vocabulary,
    encoder_decoder,
    eval_mode,
    is_offloaded,
    model_device,
)
from lorp_fx.core.plan import PruningPlan
from lorp_fx.core.stats import LayerStatistics
from lorp_fx.graph.blocks import find_blocks
from lorp_fx.io.gguf.pruned_file import check_removal
from lorp_fx.io.models import max_positions
from lorp_fx.io.placement import check_offload_granularity
from lorp_fx.io.text import text_head
from lorp_fx.judge.candidates import CandidateLoss
from lorp_fx.judge.eager import eager_calibration_loss
from lorp_fx.judge.loss import calibration_loss, next_token_loss
from lorp_fx.judge.perplexity import perplexity
from lorp_fx.pipeline.calibrate import (
    Calibration,
    CalibrationText,
    calibration_text,
    residual_statistics,
    traced_blocks,
)
from lorp_fx.pipeline.config import PruneConfig
from lorp_fx.pipeline.costs import Stopwatch, plain_pass
from lorp_fx.pipeline.mismatch import calibration_mismatch, dense_losses
from lorp_fx.pipeline.removal import (
    build_judge,
    compensation_method,
    remove_and_compensate,
)
from lorp_fx.pipeline.result import PruneResult
from lorp_fx.selection.common import resolve_protected
from lorp_fx.selection.registry import SELECTORS, options_for, select


def prune_model(
    model: nn.Module,
    calibration: Calibration,
    config: PruneConfig,
    *,
    tokenizer=None,
    evaluation: torch.Tensor | None = None,
    gguf=None,
    progress: bool = True,
) -> PruneResult:
    """Calibrate, select, remove and compensate: `model` made shallower by `config`'s budget.

    * `calibration`: token windows (n, seq_len) as a LongTensor; or text file path(s),
      cut into `config.calib_samples` windows of `config.seq_len` tokens with
      `tokenizer`; or None to let the model sample its own text (needs `tokenizer`
      for the start token).
    * `evaluation`: optional token windows to measure perplexity on before and after.
    * `gguf`: the `GGUFSource` the model was read from (`io.gguf.pruned_file.open_source`); the
      removal is then checked against the GGUF runtime's layer rules right after
      selection, and `PruneResult.save` also writes a pruned GGUF file.
    * The model is pruned in place with `config.inplace`, else a copy is. It runs on
      the device it is on; a model spread by accelerate (`hf_device_map`) is pruned
      through hooks (judge/eager.py).
    """
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"config must be a lorp_fx.PruneConfig, got {type(config).__name__}; "
                          "e.g. PruneConfig(remove=6), or PruneConfig.from_dict(...) for a mapping")
    check_model(model, config, calibration, tokenizer, evaluation)
    # Token ids as the model's embedding takes them, whatever integer type they came in (checked above).
    calibration = calibration.long() if isinstance(calibration, torch.Tensor) else calibration
    evaluation = evaluation.long() if isinstance(evaluation, torch.Tensor) else evaluation
    with eval_mode(model):  # no dropout in any pass: the result depends on the inputs and the seed alone
        result = _prune(model, calibration, config, tokenizer, evaluation, gguf, progress)
    if result.model is not model:  # a pruned copy made in eval mode: the caller's mode, as the model had it
        result.model.train(model.training)
    return result


def _prune(model: nn.Module, calibration: Calibration, config: PruneConfig, tokenizer, evaluation, gguf,
           progress: bool) -> PruneResult:
    """`prune_model` after its checks, with the model in eval mode."""
    offloaded = is_offloaded(model)
    if offloaded:
        check_offload_granularity(config.granularity)
    clock = Stopwatch(model_device(model))
    with clock("trace"):
        length = calibration.shape[1] if isinstance(calibration, torch.Tensor) else None  # given windows' own
        graph, observer = traced_blocks(model, config, tokenizer, offloaded, length)
    check_protected_blocks(graph, observer, config)
    with clock("calibration_text"):
        text = calibration_text(model, calibration, config, tokenizer, progress, observer=observer,
                                guard=compensation_method(config) is not None)
    windows, sampled = text.selection_windows(), text.sources == ["own"] * len(text.sources)
    place = lambda w: on_device(token_batches(w, config.batch_size, encoder_decoder(model)), model_device(model))  # noqa: E731
    batches, every_batch = place(windows), place(text.windows)  # every_batch: with the guard's own text
    with clock("pass_unit"):  # before the judge's cache exists: the unit's forward does not add to its peak
        unit = plain_pass(model, batches)
    judge = None
    with clock("statistics"):
        if not sampled and graph is not None:
            # Text not sampled while watched: the judge's caching pass holds every window's layer states, the
            # statistics' input (an offloaded model's too: one pass streaming its weights from the store, not two).
            judge = build_judge(model, graph, every_batch, config, progress, text)
            stats, statistics_source = statistics_of_judge(judge, config), "the selection's caching pass (no extra pass)"
        if judge is None or stats is None:
            stats, graph, statistics_source = residual_statistics(model, batches, graph, observer, sampled,
                                                                  config, progress)
    with clock("selection"):
        loss_batches = batches[: loss_batch_count(config)]
        # An offloaded model's judge was tried in the statistics step: a second try would repeat its work and note.
        if judge is None and not (offloaded and not sampled):
            judge = build_judge(model, graph, every_batch, config, progress, text)
        eager = offloaded and judge is None  # no judge could be built there: layers are skipped by hooks instead
        if eager:
            note_uncompensated_selection(model, config, "the model is offloaded")
        # Offloaded weights are streamed in once per forward call: there, fewer calls beat smaller logits.
        plan = select_blocks(stats, graph, loss_batches if eager else one_window_each(loss_batches),
                             config, progress, judge=judge, eager_model=model if eager else None,
                             judged=causal_lm(model))
    with clock("calibration_text"):  # what the calibration text looks like to the model, before the judge lets go
        raw = {"file": text_head(calibration)} if "file" in text.sources else None
        mismatch = calibration_mismatch(text.windows, text.sources, tokenizer,
                                        dense_losses(model, judge, text), raw)
    for warning in mismatch["warnings"]:
        print(f"lorp-fx: note: {warning}; the compensation is checked on the model's own text too", file=sys.stderr)
    if gguf is not None:
        check_removal(gguf, plan)  # before compensation and saving, not after
    before = {}
    if evaluation is not None:
        with clock("evaluation"):
            before = {"ppl_before": _perplexity(model, evaluation, config, progress)}
    parameters_before, layers_before = count_parameters(model), count_layers(model)
    with clock("compensation"):
        pruned, fits, names, compensation, fx_difference = remove_and_compensate(
            model, None if offloaded else graph, plan, every_batch, config, progress, judge, text)
    if evaluation is not None:
        with clock("evaluation"):
            before["ppl_after"] = _perplexity(pruned, evaluation, config, progress)
            before["tokens"] = int(evaluation.numel())
    report = build_report(plan, stats, windows, text, statistics_source, compensation, before, fx_difference,
                          (parameters_before, layers_before), pruned, clock, unit, config)
    report["calibration"]["mismatch"] = mismatch
    dense_graph = None if offloaded or (config.inplace and fits) else graph
    return PruneResult(pruned, plan, fits, clock.seconds, report, names, dense_graph, gguf)


def check_protected_blocks(graph, observer, config: PruneConfig) -> None:
    """UnknownBlockError for a protected block the traced model does not have: before the calibration text is
    sampled or read, not when the selector runs after the caching pass."""
    protected = config.selector_options.get("protected")
    if graph is None or protected is None:
        return  # no graph yet (the graph observer traces as it calibrates): the selector checks
    blocks = observer.blocks if observer is not None else find_blocks(graph, config.granularity)
    resolve_protected([block.name for block in blocks], protected)


def build_report(plan: PruningPlan, stats: LayerStatistics, windows: torch.Tensor, text: CalibrationText,
                 statistics_source: str,
                 compensation: dict, evaluation: dict, fx_difference, before: tuple[int, int], pruned: nn.Module,
                 clock: Stopwatch, unit: dict, config: PruneConfig) -> dict:
    """report.json: the plan and its evidence, the calibration, compensation, evaluation, device and cost."""
    parameters_before, layers_before = before
    return {
        "method": plan.method,
        "granularity": plan.granularity,
        "removed": list(plan.remove),
        "layers_before": layers_before,
        "layers_after": count_layers(pruned),
        "parameters_before": parameters_before,
        "parameters_after": count_parameters(pruned),
        "rls": plan.rls,
        "clusters": plan.clusters,
        "scores": plan.scores,
        "points": list(stats.points),
        "similarity": stats.similarity.tolist(),
        "calibration": {"source": text.source, "tokens": stats.token_count, "windows": int(windows.shape[0]),
                        "seq_len": int(windows.shape[1]), "statistics": statistics_source,
                        "sources": dict(Counter(text.sources)), "held_only": sorted(text.held_only)},
        "compensation": compensation,
        "evaluation": evaluation or None,
        "fx_graph_max_abs_logit_difference": fx_difference,
        "device": device_description(pruned),
        "timings": clock.rounded(),
        "timings_in_passes": clock.in_passes(unit["seconds"]),
        "pass_unit": unit,
        "config": config.to_dict(),
    }


# --------------------------------------------------------------------------- checks


def check_model(model: nn.Module, config: PruneConfig, calibration: Calibration, tokenizer, evaluation) -> None:
    """Everything that can be checked before any work: budget, compensation, calibration source, evaluation."""
    check_dtype(getattr(getattr(model, "config", None), "model_type", None), next(model.parameters()).dtype)
    if config.granularity == "layer":
        check_budget(count_layers(model), config.remove if config.remove is not None else 1, what="layers")
    else:
        check_sublayer_pruning(model)
    if config.compensate not in ("auto", "none"):
        check_compensable(model)  # an explicit method the family cannot take fails now, not after calibration
    is_text = isinstance(calibration, (str, os.PathLike)) or (
        isinstance(calibration, Sequence) and not isinstance(calibration, (torch.Tensor, bytes))
        and all(isinstance(p, (str, os.PathLike)) for p in calibration)
    )
    if not (calibration is None or is_text or isinstance(calibration, torch.Tensor)):
        raise ConfigError(f"calibration must be a (n, seq_len) tensor of token ids, the path of a text file (or a list "
                          f"of paths), or None to let the model write its own; got {_kind(calibration)}")
    if evaluation is not None and not isinstance(evaluation, torch.Tensor):
        raise ConfigError(f"evaluation must be a (n, seq_len) tensor of token ids, got {_kind(evaluation)}")
    if (calibration is None or is_text) and tokenizer is None:
        raise ConfigError("reading calibration text or sampling it from the model needs the model's tokenizer: pass tokenizer=")
    kind = "an encoder-decoder" if encoder_decoder(model) else f"{type(model).__name__}, not a causal LM,"
    if calibration is None and not causal_lm(model):
        raise ConfigError(f"self-calibration samples text from a causal LM; {kind} cannot write it: give calibration text")
    if isinstance(calibration, torch.Tensor):
        _check_windows(model, calibration, "calibration")
    if evaluation is not None:
        if not causal_lm(model):
            raise ConfigError(f"evaluation measures next-token perplexity, which {kind} does not model; leave it out")
        _check_windows(model, evaluation, "evaluation")
    _check_positions(model, calibration.shape[1] if isinstance(calibration, torch.Tensor) else config.seq_len, "calibration")
    if evaluation is not None:
        _check_positions(model, evaluation.shape[1], "evaluation")
    if SELECTORS[config.method].required and "loss_fn" in SELECTORS[config.method].required and not causal_lm(model):
        raise ConfigError(f"method {config.method!r} judges candidates by next-token loss, which {kind} has not; "
                          "choose a statistics method")


def _check_positions(model: nn.Module, length: int, what: str) -> None:
    """Windows longer than the position embeddings cover fail inside the model (GPT-2) or quietly leave the
    trained range (RoPE): refused, as the command line does before the weights load."""
    positions = max_positions(getattr(model, "config", None))
    if positions is not None and length > positions:
        raise ConfigError(f"{what} windows of {length} tokens are longer than the model's {positions} positions "
                          f"(max_position_embeddings); use windows of at most {positions} tokens")


def _kind(value) -> str:
    if isinstance(value, (list, tuple)) and value:
        return f"a {type(value).__name__} of {type(value[0]).__name__}"
    return f"a {type(value).__name__}"


def _check_windows(model: nn.Module, windows: torch.Tensor, what: str) -> None:
    if windows.dtype not in (torch.int64, torch.int32) or windows.dim() != 2 or windows.shape[1] < 2:
        raise InputMismatchError(f"{what} windows must be a (n, seq_len >= 2) tensor of token ids, got {windows.dtype} {tuple(windows.shape)}")
    if windows.shape[0] < 1:
        raise InputMismatchError(f"{what} windows: the tensor holds none ({tuple(windows.shape)}); give at least one window")
    check_vocabulary(model, windows)


# --------------------------------------------------------------------------- steps


def statistics_of_judge(judge: CandidateLoss | None, config: PruneConfig) -> LayerStatistics | None:
    """The layer statistics from `judge`'s cached states (equal to the hooked pass's), or None where it
    does not hold them all: no judge, sublayer granularity, or a plain-loss judge (loss windows only)."""
    if judge is None or config.granularity != "layer":
        return None
    try:
        return judge.statistics()
    except CalibrationError:
        return None


def note_uncompensated_selection(model: nn.Module, config: PruneConfig, why: str) -> None:
    """Say so where a loss-judged selector measures the *uncompensated* loss although compensation is on (an
    offloaded model, several processes: no compensating judge runs there), since one process with the model in
    memory judges the compensated loss and can choose other blocks."""
    if SELECTORS[config.method].judges_by_loss and causal_lm(model) and compensation_method(config) is not None:
        print(f"lorp-fx: note: {config.method} judges candidates by the uncompensated calibration loss here ({why}); "
              "in one process with the model in memory it judges the compensated loss, and may choose other blocks",
              file=sys.stderr)


def loss_batch_count(config: PruneConfig) -> int:
    """Batches holding the first `loss_windows` windows (SLEB's 8 x 256 tokens by default)."""
    return max(1, -(-config.loss_windows // config.batch_size))




def select_blocks(stats: LayerStatistics, graph, loss_batches: list[dict], config: PruneConfig, progress: bool,
                  judge: CandidateLoss | None = None, eager_model: nn.Module | None = None,
                  judged: bool = True) -> PruningPlan:
    """Run the configured selector, giving loss-judged methods a calibration-loss function with a progress bar:
    `judge` where given, else the plain calibration loss measured on the graph, or on `eager_model` with
    layers skipped by hooks when the graph cannot run (an offloaded model). Not `judged`: no loss (a model
    without a next-token loss, such as a masked LM), so `lorp` chooses from the statistics."""
    options = {**config.selector_options, **options_for(config.method, seed=config.seed)}
    if judged and SELECTORS[config.method].judges_by_loss:
        if judge is not None:
            loss_fn = judge
        elif eager_model is not None:
            loss_fn = eager_calibration_loss(eager_model, loss_batches)
        else:
            loss_fn = calibration_loss(graph, loss_batches)
        if loss_fn is not None:
            options["loss_fn"] = loss_fn
    with counted(options.get("loss_fn"), f"{config.method}: calibration-loss measurements", progress) as loss_fn:
        if loss_fn is not None:
            options["loss_fn"] = loss_fn
        return select(stats, config.remove, ratio=config.ratio, method=config.method, **options)


@contextlib.contextmanager
def counted(loss_fn, description: str, progress: bool):
    """`loss_fn` with a progress bar of the measurements a loss-judged selector makes
    (the count is the selector's to decide, so the bar has no total). The bar changes nothing else: the
    wrapper answers for `loss_fn`'s other attributes (a judge's `compensation_report`, which a selector
    calls where it finds it, and which sums over the processes where the judge is sharded)."""
    if loss_fn is None or not progress:
        yield loss_fn
        return

    with tqdm(desc=description, unit="eval", delay=1.0) as bar:  # silent for selectors that measure nothing
        yield _Counted(loss_fn, bar)


class _Counted:
    def __init__(self, loss_fn, bar):
        self.loss_fn, self.bar = loss_fn, bar

    def __call__(self, removed: list[str]) -> float:
        value = self.loss_fn(removed)
        self.bar.update(1)
        return value

    def __getattr__(self, name: str):
        return getattr(self.loss_fn, name)




def device_description(model: nn.Module) -> dict:
    """Where the run computed: the device and dtype, and the device map of a model spread by accelerate."""
    parameter = next(model.parameters())
    where = {"device": str(model_device(model)), "dtype": str(parameter.dtype).removeprefix("torch.")}
    device_map = getattr(model, "hf_device_map", None)
    if device_map and (len(set(device_map.values())) > 1 or is_offloaded(model)):  # spread, or all on disk
        where["device_map"] = {k: str(v) for k, v in device_map.items()}
    return where




def _perplexity(model, windows: torch.Tensor, config: PruneConfig, progress: bool) -> float:
    return perplexity(model, windows, batch_size=config.batch_size, progress=progress)




__all__ = ["PruneResult", "prune_model", "next_token_loss"]
