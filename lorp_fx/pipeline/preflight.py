"""Every check the command line makes before any work, in order of cost.

    ready = preflight(args)          # one line and exit 2 for anything wrong, before the weights load
    model = load_weights(ready.source, args.dtype, ready.tokenizer)

1. numbers: seeds, batch sizes, window counts and lengths (`NUMBERS`);
2. input files: calibration and eval files exist and are readable files;
3. the model: found, its configuration read (no weights), no code of its own, an
   architecture that matches its model_type (`io.models.resolve_model`);
4. the output: resolved, not an input, creatable, replaceable only if lorp-fx wrote
   it (`output.check_output_location`); a crashed earlier run is cleaned up first;
5. sublayer granularity against the family, the budget against the model's layers,
   sequence lengths against its positions, all read from its configuration;
6. the tokenizer (no weights), then the calibration and eval files cut into windows:
   too short, or token ids beyond the model's vocabulary, fail here. The eval windows
   are kept: the command measures on them.

Options a command does not have (eval has no --out) are skipped, so every command
calls the same function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorp_fx.arch.families import whole_layers_only
from lorp_fx.core.budget import budget_from_ratio, check_budget
from lorp_fx.core.errors import ConfigError, NotRemovableError
from lorp_fx.core.model import check_token_ids
from lorp_fx.io.corpus import corpus_text
from lorp_fx.io.models import ModelSource, load_tokenizer, resolve_model
from lorp_fx.io.output_dir import check_offload_location, check_output_location
from lorp_fx.io.text import check_text_file, text_windows
from lorp_fx.pipeline.config import PruneConfig

# option -> smallest allowed value
NUMBERS = {"seed": 0, "batch_size": 1, "calib_samples": 1, "seq_len": 2, "loss_windows": 1, "eval_samples": 1, "eval_seq_len": 2,
           "own_windows": 0}


@dataclass
class Ready:
    """What the checks found: the model's source and tokenizer, the resolved output, the eval windows."""

    source: ModelSource
    tokenizer: object
    out: Path | None = None
    evaluation: torch.Tensor | None = None


def preflight(args) -> Ready:
    """Check `args` (an argparse namespace of prune, analyze or eval) in the order of the module docstring."""
    check_numbers(args)
    calibration = [check_text_file(p, "calibration file") for p in _listed(getattr(args, "calib_file", None))]
    evaluation = [check_text_file(p, "eval file") for p in _listed(getattr(args, "eval_file", None))]
    source = resolve_model(args.model)
    out = None
    if hasattr(args, "out"):
        # (The recipe is not protected: it is read whole before any work, and rerunning the recipe.yaml of an
        # output into that same output with --overwrite is a natural thing to do.)
        inputs = [*source.paths, *calibration, *evaluation]
        out = check_output_location(args.out, getattr(args, "overwrite", False), protect=inputs)
        if getattr(args, "offload_dir", None) is not None:
            check_offload_location(args.offload_dir, out, protect=inputs)
    check_granularity(source, args)
    check_layer_budget(source, args)
    check_lengths(source, args, evaluation)
    tokenizer = load_tokenizer(source)
    if not calibration and hasattr(args, "calib_file"):
        corpus_text()  # the default calibration reads the shipped corpus: a missing or damaged one fails now
    if calibration:
        check_token_ids(text_windows(tokenizer, calibration, args.calib_samples, args.seq_len), source.vocab_size, "calibration")
    windows = None
    if evaluation:
        windows = text_windows(tokenizer, evaluation, args.eval_samples, args.eval_seq_len)
        check_token_ids(windows, source.vocab_size, "eval")
    return Ready(source, tokenizer, out, windows)


def check_numbers(args) -> None:
    """ConfigError naming the flag for a number below its minimum, or not a whole number; and for the budget."""
    if hasattr(args, "remove") and hasattr(args, "ratio"):
        check_budget_flags(args.remove, args.ratio)
    for name, minimum in NUMBERS.items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= {minimum}, got {value!r}")


def check_budget_flags(remove, ratio) -> None:
    """ConfigError, in the command line's words, unless exactly one of --remove and --ratio is given and valid."""
    if (remove is None) == (ratio is None):
        raise ConfigError("give exactly one budget: --remove K (layers to remove) or --ratio R (a fraction of them)")
    if remove is not None and (isinstance(remove, bool) or not isinstance(remove, int) or remove < 1):
        raise ConfigError(f"--remove must be a whole number >= 1, got {remove!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
        raise ConfigError(f"--ratio must be a fraction strictly between 0 and 1, got {ratio!r}")


def check_lengths(source: ModelSource, args, evaluation: list) -> None:
    """ConfigError for a window longer than the model's position embeddings cover (read from its config)."""
    if source.positions is None:
        return  # relative positions (T5): no fixed limit
    lengths = {"--seq-len": getattr(args, "seq_len", None)}
    if evaluation:
        lengths["--eval-seq-len"] = getattr(args, "eval_seq_len", None)
    for flag, length in lengths.items():
        if length is not None and length > source.positions:
            raise ConfigError(f"{flag} {length} is longer than the {source.positions} positions of model {source.name} "
                              f"(its max_position_embeddings): pass {flag} {source.positions} or less")


def check_granularity(source: ModelSource, args) -> None:
    """NotRemovableError for --granularity sublayer on a family whose layers can only go whole (from its config)."""
    if getattr(args, "granularity", "layer") != "sublayer" or not hasattr(args, "remove") or source.config is None:
        return  # only prune removes (analyze measures sublayers of any family); a GGUF file is a Llama
    why = whole_layers_only(getattr(source.config, "model_type", None))
    if why is not None:
        raise NotRemovableError(f"cannot prune model {source.name} by sublayers: {why}; pass --granularity layer")


def check_layer_budget(source: ModelSource, args) -> None:
    """BudgetError for a layer budget the model's layer count (from its config) cannot meet."""
    if getattr(args, "granularity", "layer") != "layer" or source.layers is None:
        return
    remove, ratio = getattr(args, "remove", None), getattr(args, "ratio", None)
    if remove is None and ratio is None:
        return
    check_budget(source.layers, remove if remove is not None else budget_from_ratio(source.layers, ratio), what="layers")




def _listed(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def prune_config(args) -> PruneConfig:
    """The PruneConfig that `lorp-fx prune`'s options (and its recipe) describe; a bad number is named by its
    flag first, before PruneConfig names it by its field."""
    check_numbers(args)
    return PruneConfig(
        remove=args.remove, ratio=args.ratio, method=args.method, granularity=args.granularity,
        compensate=args.compensate, calib_samples=args.calib_samples, seq_len=args.seq_len,
        loss_windows=args.loss_windows, batch_size=args.batch_size, seed=args.seed, own_windows=args.own_windows,
        selector_options=dict(getattr(args, "selector_options", None) or {}), inplace=True,
    )


def check_prune_options(args, config: PruneConfig) -> None:
    """ConfigError for `lorp-fx prune` options that do not go together."""
    batches = -(-config.calib_samples // config.batch_size)
    if args.devices is not None and batches < args.devices:
        raise ConfigError(f"--devices {args.devices} needs at least {args.devices} calibration batches, one per process; "
                          f"--calib-samples {config.calib_samples} at --batch-size {config.batch_size} makes {batches}: "
                          "raise --calib-samples, or lower --batch-size or --devices")
    if args.devices is not None and args.eval_file is not None:
        raise ConfigError("--eval-file is not measured under --devices; evaluate the written checkpoint with lorp-fx eval")
