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
import sys
from pathlib import Path

from lorp_fx.cli.commands import run_analyze, run_eval, run_prune
from lorp_fx.core.errors import LoRPError, describe
from lorp_fx.core.model import limit_heap_fragmentation
from lorp_fx.core.plan import GRANULARITIES
from lorp_fx.healing.options import add_heal_arguments
from lorp_fx.io.models import DEFAULT_MODEL
from lorp_fx.io.placement import DEVICE_MAPS, DTYPES, STRATEGIES
from lorp_fx.pipeline.config import COMPENSATIONS
from lorp_fx.pipeline.recipe import given_on_command_line, merge_recipe
from lorp_fx.selection.registry import DEFAULT_SELECTOR, SELECTORS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser().parse_args(argv)
    limit_heap_fragmentation()  # this process is the command's own: freed activations go back to the system
    try:
        if getattr(args, "config", None) is not None:
            merged = merge_recipe(vars(args), args.config, given_on_command_line(argv), args.command == "eval")
            args = argparse.Namespace(**merged)
        return args.run(args)
    except LoRPError as error:
        print(f"lorp-fx: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # healing names the checkpoint to resume from
        print(f"lorp-fx: interrupted; nothing was written{'; ' + str(interrupt) if str(interrupt) else ''}", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line, not a stack trace from deep inside torch
        if args.debug:
            raise
        print(f"lorp-fx: error: {describe(error)} (rerun with --debug for details)", file=sys.stderr)
        return 1


def parser() -> argparse.ArgumentParser:
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
    prune.add_argument("--method", default=DEFAULT_SELECTOR, choices=sorted(SELECTORS), help=f"selector (default {DEFAULT_SELECTOR})")
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
    add_heal_arguments(prune)
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
    """Where the run computes (lorp_fx/io/placement.py checks every value before any work; docs/scaling.md)."""
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


def _calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calib-file", type=Path, nargs="+",
        help="calibration text (default: text the model generates itself from a fixed seed)",
    )
    parser.add_argument("--calib-samples", type=int, default=32, help="number of windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument(
        "--own-windows", type=int, default=8,
        help="windows the model writes itself: without --calib-file part of the calibration (the rest from the "
             "shipped corpus; >= --calib-samples: its own text alone), with it the compensation guard's check text")
