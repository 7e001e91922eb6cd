"""The three commands: each checks everything first (`pipeline.preflight`), loads, calls the library, prints."""

from __future__ import annotations

import argparse
import dataclasses

from lorp_fx.arch.families import check_dtype
from lorp_fx.arch.surgery import count_layers, count_parameters
from lorp_fx.core.errors import ConfigError
from lorp_fx.core.model import release_memory
from lorp_fx.healing.options import (
    check_heal_options,
    check_heal_model,
    heal_config_of,
    heal_text,
)
from lorp_fx.healing.run import heal as lorp_fx_heal
from lorp_fx.io.gguf.pruned_file import open_source
from lorp_fx.io.checkpoint import save_pretrained_atomic
from lorp_fx.io.placement import (
    check_offload_granularity,
    load_placed,
    resolve_placement,
)
from lorp_fx.judge.perplexity import perplexity
from lorp_fx.pipeline.analyze import analyze
from lorp_fx.pipeline.config import PruneConfig
from lorp_fx.pipeline.preflight import check_prune_options, preflight, prune_config
from lorp_fx.pipeline.recipe import recipe_of
from lorp_fx.pipeline.report import cost_line, summary_lines
from lorp_fx.pipeline.run import prune_model


def run_prune(args: argparse.Namespace) -> int:
    if args.out is None:
        raise ConfigError("--out is required: the directory to write the pruned checkpoint to")
    config = prune_config(args)  # the flags' numbers are checked first, named by their flags
    heal = heal_config_of(args)  # None without --heal; healing keeps the dense model as its teacher
    config = dataclasses.replace(config, inplace=heal is None)
    placement = placement_of(args)
    if placement.device_map is not None:
        check_offload_granularity(config.granularity)  # whether or not the weights end up offloaded
    check_prune_options(args, config)
    ready = preflight(args)  # every check before the weights load; one line and exit 2
    check_heal_options(args, heal, ready.tokenizer, args.devices or 1)
    check_dtype(getattr(ready.source.config, "model_type", None), placement.dtype)
    gguf = None if args.no_gguf else gguf_source(ready.source)
    model = load_placed(ready.source, ready.tokenizer, placement, processes=args.devices is not None)
    check_heal_model(heal, model)
    release_memory(placement.device)  # what loading freed (a GGUF file's dequantisation buffers) goes back
    if args.devices is not None:
        # Imported here: Lightning's import costs about 2 s, paid only by runs in several processes.
        from lorp_fx.lightning.distributed import is_rank_zero, prune_distributed

        result = prune_distributed(model, ready.tokenizer, args.calib_file, config, placement, args.devices,
                                   args.strategy, gguf=gguf, every_rank=heal is not None)  # every rank heals
        if heal is not None:
            lorp_fx_heal(result, model, heal_text(args), heal, tokenizer=ready.tokenizer, devices=args.devices,
                         strategy=args.strategy)
        if result is None or not is_rank_zero():  # rank zero writes
            return 0
    else:
        result = prune_model(model, args.calib_file, config, tokenizer=ready.tokenizer, evaluation=ready.evaluation,
                             gguf=gguf)
        if heal is not None:
            lorp_fx_heal(result, model, heal_text(args), heal, tokenizer=ready.tokenizer, evaluation=ready.evaluation)
    result.report.update(model=str(args.model), dtype=str(placement.dtype).removeprefix("torch."), seed=args.seed)
    if result.report["evaluation"]:
        result.report["evaluation"]["file"] = str(args.eval_file)
    result.save(ready.out, ready.tokenizer, overwrite=args.overwrite, extra_files={"recipe.yaml": recipe_of(vars(args))},
                gguf_requantize=args.gguf_requantize)
    print()
    print("\n".join(summary_lines(result.report, args.out) + [cost_line(result.report)]))
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    placement = placement_of(args)
    ready = preflight(args)  # every check before the weights load; one line and exit 2
    check_dtype(getattr(ready.source.config, "model_type", None), placement.dtype)
    model = load_placed(ready.source, ready.tokenizer, placement)
    config = PruneConfig(remove=1, calib_samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                         seed=args.seed, own_windows=args.own_windows)
    analysis = analyze(model, args.calib_file, config, ready.tokenizer, granularity=args.granularity)
    save_pretrained_atomic(None, None, ready.out, extra_files=analysis.files(str(args.model)), overwrite=args.overwrite,
                           protect=ready.source.paths)
    print("\n".join([*analysis.summary_lines(), f"written to {args.out}"]))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    placement = placement_of(args)
    ready = preflight(args)  # every check before the weights load; one line and exit 2
    gguf_source(ready.source)  # a pruned .gguf evaluates like any model, once transformers can read it
    model = load_placed(ready.source, ready.tokenizer, placement)
    windows = ready.evaluation
    ppl = perplexity(model, windows, batch_size=args.batch_size)
    print(f"{args.model}: {count_layers(model)} layers, {count_parameters(model):,} parameters, "
          f"perplexity {ppl:.2f} on {windows.numel():,} tokens")
    return 0


def placement_of(args: argparse.Namespace):
    """The checked device placement the command line asks for (before anything is loaded)."""
    return resolve_placement(
        args.device, args.dtype, devices=getattr(args, "devices", None), strategy=getattr(args, "strategy", "ddp"),
        device_map=getattr(args, "device_map", None), max_memory=getattr(args, "max_memory", None),
        offload_dir=None if getattr(args, "offload_dir", None) is None else str(args.offload_dir),
    )


def gguf_source(source):
    """The validated GGUF file a model comes from (the embedded default is one), else None."""
    return open_source(source.location) if source.kind == "gguf" else None
