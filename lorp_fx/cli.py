"""`lorp-fx`: prune, analyze and evaluate models from the command line; a thin shell over the library.

    lorp-fx prune   --remove 6 --out pruned/          # the embedded SmolLM2-135M, self-calibrated
    lorp-fx prune   --config recipe.yaml --out pruned/
    lorp-fx analyze --calib-file valid.txt --out analysis/
    lorp-fx eval    --model pruned/ --eval-file test.txt

Every failure the user can fix prints one line and exits with status 2; nothing is
half written (output directories appear complete or not at all).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import COMPENSATIONS, GRANULARITIES, PruneConfig, read_recipe
from .errors import ConfigError, LoRPError
from .models import DEFAULT_MODEL
from .selectors import DEFAULT_METHOD, SELECTORS

def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(_with_recipe(args, argv))
    except LoRPError as error:
        print(f"lorp-fx: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorp-fx: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line, not a stack trace from deep inside torch
        if args.debug:
            raise
        lines = str(error).strip().splitlines()
        print(f"lorp-fx: error: {type(error).__name__}: {lines[0] if lines else ''} (rerun with --debug for details)", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- arguments


def _parser() -> argparse.ArgumentParser:
    # No abbreviated flags: `--seq 16` was taken as --seq-len by argparse but not seen as given over a recipe's value.
    parser = argparse.ArgumentParser(prog="lorp-fx", description="Training-free depth pruning of language models.",
                                     allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", allow_abbrev=False, help="choose and remove redundant layers, save a smaller checkpoint")
    prune.add_argument("--config", type=Path, help="a YAML recipe of these options (command-line flags override it)")
    _model_arguments(prune)
    _device_arguments(prune, processes=True)
    budget = prune.add_mutually_exclusive_group()
    budget.add_argument("--remove", type=int, metavar="K", help="number of blocks to remove")
    budget.add_argument("--ratio", type=float, metavar="R", help="fraction of the blocks to remove")
    prune.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(SELECTORS), help=f"selector (default {DEFAULT_METHOD})")
    prune.add_argument("--granularity", default="layer", choices=GRANULARITIES)
    prune.add_argument(
        "--compensate", default="auto", choices=COMPENSATIONS,
        help="fold a fitted linear map into the layer before each gap (docs/compensation.md); "
             "auto (default): cosine where the family allows it, else none",
    )
    _calibration_arguments(prune)
    prune.add_argument("--loss-windows", type=int, default=8, help="calibration windows a loss-judged selector measures on")
    prune.add_argument("--eval-file", type=Path, help="text to measure perplexity on, before and after")
    prune.add_argument("--eval-samples", type=int, default=40)
    prune.add_argument("--eval-seq-len", type=int, default=512)
    prune.add_argument("--out", help="output directory (a transformers checkpoint); required")
    prune.add_argument("--overwrite", action="store_true", help="replace an output directory lorp-fx wrote before")
    prune.add_argument("--no-gguf", action="store_true", help="a model read from a .gguf file: do not also write a pruned .gguf")
    prune.add_argument("--gguf-requantize", default="original", choices=["original", "q8_0"],
                       help="compensated projections in the pruned .gguf: their original type (default) or Q8_0 "
                            "(about 1 MB more on SmolLM2, no requantization loss: benchmarks/results/gguf-smollm2.md)")
    prune.set_defaults(run=run_prune)

    analyze = commands.add_parser("analyze", allow_abbrev=False, help="statistics, RLS, clusters and heatmap; removes nothing")
    _model_arguments(analyze)
    _device_arguments(analyze)
    _calibration_arguments(analyze)
    analyze.add_argument("--granularity", default="layer", choices=GRANULARITIES)
    analyze.add_argument("--out", required=True, help="output directory")
    analyze.add_argument("--overwrite", action="store_true", help="replace an output directory lorp-fx wrote before")
    analyze.set_defaults(run=run_analyze, config=None)

    evaluate = commands.add_parser("eval", allow_abbrev=False, help="perplexity of a model or a pruned checkpoint")
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help=f"directory, .gguf, hub id or {DEFAULT_MODEL}")
    evaluate.add_argument("--eval-file", type=Path, required=True, nargs="+")
    evaluate.add_argument("--eval-samples", type=int, default=40)
    evaluate.add_argument("--eval-seq-len", type=int, default=512)
    _device_arguments(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.set_defaults(run=run_eval, config=None)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_MODEL,
        help=f"a transformers directory, a .gguf file, a hub id, or {DEFAULT_MODEL} (default: the embedded GGUF)",
    )
    parser.add_argument("--seed", type=int, default=0, help="for self-calibration and the random selector")
    parser.add_argument("--batch-size", type=int, default=4)


def _device_arguments(parser: argparse.ArgumentParser, processes: bool = False) -> None:
    """Where the run computes (lorp_fx/devices.py checks every value before any work; docs/scaling.md)."""
    from .devices import DEVICE_MAPS, DTYPES, STRATEGIES

    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on a GPU, float32 on the CPU")
    if not processes:
        return
    parser.add_argument("--devices", type=int, metavar="N",
                        help="calibrate in N processes through Lightning (one per GPU, or N CPU processes); rank zero writes")
    parser.add_argument("--strategy", default="ddp", choices=STRATEGIES, help="Lightning strategy for --devices (default ddp)")
    parser.add_argument("--device-map", choices=DEVICE_MAPS,
                        help="spread a model too large for one device over the GPUs, the CPU and disk (accelerate)")
    parser.add_argument("--max-memory", metavar="DEV=SIZE,...", help="with --device-map: what each device may hold, e.g. 0=20GiB,cpu=30GiB")
    parser.add_argument("--offload-dir", help="with --device-map: where weights that fit nowhere else go (default: a temporary folder)")


def _check_dtype(source, placement) -> None:
    from .families import check_dtype

    check_dtype(getattr(source.config, "model_type", None), placement.dtype)


def placement_of(args: argparse.Namespace):
    """The checked device placement the command line asks for (before anything is loaded)."""
    from .devices import resolve_placement

    return resolve_placement(
        args.device, args.dtype, devices=getattr(args, "devices", None), strategy=getattr(args, "strategy", "ddp"),
        device_map=getattr(args, "device_map", None),
        max_memory=getattr(args, "max_memory", None),
        offload_dir=None if getattr(args, "offload_dir", None) is None else str(args.offload_dir),
    )


def _calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calib-file", type=Path, nargs="+",
        help="calibration text (default: text the model generates itself from a fixed seed)",
    )
    parser.add_argument("--calib-samples", type=int, default=32, help="number of windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")


def _with_recipe(args: argparse.Namespace, argv) -> argparse.Namespace:
    """`args` with the recipe's values where the command line left an option at its default."""
    if getattr(args, "config", None) is None:
        return args
    recipe = read_recipe(args.config)
    known = set(vars(args)) - {"run", "command", "debug", "config"}
    unknown = sorted(set(recipe) - known - {"selector_options"})
    if unknown:
        raise ConfigError(f"config file {args.config}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    _check_recipe_types(args.config, recipe, several_eval_files=args.command == "eval")
    given = _given_on_command_line(argv)
    for key, value in recipe.items():
        if key not in given:
            setattr(args, key, Path(value) if key == "eval_file" and value is not None else value)
    if isinstance(args.calib_file, (str, Path)):
        args.calib_file = [args.calib_file]
    if args.calib_file is not None:
        args.calib_file = [Path(p) for p in args.calib_file]
    return args


_RECIPE_SWITCHES = ("overwrite", "no_gguf")
_RECIPE_PATHS = ("model", "out", "offload_dir", "max_memory", "device", "dtype")  # strings; null leaves them unset


def _check_recipe_types(path, recipe: dict, several_eval_files: bool) -> None:
    """ConfigError for a recipe value of the wrong type, which the flags' own parsing would have refused
    (a string where a switch is meant was taken as true: `overwrite: "no"` replaced an output)."""
    def refuse(key, what, value):
        raise ConfigError(f"config file {path}: {key} must be {what}, got {value!r}")

    for key, value in recipe.items():
        if key in _RECIPE_SWITCHES and not isinstance(value, bool):
            refuse(key, "true or false", value)
        elif key in _RECIPE_PATHS and value is not None and not isinstance(value, str):
            refuse(key, "a string", value)
        elif key == "selector_options" and value is not None and not isinstance(value, dict):
            refuse(key, "a mapping of option names to values", value)
        elif key in ("calib_file", "eval_file") and value is not None:
            several = key == "calib_file" or several_eval_files
            items = value if isinstance(value, list) and several else [value]
            if not items or not all(isinstance(item, str) and item.strip() for item in items):
                refuse(key, "a file path" + (" or a list of them" if several else ""), value)


def _given_on_command_line(argv) -> set[str]:
    argv = sys.argv[1:] if argv is None else argv
    return {a.split("=", 1)[0][2:].replace("-", "_") for a in map(str, argv) if a.startswith("--")}


def prune_config(args: argparse.Namespace) -> PruneConfig:
    """The PruneConfig the command line (and its recipe) describe."""
    return PruneConfig(
        remove=args.remove, ratio=args.ratio, method=args.method, granularity=args.granularity,
        compensate=args.compensate, calib_samples=args.calib_samples, seq_len=args.seq_len,
        loss_windows=args.loss_windows, batch_size=args.batch_size, seed=args.seed,
        selector_options=dict(getattr(args, "selector_options", None) or {}), inplace=True,
    )


def recipe_of(args: argparse.Namespace) -> dict:
    """Every option of this run, as a recipe `--config` reads back."""
    # Not `overwrite`: replacing an output is decided per run, on the command line, not replayed from a recipe.
    recipe = {k: v for k, v in vars(args).items() if k not in ("run", "command", "debug", "config", "overwrite")}
    return json.loads(json.dumps(recipe, default=str))


# --------------------------------------------------------------------------- commands


def run_prune(args: argparse.Namespace) -> int:
    from .devices import load_placed, release_memory
    from .pipeline import prune_model
    from .preflight import check_numbers, preflight
    from .report import summary_lines

    if args.out is None:
        raise ConfigError("--out is required: the directory to write the pruned checkpoint to")
    check_numbers(args)  # named by their flags, before PruneConfig names them by field
    config = prune_config(args)
    placement = placement_of(args)
    if placement.device_map is not None:
        from .offload import check_offload_granularity

        check_offload_granularity(config.granularity)  # whether or not the weights end up offloaded
    batches = -(-config.calib_samples // config.batch_size)
    if args.devices is not None and batches < args.devices:
        raise ConfigError(f"--devices {args.devices} needs at least {args.devices} calibration batches, one per process; "
                          f"--calib-samples {config.calib_samples} at --batch-size {config.batch_size} makes {batches}: "
                          "raise --calib-samples, or lower --batch-size or --devices")
    if args.devices is not None and args.eval_file is not None:
        raise ConfigError("--eval-file is not measured under --devices; evaluate the written checkpoint with lorp-fx eval")
    ready = preflight(args)  # every check before the weights load; one line and exit 2
    _check_dtype(ready.source, placement)
    gguf = None if args.no_gguf else _gguf_source(ready.source)
    tokenizer = ready.tokenizer
    model = load_placed(ready.source, tokenizer, placement, processes=args.devices is not None)
    release_memory(placement.device)  # what loading freed (a GGUF file's dequantisation buffers) goes back
    if args.devices is not None:
        from .distributed import prune_distributed

        result = prune_distributed(model, tokenizer, args.calib_file, config, placement, args.devices, args.strategy,
                                   gguf=gguf)
        if result is None:  # not rank zero: rank zero writes
            return 0
    else:
        result = prune_model(model, args.calib_file, config, tokenizer=tokenizer, evaluation=ready.evaluation, gguf=gguf)
    result.report["model"] = str(args.model)
    result.report["dtype"] = str(placement.dtype).removeprefix("torch.")
    result.report["seed"] = args.seed
    if result.report["evaluation"]:
        result.report["evaluation"]["file"] = str(args.eval_file)
    import yaml

    recipe = yaml.safe_dump(recipe_of(args), sort_keys=True)
    result.save(ready.out, tokenizer, overwrite=args.overwrite, extra_files={"recipe.yaml": recipe},
                gguf_requantize=args.gguf_requantize)
    print()
    print("\n".join(summary_lines(result.report, args.out) + [cost_line(result.report)]))
    return 0


def _gguf_source(source):
    """The validated GGUF file a model comes from (the embedded default is one), else None."""
    from .gguf_output import open_source

    return open_source(source.location) if source.kind == "gguf" else None


def cost_line(report: dict) -> str:
    """The run's cost in passes (one plain forward over the calibration tokens) and seconds, step by step."""
    passes, unit = report.get("timings_in_passes") or {}, report.get("pass_unit") or {}
    steps = ", ".join(f"{k} {v:.2f}" for k, v in passes.items() if k != "total")
    return f"  cost  {passes.get('total', float('nan')):.2f} passes ({steps}); one pass = {unit.get('seconds', float('nan')):.1f} s"


def run_analyze(args: argparse.Namespace) -> int:
    from .batches import token_batches
    from .observe import collect_statistics
    from .output import save_pretrained_atomic
    from .calibration import calibration_windows, encoder_decoder, on_device
    from .pipeline import heatmap_file
    from .plan import PruningPlan
    from .preflight import preflight
    from .report import span
    from .selectors import paper_clusters

    from .devices import load_placed, model_device

    placement = placement_of(args)
    ready = preflight(args)  # every check before the weights load; one line and exit 2
    _check_dtype(ready.source, placement)
    tokenizer = ready.tokenizer
    model = load_placed(ready.source, tokenizer, placement)
    config = PruneConfig(remove=1, calib_samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    windows, source = calibration_windows(model, args.calib_file, config, tokenizer, progress=True)
    batches = on_device(token_batches(windows, args.batch_size, encoder_decoder(model)), model_device(model))
    stats, _ = collect_statistics(model, batches, granularity=args.granularity)
    rls, clusters = paper_clusters(stats)
    influence = {b: float(v) for b, v in zip(stats.blocks, stats.block_influence())}
    plan = PruningPlan(remove=[], method="analyze", granularity=args.granularity, rls=rls, clusters=clusters,
                       statistics=stats, scores=influence)
    report = {
        "model": str(args.model), "calibration": {"source": source, "tokens": stats.token_count},
        "rls": rls, "clusters": clusters, "block_influence": influence, "points": list(stats.points),
        "similarity": stats.similarity.tolist(),
    }
    files = {"report.json": json.dumps(report, indent=1), "statistics.json": json.dumps(stats.to_dict())}
    files.update(heatmap_file(plan))
    save_pretrained_atomic(None, None, ready.out, extra_files=files, overwrite=args.overwrite, protect=ready.source.paths)
    print(f"RLS {rls:.3f} -> {len(clusters)} clusters: " + "; ".join(span(c) for c in clusters))
    lowest = sorted(influence, key=influence.get)[:5]
    print("lowest Block Influence: " + ", ".join(f"{b} ({influence[b]:.3f})" for b in lowest))
    print(f"written to {args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import perplexity
    from .preflight import preflight
    from .surgery import count_layers, count_parameters

    from .devices import load_placed

    placement = placement_of(args)
    ready = preflight(args)  # every check before the weights load; one line and exit 2
    _gguf_source(ready.source)  # a pruned .gguf evaluates like any model, once transformers can read it
    model = load_placed(ready.source, ready.tokenizer, placement)
    windows = ready.evaluation
    ppl = perplexity(model, windows, batch_size=args.batch_size)
    print(f"{args.model}: {count_layers(model)} layers, {count_parameters(model):,} parameters, "
          f"perplexity {ppl:.2f} on {windows.numel():,} tokens")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
