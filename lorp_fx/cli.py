"""`lorp-fx`: prune, analyze and evaluate models from the command line.

    lorp-fx prune   --remove 6 --out pruned/          # the embedded SmolLM2-135M, self-calibrated
    lorp-fx analyze --calib-file valid.txt --out analysis/
    lorp-fx eval    --model pruned/ --eval-file test.txt

Every failure the user can fix prints one line and exits with status 2; nothing is
half written (output directories appear complete or not at all).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from .compensate import METHODS as COMPENSATION_METHODS
from .compensate import CompensationError, apply_compensation, check_compensable, fit_compensation
from .errors import BudgetError, InputMismatchError, LoRPError
from .export import check_output_dir, count_parameters, layer_containers, remove_layers, save_pretrained_atomic
from .models import DEFAULT_MODEL, load_model
from .observe import calibration_loss, collect_statistics
from .plan import PruningPlan
from .rewrite import prune as prune_graph
from .selectors import DEFAULT_METHOD, SELECTORS, budget_from_ratio, select
from .selectors.lorp_paper import clusters_for_rls, relative_layer_similarity
from .selectors.spectral import spectral_clustering
from .stats import LayerStatistics

# SLEB's protocol (REFERENCE.md): 8 x 256 calibration tokens judge each candidate.
LOSS_WINDOWS = 8


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except LoRPError as error:
        print(f"lorp-fx: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorp-fx: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line, not a stack trace from deep inside torch
        if args.debug:
            raise
        print(f"lorp-fx: error: {type(error).__name__}: {_first_line(error)} (rerun with --debug for details)", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorp-fx", description="Training-free depth pruning of language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", help="choose and remove redundant layers, save a smaller checkpoint")
    _model_arguments(prune)
    budget = prune.add_mutually_exclusive_group(required=True)
    budget.add_argument("--remove", type=int, metavar="K", help="number of blocks to remove")
    budget.add_argument("--ratio", type=float, metavar="R", help="fraction of the blocks to remove")
    prune.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(SELECTORS), help=f"selector (default {DEFAULT_METHOD})")
    prune.add_argument("--granularity", default="layer", choices=["layer", "sublayer"])
    prune.add_argument(
        "--compensate", default="auto", choices=["auto", "none", *COMPENSATION_METHODS],
        help="fold a fitted linear map into the layer before each gap (docs/compensation.md); "
             "auto (default): cosine where the family allows it, else none",
    )
    _calibration_arguments(prune)
    prune.add_argument("--eval-file", type=Path, help="text to measure perplexity on, before and after")
    prune.add_argument("--eval-samples", type=int, default=40)
    prune.add_argument("--eval-seq-len", type=int, default=512)
    prune.add_argument("--out", type=Path, required=True, help="output directory (a transformers checkpoint)")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    prune.set_defaults(run=run_prune)

    analyze = commands.add_parser("analyze", help="statistics, RLS, clusters and heatmap; removes nothing")
    _model_arguments(analyze)
    _calibration_arguments(analyze)
    analyze.add_argument("--granularity", default="layer", choices=["layer", "sublayer"])
    analyze.add_argument("--out", type=Path, required=True)
    analyze.add_argument("--overwrite", action="store_true")
    analyze.set_defaults(run=run_analyze)

    evaluate = commands.add_parser("eval", help="perplexity of a model or a pruned checkpoint")
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help=f"directory, .gguf, hub id or {DEFAULT_MODEL}")
    evaluate.add_argument("--eval-file", type=Path, required=True, nargs="+")
    evaluate.add_argument("--eval-samples", type=int, default=40)
    evaluate.add_argument("--eval-seq-len", type=int, default=512)
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.set_defaults(run=run_eval)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_MODEL,
        help=f"a transformers directory, a .gguf file, a hub id, or {DEFAULT_MODEL} (default: the embedded GGUF)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0, help="for self-calibration and the random selector")
    parser.add_argument("--batch-size", type=int, default=4)


def _calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calib-file", type=Path, nargs="+",
        help="calibration text (default: text the model generates itself from a fixed seed)",
    )
    parser.add_argument("--calib-samples", type=int, default=32, help="number of windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")


# --------------------------------------------------------------------------- commands


def run_prune(args: argparse.Namespace) -> int:
    check_output_dir(args.out, args.overwrite)  # fail before the long work, not after
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    timings["load_s"] = time.perf_counter() - clock
    n_layers = sum(len(layers) for _, layers in layer_containers(model))
    _check_budget(args, n_layers)
    if args.eval_file and _is_encoder_decoder(model):
        raise LoRPError("--eval-file measures causal-LM perplexity; it does not apply to encoder-decoder models")
    if args.compensate not in ("auto", "none"):
        check_compensable(model)  # an explicit method the family cannot take fails now, not after calibration

    clock = time.perf_counter()
    windows, source = _calibration_windows(args, model, tokenizer)
    timings["calibration_text_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    batches = _batches(windows, args.batch_size, model)
    stats, graph = collect_statistics(model, batches, granularity=args.granularity)
    timings["statistics_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    loss_fn = calibration_loss(graph, _batches(windows[:LOSS_WINDOWS], args.batch_size, model))
    with _counted(loss_fn, f"{args.method}: calibration-loss measurements") as counted_loss:
        plan = select(stats, args.remove, ratio=args.ratio, method=args.method, seed=args.seed, loss_fn=counted_loss)
    timings["selection_s"] = time.perf_counter() - clock

    pruned = remove_layers(model, plan)
    fx_difference = _fx_agreement(graph, plan, pruned, batches[0])
    clock = time.perf_counter()
    pruned, compensation = _compensate(args, model, plan, batches, pruned)
    timings["compensation_s"] = time.perf_counter() - clock
    evaluation = {}
    if args.eval_file:
        clock = time.perf_counter()
        evaluation = _evaluate_pair(args, tokenizer, model, pruned)
        timings["evaluation_s"] = time.perf_counter() - clock

    report = _report(args, plan, stats, source, model, pruned, n_layers, evaluation, timings, fx_difference)
    report["compensation"] = compensation
    files = {"report.json": json.dumps(report, indent=1), "plan.json": plan.to_json()}
    files.update(_heatmap(plan))
    save_pretrained_atomic(pruned, tokenizer, args.out, extra_files=files, overwrite=args.overwrite)
    _print_summary(report, args.out)
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    check_output_dir(args.out, args.overwrite)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    windows, source = _calibration_windows(args, model, tokenizer)
    stats, _ = collect_statistics(model, _batches(windows, args.batch_size, model), granularity=args.granularity)
    s_inputs = stats.input_similarity()
    rls = relative_layer_similarity(s_inputs)
    k = min(clusters_for_rls(rls), stats.n_blocks)
    labels = spectral_clustering(s_inputs, k)
    clusters = [[stats.blocks[i] for i in range(stats.n_blocks) if labels[i] == c] for c in sorted(set(labels))]
    influence = stats.block_influence()
    plan = PruningPlan(
        remove=[], method="analyze", granularity=args.granularity, rls=rls, clusters=clusters, statistics=stats,
        scores={b: float(v) for b, v in zip(stats.blocks, influence)},
    )
    report = {
        "model": str(args.model), "calibration": {"source": source, "tokens": stats.token_count},
        "rls": rls, "clusters": clusters, "block_influence": plan.scores, "points": stats.points,
        "similarity": stats.similarity.tolist(),
    }
    files = {"report.json": json.dumps(report, indent=1), "statistics.json": json.dumps(stats.to_dict())}
    files.update(_heatmap(plan))
    save_pretrained_atomic(None, None, args.out, extra_files=files, overwrite=args.overwrite)
    print(f"RLS {rls:.3f} -> {len(clusters)} clusters: " + "; ".join(_span(c) for c in clusters))
    lowest = sorted(plan.scores, key=plan.scores.get)[:5]
    print("lowest Block Influence: " + ", ".join(f"{b} ({plan.scores[b]:.3f})" for b in lowest))
    print(f"written to {args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .data import text_windows
    from .evaluate import perplexity

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    windows = text_windows(tokenizer, args.eval_file, args.eval_samples, args.eval_seq_len)
    ppl = perplexity(model, windows, batch_size=args.batch_size)
    layers = sum(len(layers) for _, layers in layer_containers(model))
    print(f"{args.model}: {layers} layers, {count_parameters(model):,} parameters, "
          f"perplexity {ppl:.2f} on {windows.numel():,} tokens")
    return 0


# --------------------------------------------------------------------------- helpers


def _check_budget(args: argparse.Namespace, n_layers: int) -> None:
    if args.granularity == "sublayer":
        return  # sublayers: the selector checks against the blocks it sees
    k = args.remove if args.remove is not None else budget_from_ratio(n_layers, args.ratio)
    if k < 1 or n_layers - k < 2:
        raise BudgetError(f"cannot remove {k} of {n_layers} layers: at least 1 must go and at least 2 must stay")


def _calibration_windows(args: argparse.Namespace, model, tokenizer) -> tuple[torch.Tensor, str]:
    from .data import self_calibration, text_windows

    if args.calib_file:
        windows = text_windows(tokenizer, args.calib_file, args.calib_samples, args.seq_len)
        source = "files: " + ", ".join(str(p) for p in args.calib_file)
    elif _is_encoder_decoder(model):
        raise LoRPError("self-calibration samples from a causal LM; give an encoder-decoder text with --calib-file")
    else:
        windows = self_calibration(model, tokenizer, args.calib_samples, args.seq_len, seed=args.seed)
        source = f"self-generated by the model (seed {args.seed}, temperature 1.0, top-p 0.95)"
    vocabulary = model.get_input_embeddings().num_embeddings
    if int(windows.max()) >= vocabulary:
        raise InputMismatchError(
            f"the tokenizer produces token id {int(windows.max())} but the model has {vocabulary} embeddings: "
            "tokenizer and model do not match"
        )
    return windows, source


def _batches(windows: torch.Tensor, batch_size: int, model) -> list[dict]:
    """Keyword batches; an encoder-decoder reads the same text on both sides (teacher forcing)."""
    batches = []
    for chunk in windows.split(max(1, batch_size)):
        batch = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        if _is_encoder_decoder(model):
            batch["decoder_input_ids"] = chunk
        batches.append(batch)
    return batches


@contextlib.contextmanager
def _counted(loss_fn, description: str):
    """`loss_fn` with a progress bar of the measurements a loss-judged selector makes
    (the count is the selector's to decide, so the bar has no total)."""
    if loss_fn is None:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(desc=description, unit="eval", delay=1.0) as bar:  # silent for selectors that measure nothing
        def counted(removed: list[str]) -> float:
            value = loss_fn(removed)
            bar.update(1)
            return value

        yield counted


def _compensate(args: argparse.Namespace, model, plan: PruningPlan, batches: list[dict], pruned):
    """(model to save, what compensation did), folding into `pruned` in place. `auto` falls
    back to none, with the reason, where the family cannot take a folded map; an explicit
    method fails instead."""
    method = "cosine" if args.compensate == "auto" else args.compensate
    if method == "none":
        return pruned, {"method": "none"}
    try:
        fits = fit_compensation(model, plan, batches, method, progress=True)
    except CompensationError as error:
        if args.compensate != "auto":
            raise
        print(f"lorp-fx: note: saved without compensation ({error})", file=sys.stderr)
        return pruned, {"method": "none", "skipped": str(error)}
    # Fold into the pruned copy we already have rather than let `compensate` make another.
    return apply_compensation(pruned, plan, fits), {"method": method, "gaps": [fit.to_dict() for fit in fits]}


def _is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


@torch.no_grad()
def _fx_agreement(graph, plan: PruningPlan, pruned, batch: dict) -> float | None:
    """Max |logits| difference between the fx-pruned graph and the saved eager model (a self-check)."""
    if plan.granularity != "layer":
        return None
    graph_logits = prune_graph(graph, plan)(**{k: v[:1] for k, v in batch.items()}).logits
    eager_logits = pruned(**{k: v[:1] for k, v in batch.items()}, use_cache=False).logits
    return float((graph_logits - eager_logits).abs().max())


def _evaluate_pair(args: argparse.Namespace, tokenizer, dense, pruned) -> dict:
    from .data import text_windows
    from .evaluate import perplexity

    windows = text_windows(tokenizer, [args.eval_file], args.eval_samples, args.eval_seq_len)
    return {
        "file": str(args.eval_file), "tokens": int(windows.numel()),
        "ppl_before": perplexity(dense, windows, batch_size=args.batch_size),
        "ppl_after": perplexity(pruned, windows, batch_size=args.batch_size),
    }


def _report(args, plan, stats: LayerStatistics, source, model, pruned, n_layers, evaluation, timings, fx_difference) -> dict:
    return {
        "model": str(args.model),
        "method": plan.method,
        "granularity": plan.granularity,
        "removed": plan.remove,
        "layers_before": n_layers,
        "layers_after": sum(len(layers) for _, layers in layer_containers(pruned)),
        "parameters_before": count_parameters(model),
        "parameters_after": count_parameters(pruned),
        "rls": plan.rls,
        "clusters": plan.clusters,
        "scores": plan.scores,
        "points": stats.points,
        "similarity": stats.similarity.tolist(),
        "calibration": {"source": source, "tokens": stats.token_count, "windows": args.calib_samples, "seq_len": args.seq_len},
        "evaluation": evaluation or None,
        "fx_graph_max_abs_logit_difference": fx_difference,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "seed": args.seed,
        "dtype": args.dtype,
    }


def _heatmap(plan: PruningPlan) -> dict[str, bytes]:
    from .plot import similarity_heatmap

    try:
        return {"similarity.png": similarity_heatmap(plan)}
    except LoRPError as error:  # matplotlib is an extra: say so, keep going
        print(f"lorp-fx: note: no heatmap ({error})", file=sys.stderr)
        return {}


def _print_summary(report: dict, out: Path) -> None:
    rows = [
        ("method", f"{report['method']} ({report['granularity']})"),
        ("layers", f"{report['layers_before']} -> {report['layers_after']}"),
        ("parameters", f"{report['parameters_before']:,} -> {report['parameters_after']:,} "
                       f"({1 - report['parameters_after'] / report['parameters_before']:.1%} fewer)"),
        ("removed", ", ".join(report["removed"])),
    ]
    if report["rls"] is not None:
        rows.append(("RLS", f"{report['rls']:.3f}"))
    if report["clusters"]:
        rows.append(("clusters", "; ".join(_span(c) for c in report["clusters"])))
    rows.append(("calibration", f"{report['calibration']['tokens']:,} tokens, {report['calibration']['source']}"))
    compensation = report.get("compensation") or {"method": "none"}
    if compensation.get("gaps"):
        rows.append(("compensation", f"{compensation['method']}, {len(compensation['gaps'])} gaps folded, relative gap error "
                     + ", ".join(f"{g['error_before']:.3f} -> {g['error_after']:.3f}" for g in compensation["gaps"])))
    else:
        rows.append(("compensation", "none" + (" (not supported here)" if "skipped" in compensation else "")))
    if report["evaluation"]:
        e = report["evaluation"]
        rows.append(("perplexity", f"{e['ppl_before']:.2f} -> {e['ppl_after']:.2f} ({e['tokens']:,} tokens of {e['file']})"))
    rows.append(("written to", str(out)))
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _span(blocks: list[str]) -> str:
    if len(blocks) == 1:
        return blocks[0]
    return f"{blocks[0]} .. {blocks[-1].rsplit('.', 1)[-1]} ({len(blocks)})"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
