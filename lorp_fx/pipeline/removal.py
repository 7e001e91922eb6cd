"""The removal step: the loss candidates are judged by, the surgery, and compensation folded only where it helps.

`build_judge` builds the calibration loss that both selection and compensation
answer to (`judge.candidates.CandidateLoss`: compensated when compensation is on).
`remove_and_compensate` removes the plan's layers from the eager model, checks the
result against the fx-pruned graph on one window, and folds the gap maps: the
judge's, only if they do not make its held-out calibration loss worse ("auto"), or
a `Compensator`'s where there is no judge, checked the same way (gap by gap on held-out
sequences, then the set on the loss windows with maps fitted on the other windows).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lorp_fx.arch.anatomy import check_compensable, find_gaps, removed_units, stacks_of
from lorp_fx.arch.surgery import count_layers, remove_layers
from lorp_fx.calibration.batches import (
    one_window_each,
    prepare_batches,
    with_model_defaults,
)
from lorp_fx.compensation.fit import (
    Compensator,
    apply_compensation,
    eager_fits,
    folded_on_trial,
)
from lorp_fx.compensation.guard import keep_harmless_maps, worst_excess
from lorp_fx.core.errors import CalibrationError, CompensationError, describe
from lorp_fx.core.model import causal_lm, encoder_decoder, is_offloaded
from lorp_fx.core.plan import PruningPlan
from lorp_fx.graph.rewrite import prune as prune_graph
from lorp_fx.io.placement import make_resident, streamed_weights
from lorp_fx.judge.candidates import CandidateLoss
from lorp_fx.judge.loss import calibration_loss, next_token_loss
from lorp_fx.pipeline.config import PruneConfig
from lorp_fx.selection.registry import SELECTORS


def compensation_method(config: PruneConfig) -> str | None:
    """The compensation method `config` asks for ("auto" is cosine), or None."""
    method = "cosine" if config.compensate == "auto" else config.compensate
    return None if method == "none" else method


def _judged_compensation_method(model, config: PruneConfig) -> str | None:
    """The compensation the judge measures: `config`'s, unless the family takes none."""
    method = compensation_method(config)
    if method is not None:
        try:
            check_compensable(model)
        except CompensationError:  # "auto" on a family without compensation (an explicit one failed earlier)
            method = None
    return method


def build_judge(model, graph, batches: list[dict], config: PruneConfig, progress: bool = False,
                text=None, window_indices: list[int] | None = None, reduce=None) -> CandidateLoss | None:
    """The calibration loss candidates and the final compensation are judged by: compensated when
    compensation is on and the family takes it, plain otherwise; None where there is nothing to
    judge (no loss-judged selector, no compensation) or no causal-LM loss (encoder-decoders). `text` (the
    `calibrate.CalibrationText` whose windows `batches` hold) names each window's source, for the guard.
    In several processes `batches` holds this process's windows `window_indices` (of `text.windows`) and
    `reduce` sums a tensor over the processes (`CandidateLoss`)."""
    method = _judged_compensation_method(model, config)
    if method is None and not SELECTORS[config.method].judges_by_loss:
        return None
    if not causal_lm(model) or calibration_loss(graph, batches[:1]) is None:
        return None  # no next-token loss to judge by (an encoder-decoder, a masked LM)
    if is_offloaded(model):
        return _offloaded_judge(model, graph, batches, config, method, progress, text)
    try:
        return _judge(graph, batches, config, method, progress, text, window_indices, reduce)
    except CalibrationError:
        return None


def _judge(graph, batches, config: PruneConfig, method, progress, text, window_indices=None, reduce=None, weights=None):
    # "auto" drops a gap's map that does not beat no map on held-out sequences (research/ measured
    # the default this way), then the whole set by the check in `_judged_compensation`; a method
    # named explicitly maps every gap, as `compensate` does.
    return CandidateLoss(graph, batches, loss_windows=config.loss_windows, compensation=method,
                         reject_unhelpful_maps=config.compensate == "auto", progress=progress,
                         sources=None if text is None else text.sources,
                         held_only=() if text is None else text.held_only,
                         window_indices=window_indices, reduce=reduce, weights=weights)


# How far the offloaded judge's dense loss on its first window may be from the eager model's before the skeleton
# graph is taken for another model: float32 roundings of the same computation are orders of magnitude smaller.
SKELETON_AGREEMENT = 1e-3


def _offloaded_judge(model, graph, batches: list[dict], config: PruneConfig, method, progress, text):
    """The judge of a model accelerate offloads: its graph is a meta-device skeleton whose weights are read from
    accelerate's store as the judge's runs need them (`io.placement.streamed_weights`), so candidates are judged
    as with the model in memory, compensated too. Where the skeleton cannot run (a family whose meta-device
    trace takes other kernels) or computes another loss than the eager model on the first loss window, None
    with a note: the selection then measures the eager model's uncompensated loss."""
    try:
        judge = _judge(graph, batches, config, method, progress, text, weights=streamed_weights(model))
    except CalibrationError:
        return None
    except Exception as error:  # noqa: BLE001 - any failure of the skeleton's kernels means: judge eagerly
        print(f"lorp-fx: note: the offloaded model's graph does not run ({describe(error)}); judging eagerly",
              file=sys.stderr)
        return None
    first = judge.loss_batches[0]
    eager = next_token_loss(model, with_model_defaults(model, first))
    traced = judge.window_losses[(frozenset(), False)][0]
    if not abs(traced - eager) <= SKELETON_AGREEMENT * max(1.0, abs(eager)):
        judge.release()
        print(f"lorp-fx: note: the offloaded model's graph gives another loss than the model ({traced:.6f} against "
              f"{eager:.6f} on the first window); judging eagerly", file=sys.stderr)
        return None
    return judge


def judge_state_bytes(model: nn.Module, config: PruneConfig) -> int:
    """What the `build_judge` of `model` and `config` will cache, in bytes (0 where there is none):
    the state entering every layer, and the final one, of each window it keeps (every window
    when it fits maps, the loss windows otherwise; `CandidateLoss`'s checkpoints)."""
    method = _judged_compensation_method(model, config)
    if encoder_decoder(model) or (method is None and not SELECTORS[config.method].judges_by_loss):
        return 0
    # Every window when it fits maps (with the model's own text for the guard: at most own_windows more).
    windows = config.calib_samples + config.own_windows if method is not None else min(config.loss_windows, config.calib_samples)
    width = model.get_input_embeddings().embedding_dim
    element = next(model.parameters()).element_size()
    return (count_layers(model) + 1) * width * element * config.seq_len * windows


def remove_and_compensate(model, graph, plan: PruningPlan, batches: list[dict], config: PruneConfig, progress: bool,
                          judge: CandidateLoss | None = None, text=None, decided: tuple | None = None):
    """(pruned model, fits, old -> new layer names, what compensation did, fx self-check).

    Compensation reads the dense model before the surgery (which may be in place) and
    folds its maps after the fx self-check. `auto` falls back to none, with the reason,
    where the family cannot take a folded map; an explicit method fails instead. With a
    compensating `judge`, the maps are the judge's (fitted on every window) and are folded
    only where they do not make the held-out calibration loss of any source worse; without
    a judge, a `Compensator`'s maps are checked the same way (`_held_out_check`). `text` (the
    `calibrate.CalibrationText` whose windows `batches` hold) names each window's source.
    Without a graph (an offloaded model) there is no fx self-check, and the fold units'
    weights are made resident first so that maps fold into them. `decided`: the judge's
    `decide_maps` where every process made it (a sharded judge sums over the processes).
    """
    if judge is not None and judge.compensation:
        return _judged_compensation(model, graph, plan, batches, config, judge, decided)
    if judge is not None:
        judge.release()  # a plain-loss judge: selection is over
    method = compensation_method(config) or "none"
    compensator, held_out, compensation = None, None, {"method": "none"}
    # One window per forward call: the captured states of every gap point are a window's, not a batch's.
    windows = one_window_each(batches)
    sources = text.sources if text is not None else ["calibration"] * len(windows)
    held_only = text.held_only if text is not None else frozenset()
    main = [i for i, s in enumerate(sources) if s not in held_only]
    guard = [i for i, s in enumerate(sources) if s in held_only]
    loss_rows, fit_rows = main[: config.loss_windows], main[config.loss_windows :]
    several = len(set(sources)) > 1
    pick = lambda rows: [windows[i] for i in rows]  # noqa: E731
    if method != "none":
        try:
            if is_offloaded(model):
                _make_fold_units_resident(model, plan)
            # As the judge: "auto" leaves a gap open where its map does not beat none on the held-out sequences of
            # every source, decided on the other windows, whose maps judge compensation on each source's held-out
            # windows; the maps folded close the same gaps, refitted on every window.
            reject = config.compensate == "auto"
            everything = main + guard
            compensator = Compensator(model, plan, pick(everything), method, progress=progress,
                                      reject_unhelpful=reject and not fit_rows,
                                      sources=[sources[i] for i in everything] if several else None, held_only=held_only)
            held_out = compensator
            if fit_rows:
                checked = fit_rows + guard
                held_out = Compensator(model, plan, pick(checked), method, progress=progress, reject_unhelpful=reject,
                                       sources=[sources[i] for i in checked] if several else None, held_only=held_only)
        except CompensationError as error:
            if config.compensate != "auto":
                raise
            print(f"lorp-fx: note: saved without compensation ({error})", file=sys.stderr)
            compensation = {"method": "none", "skipped": str(error)}
    surgery = remove_layers(model, plan, inplace=config.inplace)
    fx_difference = fx_agreement(graph, plan, surgery.model, batches[0])
    fits = []
    if compensator is not None:
        check_rows = loss_rows + guard
        check = _held_out_check(surgery, held_out, pick(check_rows), [sources[i] for i in check_rows], len(loss_rows))
        fold = check["apply"] or config.compensate != "auto"
        _note_unhelpful(method, check, fold)
        compensator.keep_gaps_of([f for f in held_out.fits if config.compensate != "auto" or f.fold_into in check["kept"]])
        fits = compensator.apply(surgery) if fold else []
        compensation = {
            "method": method if fits else "none", "form": compensator.setup.form, "gaps": [fit.to_dict() for fit in fits],
            "applied": fold, "helps": check["helps"], "requested": method,
            "calibration_loss": {"compensated": check["compensated_loss"], "uncompensated": check["uncompensated_loss"],
                                 "held_out": bool(fit_rows), "windows": len(loss_rows)},
            "sources": check["sources"], "dropped": check["dropped"],
        }
        compensation["summary"] = compensation_summary(compensation)
    return surgery.model, fits, surgery.names, compensation, fx_difference


@torch.no_grad()
def _held_out_check(surgery, held_out: Compensator, windows: list[dict], sources: list[str], loss_count: int) -> dict:
    """The pruned model's next-token loss on `windows` (the loss windows, then the guard's) without maps and
    with `held_out`'s maps (fitted on the other windows) folded in on trial, on the loss windows and per
    source; the maps of the gaps `compensation.guard` keeps (no source's loss above its plain loss)."""
    model = surgery.model
    calls = prepare_batches(model, windows)
    fits = {fit.fold_into: fit for fit in held_out.fits}

    def losses() -> list[float]:
        return [next_token_loss(model, call) for call in calls]

    def by_source(values: list[float]) -> dict[str, float]:
        return {s: sum(v for v, t in zip(values, sources) if t == s) / sources.count(s) for s in dict.fromkeys(sources)}

    def measure(gaps: list[str]) -> dict[str, float]:
        with folded_on_trial(surgery, [fits[g] for g in gaps]):
            return by_source(losses())

    plain_windows = losses()
    with folded_on_trial(surgery, list(fits.values())):
        every_windows = losses()
    plain, every = by_source(plain_windows), by_source(every_windows)
    kept, folded, dropped = keep_harmless_maps(list(fits), measure, plain) if worst_excess(every, plain) > 0 else (
        list(fits), every, [])
    return {"compensated_loss": sum(every_windows[:loss_count]) / loss_count,
            "uncompensated_loss": sum(plain_windows[:loss_count]) / loss_count,
            "apply": bool(kept) or not fits, "helps": worst_excess(every, plain) <= 0, "kept": kept, "dropped": dropped,
            "sources": {s: {"windows": sources.count(s), "uncompensated": plain[s], "compensated": every[s],
                            "folded": folded[s]} for s in plain}}


def _note_unhelpful(method: str, check: dict, fold: bool) -> None:
    """Say on stderr where the held-out maps make a loss worse, and what was done about it."""
    if check.get("helps", check["apply"]):
        return
    sources = check.get("sources") or {}
    hurt = [f"{s} {v['compensated']:.4f} > {v['uncompensated']:.4f}" for s, v in sources.items()
            if v["compensated"] > v["uncompensated"]]
    where = (f"the held-out loss of {'; '.join(hurt)}" if len(sources) > 1 and hurt else
             f"the calibration loss ({check['compensated_loss']:.4f} > {check['uncompensated_loss']:.4f})")
    if fold and check["apply"] and check.get("dropped"):
        done = "; the maps of " + ", ".join(d["gap"] for d in check["dropped"]) + " are not folded"
    else:
        done = "; folded anyway, as --compensate asked" if fold else "; saved without it"
    print(f"lorp-fx: note: {method} compensation makes {where}{done}", file=sys.stderr)


def decide_maps(plan: PruningPlan, compensate: str, judge: CandidateLoss) -> tuple[dict, list, bool]:
    """(the judge's check of compensating `plan`, the maps to fold, whether to fold them). With `compensate`
    "auto" they are folded only if they do not make the held-out calibration loss worse; an explicitly named
    method is folded anyway. A sharded judge sums over the processes here: every process calls it."""
    check = judge.compensation_report(plan.remove)
    fold = check["apply"] or compensate != "auto"
    keep = check["kept"] if compensate == "auto" else None  # the gaps the guard across sources kept
    return check, judge.final_fits(plan.remove, keep=keep) if fold else [], fold


def _judged_compensation(model, graph, plan: PruningPlan, batches: list[dict], config: PruneConfig, judge: CandidateLoss,
                         decided: tuple | None = None):
    """`remove_and_compensate` with the judge's maps (`decide_maps`)."""
    check, fitted, fold = decided if decided is not None else decide_maps(plan, config.compensate, judge)
    _note_unhelpful(judge.compensation, check, fold)
    fits = eager_fits(model, fitted) if fitted else []  # names from the dense model
    judge.release()  # its states are the largest thing held; the surgery, self-check and save come next
    if fits and is_offloaded(model):
        _make_fold_units_resident(model, plan)
    surgery = remove_layers(model, plan, inplace=config.inplace)
    fx_difference = fx_agreement(graph, plan, surgery.model, batches[0])
    apply_compensation(surgery, plan.remove, fits)
    compensation = {
        "method": judge.compensation if fits else "none", "form": judge.form, "gaps": [fit.to_dict() for fit in fits],
        "applied": fold, "helps": check["apply"], "requested": judge.compensation,
        "calibration_loss": {"compensated": check["compensated_loss"], "uncompensated": check["uncompensated_loss"],
                             "held_out": check["held_out"], "windows": judge.loss_windows},
        "gaps_without_map": check["gaps_without_map"], "sources": check["sources"], "dropped": check["dropped"],
    }
    compensation["summary"] = compensation_summary(compensation)
    return surgery.model, fits, surgery.names, compensation, fx_difference


def compensation_summary(block: dict) -> str:
    """report.json's compensation block in one sentence: what was fitted, what was folded, and why not.
    ("applied" is the decision to fold the maps that survived the per-gap checks; "gaps" are those folded.)"""
    requested, gaps = block.get("requested"), block.get("gaps") or []
    dropped = [d["gap"] for d in block.get("dropped") or []]
    without = [" .. ".join(g) if isinstance(g, list) else str(g) for g in block.get("gaps_without_map") or []]
    loss = block.get("calibration_loss") or {}
    if gaps:
        said = f"{block['method']} maps folded into {len(gaps)} gap{'s' if len(gaps) != 1 else ''} ({', '.join(g['fold_into'] for g in gaps)})"
    elif block.get("applied") is False:
        return (f"no map folded: the {requested} maps made the held-out calibration loss worse "
                f"({loss.get('compensated', float('nan')):.4f} against {loss.get('uncompensated', float('nan')):.4f} "
                "without them)")
    else:
        said = f"no map folded: no {requested} map beat leaving its gap open"
    if dropped:
        said += f"; dropped for hurting a calibration source: {', '.join(dropped)}"
    if without:
        said += f"; gaps no map helped on held-out windows: {', '.join(without)}"
    return said


@torch.no_grad()
def fx_agreement(graph, plan: PruningPlan, pruned: nn.Module, batch: dict) -> float | None:
    """Max |logits| difference between the fx-pruned graph and the eager surgery on one window (a self-check)."""
    if plan.granularity != "layer" or graph is None:
        return None
    one = {k: v[:1] for k, v in batch.items()}
    difference = prune_graph(graph, plan)(**one).logits
    eager_logits = pruned(**one, use_cache=False).logits
    return float(difference.sub_(eager_logits).abs_().max())  # in place: two logit tensors held, not four


def _make_fold_units_resident(model, plan: PruningPlan) -> None:
    stacks = stacks_of(model)
    for gap in find_gaps(stacks, removed_units(stacks, list(plan.remove))):
        make_resident(gap.fold_unit.module)
        if gap.fold_unit.branch_norm is not None:  # Gemma: the per-channel map folds into the norm after the branch
            make_resident(gap.fold_unit.branch_norm)
