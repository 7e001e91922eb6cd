"""`prune_model`: the whole pipeline in one call, one function a step.

    result = lorp_fx.prune_model(model, windows, lorp_fx.PruneConfig(remove=6), tokenizer=tokenizer)
    result.save("pruned/", tokenizer)

Steps: check everything first -> calibration windows (given, read from files, or
sampled from the model) -> residual-stream statistics on the traced graph ->
selection (loss-judged methods measure candidates on the first `loss_windows`
windows; with compensation on, by the loss of the *compensated* model, its maps
fitted on the other windows: `candidate_loss.CandidateLoss`) -> layer surgery with
compensation, applied only where it does not make that held-out calibration loss
worse -> report. The command line is a thin shell over this.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .batches import token_batches
from .budget import check_budget
from .candidate_loss import CandidateLoss, eager_fits
from .compensation import CompensationError, Compensator, GapFit, apply_compensation, check_compensable
from .config import PruneConfig
from .errors import CalibrationError, ConfigError, InputMismatchError
from .loss import calibration_loss, next_token_loss
from .observe import collect_statistics
from .output import save_pretrained_atomic
from .plan import PruningPlan
from .rewrite import prune as prune_graph
from .selectors import SELECTORS, options_for, select
from .stats import LayerStatistics
from .surgery import Surgery, count_layers, count_parameters, remove_layers

Calibration = torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike] | None


@dataclass
class PruneResult:
    """What `prune_model` returns: the pruned model and everything that explains it."""

    model: nn.Module
    plan: PruningPlan
    fits: list[GapFit]
    timings: dict[str, float]
    report: dict
    names: dict[str, str] = field(default_factory=dict)  # kept layers: old name -> new name
    graph: torch.fx.GraphModule | None = field(default=None, repr=False)  # the traced dense graph (shares the weights)
    gguf: object | None = field(default=None, repr=False)  # the GGUFSource the model was read from, if any

    def folded_parameters(self) -> list[str]:
        """The pruned model's parameters that compensation changed."""
        return [Surgery(self.model, self.names).rename(p) for fit in self.fits for p in fit.projections]

    def save(self, out_dir: str | os.PathLike, tokenizer=None, *, overwrite: bool = False, extra_files: dict | None = None,
             gguf_requantize: str | None = "original") -> Path:
        """The checkpoint with report.json, plan.json and the heatmap, atomically (complete or not at all).

        A model read from a GGUF file is also written as a pruned GGUF file of the same
        name, streamed, unless `gguf_requantize` is None (see `gguf_output.writer`).
        """
        files: dict = {}
        if self.gguf is not None and gguf_requantize is not None:
            from .gguf_output import writer

            self.report["gguf"] = {}
            files[self.gguf.path.name] = writer(self.gguf, self.plan, self.model, self.folded_parameters(),
                                                gguf_requantize, self.report["gguf"])
        # report.json is written after the GGUF file, whose writer adds to the report.
        files["report.json"] = lambda path: path.write_text(json.dumps(self.report, indent=1), encoding="utf-8")
        files["plan.json"] = self.plan.to_json()
        files.update(heatmap_file(self.plan))
        files.update(extra_files or {})
        return save_pretrained_atomic(self.model, tokenizer, out_dir, extra_files=files, overwrite=overwrite)


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
    * `gguf`: the `GGUFSource` the model was read from (`gguf_output.open_source`); the
      removal is then checked against the GGUF runtime's layer rules right after
      selection, and `PruneResult.save` also writes a pruned GGUF file.
    * The model is pruned in place with `config.inplace`, else a copy is.
    """
    check_model(model, config, calibration, tokenizer, evaluation)
    clock = Stopwatch()
    with clock("calibration_text"):
        windows, source = calibration_windows(model, calibration, config, tokenizer, progress)
    batches = token_batches(windows, config.batch_size, encoder_decoder(model))
    with clock("statistics"):
        stats, graph = collect_statistics(model, batches, granularity=config.granularity, progress=progress)
    with clock("selection"):
        judge = candidate_judge(model, graph, batches, config)
        plan = select_blocks(stats, graph, batches[: loss_batch_count(config)], config, progress, judge)
    if gguf is not None:
        from .gguf_output import check_removal

        check_removal(gguf, plan)  # before compensation and saving, not after
    before = {}
    if evaluation is not None:
        with clock("evaluation"):
            before = {"ppl_before": _perplexity(model, evaluation, config, progress)}
    parameters_before, layers_before = count_parameters(model), count_layers(model)
    with clock("compensation"):
        pruned, fits, names, compensation, fx_difference = remove_and_compensate(model, graph, plan, batches, config, progress, judge)
    if evaluation is not None:
        with clock("evaluation"):
            before["ppl_after"] = _perplexity(pruned, evaluation, config, progress)
            before["tokens"] = int(evaluation.numel())
    report = {
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
        "calibration": {"source": source, "tokens": stats.token_count, "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])},
        "compensation": compensation,
        "evaluation": before or None,
        "fx_graph_max_abs_logit_difference": fx_difference,
        "timings": clock.rounded(),
        "config": config.to_dict(),
    }
    return PruneResult(pruned, plan, fits, clock.seconds, report, names, graph, gguf)


# --------------------------------------------------------------------------- checks


def check_model(model: nn.Module, config: PruneConfig, calibration: Calibration, tokenizer, evaluation) -> None:
    """Everything that can be checked before any work: budget, compensation, calibration source, evaluation."""
    if config.granularity == "layer":
        check_budget(count_layers(model), config.remove if config.remove is not None else 1, what="layers")
    if config.compensate not in ("auto", "none"):
        check_compensable(model)  # an explicit method the family cannot take fails now, not after calibration
    is_text = isinstance(calibration, (str, os.PathLike)) or (
        isinstance(calibration, Sequence) and not isinstance(calibration, torch.Tensor)
    )
    if (calibration is None or is_text) and tokenizer is None:
        raise ConfigError("reading calibration text or sampling it from the model needs the model's tokenizer: pass tokenizer=")
    if calibration is None and encoder_decoder(model):
        raise ConfigError("self-calibration samples from a causal LM; give an encoder-decoder calibration text")
    if isinstance(calibration, torch.Tensor):
        _check_windows(model, calibration, "calibration")
    if evaluation is not None:
        if encoder_decoder(model):
            raise ConfigError("evaluation measures causal-LM perplexity; it does not apply to encoder-decoder models")
        _check_windows(model, evaluation, "evaluation")
    _check_positions(model, calibration.shape[1] if isinstance(calibration, torch.Tensor) else config.seq_len, "calibration")
    if evaluation is not None:
        _check_positions(model, evaluation.shape[1], "evaluation")
    if SELECTORS[config.method].required and "loss_fn" in SELECTORS[config.method].required and encoder_decoder(model):
        raise ConfigError(f"method {config.method!r} judges candidates by causal-LM loss, which an encoder-decoder has not; choose a statistics method")


def _check_positions(model: nn.Module, length: int, what: str) -> None:
    """Windows longer than the position embeddings cover fail inside the model (GPT-2) or quietly leave the
    trained range (RoPE): refused, as the command line does before the weights load."""
    from .models import max_positions

    positions = max_positions(getattr(model, "config", None))
    if positions is not None and length > positions:
        raise ConfigError(f"{what} windows of {length} tokens are longer than the model's {positions} positions "
                          f"(max_position_embeddings); use windows of at most {positions} tokens")


def _check_windows(model: nn.Module, windows: torch.Tensor, what: str) -> None:
    if windows.dtype not in (torch.int64, torch.int32) or windows.dim() != 2 or windows.shape[1] < 2:
        raise InputMismatchError(f"{what} windows must be a (n, seq_len >= 2) tensor of token ids, got {windows.dtype} {tuple(windows.shape)}")
    check_vocabulary(model, windows)


def check_vocabulary(model: nn.Module, windows: torch.Tensor) -> None:
    vocabulary = model.get_input_embeddings().num_embeddings
    if windows.numel() and (int(windows.max()) >= vocabulary or int(windows.min()) < 0):
        raise InputMismatchError(
            f"the tokenizer produces token id {int(windows.max())} but the model has {vocabulary} embeddings: "
            "tokenizer and model do not match"
        )


def encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


# --------------------------------------------------------------------------- steps


def calibration_windows(model, calibration: Calibration, config: PruneConfig, tokenizer, progress: bool) -> tuple[torch.Tensor, str]:
    """(windows, a phrase naming where they came from)."""
    from .data import self_calibration, text_windows

    if isinstance(calibration, torch.Tensor):
        windows, source = calibration, f"given token windows {tuple(calibration.shape)}"
    elif calibration is None:
        windows = self_calibration(model, tokenizer, config.calib_samples, config.seq_len, seed=config.seed, progress=progress)
        source = f"self-generated by the model (seed {config.seed}, temperature 1.0, top-p 0.95)"
    else:
        paths = [calibration] if isinstance(calibration, (str, os.PathLike)) else list(calibration)
        windows = text_windows(tokenizer, paths, config.calib_samples, config.seq_len)
        source = "files: " + ", ".join(str(p) for p in paths)
    check_vocabulary(model, windows)
    return windows, source


def loss_batch_count(config: PruneConfig) -> int:
    """Batches holding the first `loss_windows` windows (SLEB's 8 x 256 tokens by default)."""
    return max(1, -(-config.loss_windows // config.batch_size))


def compensation_method(config: PruneConfig) -> str | None:
    """The compensation method `config` asks for ("auto" is cosine), or None."""
    method = "cosine" if config.compensate == "auto" else config.compensate
    return None if method == "none" else method


def candidate_judge(model, graph, batches: list[dict], config: PruneConfig) -> CandidateLoss | None:
    """The calibration loss candidates and the final compensation are judged by: compensated when
    compensation is on and the family takes it, plain otherwise; None where there is nothing to
    judge (no loss-judged selector, no compensation) or no causal-LM loss (encoder-decoders)."""
    method = compensation_method(config)
    if method is not None:
        try:
            check_compensable(model)
        except CompensationError:  # "auto" on a family without compensation (an explicit one failed earlier)
            method = None
    if method is None and not SELECTORS[config.method].judges_by_loss:
        return None
    if calibration_loss(graph, batches[:1]) is None:
        return None
    try:
        # "auto" drops a gap's map that does not beat no map on held-out sequences (research/ measured
        # the default this way), then the whole set by the check in `_judged_compensation`; a method
        # named explicitly maps every gap, as `compensate` does.
        return CandidateLoss(graph, batches, loss_windows=config.loss_windows, compensation=method,
                             reject_unhelpful_maps=config.compensate == "auto")
    except CalibrationError:
        return None


def select_blocks(stats: LayerStatistics, graph, loss_batches: list[dict], config: PruneConfig, progress: bool,
                  judge: CandidateLoss | None = None) -> PruningPlan:
    """Run the configured selector, giving loss-judged methods a calibration-loss function (`judge`
    where given, else the plain calibration loss) with a progress bar."""
    options = {**config.selector_options, **options_for(config.method, seed=config.seed)}
    if SELECTORS[config.method].judges_by_loss:
        loss_fn = judge if judge is not None else calibration_loss(graph, loss_batches)
        if loss_fn is not None:
            options["loss_fn"] = loss_fn
    with counted(options.get("loss_fn"), f"{config.method}: calibration-loss measurements", progress) as loss_fn:
        if loss_fn is not None:
            options["loss_fn"] = loss_fn
        return select(stats, config.remove, ratio=config.ratio, method=config.method, **options)


@contextlib.contextmanager
def counted(loss_fn, description: str, progress: bool):
    """`loss_fn` with a progress bar of the measurements a loss-judged selector makes
    (the count is the selector's to decide, so the bar has no total)."""
    if loss_fn is None or not progress:
        yield loss_fn
        return
    from tqdm.auto import tqdm

    with tqdm(desc=description, unit="eval", delay=1.0) as bar:  # silent for selectors that measure nothing
        def counted_loss(removed: list[str]) -> float:
            value = loss_fn(removed)
            bar.update(1)
            return value

        yield counted_loss


@torch.no_grad()
def fx_agreement(graph, plan: PruningPlan, pruned: nn.Module, batch: dict) -> float | None:
    """Max |logits| difference between the fx-pruned graph and the eager surgery on one window (a self-check)."""
    if plan.granularity != "layer":
        return None
    one = {k: v[:1] for k, v in batch.items()}
    graph_logits = prune_graph(graph, plan)(**one).logits
    eager_logits = pruned(**one, use_cache=False).logits
    return float((graph_logits - eager_logits).abs().max())


def remove_and_compensate(model, graph, plan: PruningPlan, batches: list[dict], config: PruneConfig, progress: bool,
                          judge: CandidateLoss | None = None):
    """(pruned model, fits, old -> new layer names, what compensation did, fx self-check).

    Compensation reads the dense model before the surgery (which may be in place) and
    folds its maps after the fx self-check. `auto` falls back to none, with the reason,
    where the family cannot take a folded map; an explicit method fails instead. With a
    compensating `judge`, the maps are the judge's (fitted on every window) and are folded
    only if the held-out compensated calibration loss is not worse than the plain one.
    """
    if judge is not None and judge.compensation:
        return _judged_compensation(model, graph, plan, batches, config, judge)
    method = compensation_method(config) or "none"
    compensator, compensation = None, {"method": "none"}
    if method != "none":
        try:
            compensator = Compensator(model, plan, batches, method, progress=progress)
        except CompensationError as error:
            if config.compensate != "auto":
                raise
            print(f"lorp-fx: note: saved without compensation ({error})", file=sys.stderr)
            compensation = {"method": "none", "skipped": str(error)}
    surgery = remove_layers(model, plan, inplace=config.inplace)
    fx_difference = fx_agreement(graph, plan, surgery.model, batches[0])
    fits = compensator.apply(surgery) if compensator is not None else []
    if compensator is not None:
        compensation = {"method": method, "form": compensator.setup.form, "gaps": [fit.to_dict() for fit in fits]}
    return surgery.model, fits, surgery.names, compensation, fx_difference


def _judged_compensation(model, graph, plan: PruningPlan, batches: list[dict], config: PruneConfig, judge: CandidateLoss):
    """`remove_and_compensate` with the judge's maps. With "auto" they are folded only if they do not
    make the held-out calibration loss worse; an explicitly named method is folded anyway, with a note."""
    check = judge.compensation_report(plan.remove)
    fold = check["apply"] or config.compensate != "auto"
    if not check["apply"]:
        print(f"lorp-fx: note: {judge.compensation} compensation makes the calibration loss worse "
              f"({check['compensated_loss']:.4f} > {check['uncompensated_loss']:.4f})"
              + ("; folded anyway, as --compensate asked" if fold else "; saved without it"), file=sys.stderr)
    fits = eager_fits(model, judge.final_fits(plan.remove)) if fold else []  # names from the dense model
    surgery = remove_layers(model, plan, inplace=config.inplace)
    fx_difference = fx_agreement(graph, plan, surgery.model, batches[0])
    apply_compensation(surgery, plan.remove, fits)
    compensation = {
        "method": judge.compensation if fits else "none", "form": judge.form, "gaps": [fit.to_dict() for fit in fits],
        "applied": fold, "helps": check["apply"], "requested": judge.compensation,
        "calibration_loss": {"compensated": check["compensated_loss"], "uncompensated": check["uncompensated_loss"],
                             "held_out": check["held_out"], "windows": judge.loss_windows},
        "gaps_without_map": check["gaps_without_map"],
    }
    return surgery.model, fits, surgery.names, compensation, fx_difference


def _perplexity(model, windows: torch.Tensor, config: PruneConfig, progress: bool) -> float:
    from .evaluate import perplexity

    return perplexity(model, windows, batch_size=config.batch_size, progress=progress)


def heatmap_file(plan: PruningPlan) -> dict[str, bytes]:
    """{"similarity.png": PNG bytes}, or {} with a note where matplotlib is missing."""
    from .errors import LoRPError
    from .plot import similarity_heatmap

    try:
        return {"similarity.png": similarity_heatmap(plan)}
    except LoRPError as error:  # matplotlib is an extra: say so, keep going
        print(f"lorp-fx: note: no heatmap ({error})", file=sys.stderr)
        return {}


class Stopwatch:
    """Seconds spent per named step (a step timed twice adds up)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"{step}_s"] = self.seconds.get(f"{step}_s", 0.0) + time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}


__all__ = ["PruneResult", "prune_model", "next_token_loss"]
