"""`lorp-fx prune --heal`: the healing flags, their checks before any work, and the call after pruning.

Every flag is a `HealConfig` field with a `heal_` prefix (`--heal-steps` is `steps`), and
so is a recipe's key (`heal_steps: 300`). Numbers are read by these checks rather than by
argparse, so that `--heal-steps ten` is one line naming the flag, like every other mistake.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

from lorp_fx.core.errors import ConfigError
from lorp_fx.healing.config import PRECISIONS, TRAINABLE, HealConfig
from lorp_fx.healing.data import check_enough, windows_needed
from lorp_fx.healing.identity import check_resume, fingerprint, trained_parts
from lorp_fx.healing.run import check_distillable
from lorp_fx.healing.trainable import check_peft
from lorp_fx.io.text import check_text_file, text_tokens

DEFAULTS = HealConfig()
# flag field -> (type, minimum): read from the flag's text by `heal_config_of`
NUMBERS = {"steps": (int, 1), "batch_size": (int, 1), "seq_len": (int, 2), "held_out": (int, 0), "lora_rank": (int, 1),
           "checkpoint_every": (int, 1), "lr": (float, 0.0), "hidden_weight": (float, 0.0)}


def add_heal_arguments(parser: argparse.ArgumentParser) -> None:
    """The --heal flags of `lorp-fx prune`."""
    group = parser.add_argument_group("healing", "a short distillation from the dense model after pruning (docs/healing.md)")
    group.add_argument("--heal", action="store_true", help=f"heal the pruned model ({DEFAULTS.steps} steps of "
                       f"{DEFAULTS.batch_size} x {DEFAULTS.seq_len} tokens by default: under 15 minutes for SmolLM2 on 2 cores)")
    group.add_argument("--heal-steps", type=_raw, default=DEFAULTS.steps, metavar="N", help="optimizer steps")
    group.add_argument("--heal-batch-size", type=_raw, default=DEFAULTS.batch_size, metavar="B", help="windows per step")
    group.add_argument("--heal-seq-len", type=_raw, default=DEFAULTS.seq_len, metavar="L", help="tokens per window")
    group.add_argument("--heal-train", default=DEFAULTS.train, choices=TRAINABLE,
                       help="what trains: the layers next to each gap (default), LoRA adapters (peft, merged), or all")
    group.add_argument("--heal-lr", type=_raw, metavar="LR", help="learning rate (default: by --heal-train)")
    group.add_argument("--heal-hidden-weight", type=_raw, default=DEFAULTS.hidden_weight, metavar="W",
                       help="add W x the relative error of the residual state at each gap to the KL (default 0: off)")
    group.add_argument("--heal-file", type=Path, nargs="+", metavar="FILE",
                       help="healing text (default: --calib-file, else text the dense model samples itself)")
    group.add_argument("--heal-held-out", type=_raw, default=DEFAULTS.held_out, metavar="H",
                       help="windows of the healing text kept out of training, to measure it before and after")
    group.add_argument("--heal-precision", default=DEFAULTS.precision, choices=PRECISIONS)
    group.add_argument("--heal-resume", type=Path, metavar="CKPT", help="resume healing from this run's last.ckpt")
    group.add_argument("--heal-checkpoint-dir", type=Path, metavar="DIR",
                       help="where checkpoints go (default: OUT.healing beside the output, deleted after a run that ends well)")
    group.add_argument("--heal-checkpoint-every", type=_raw, default=DEFAULTS.checkpoint_every, metavar="N")


def _raw(text: str):
    """A number where the text is one, else the text, for `heal_config_of` to refuse in one line."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def heal_config_of(args) -> HealConfig | None:
    """The HealConfig `--heal` and its flags (or a recipe) describe, None without --heal; a bad number is named
    by its flag."""
    if not getattr(args, "heal", False):
        return None
    values = {}
    for field in dataclasses.fields(HealConfig):
        value = getattr(args, f"heal_{field.name}", None)
        if field.name in NUMBERS and value is not None:
            value = _checked_number(field.name, value)
        if value is not None:
            values[field.name] = value
    values["seed"] = getattr(args, "seed", 0)
    if values.get("checkpoint_dir") is None and getattr(args, "out", None):
        out = Path(os.path.expanduser(str(args.out)))
        values["checkpoint_dir"] = str(out.parent / f"{out.name}.healing")
    return HealConfig(**{k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()})


def _checked_number(name: str, value):
    kind, minimum = NUMBERS[name]
    flag = f"--heal-{name.replace('_', '-')}"
    whole = kind is int and isinstance(value, int) and not isinstance(value, bool)
    real = kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (whole or real) or value < minimum or (name == "lr" and value <= 0):
        what = "a whole number" if kind is int else "a number"
        bound = f"> {minimum}" if name == "lr" else f">= {minimum}"
        raise ConfigError(f"{flag} must be {what} {bound}, got {value!r}")
    return kind(value)


def heal_text(args) -> list | None:
    """The healing text's files: --heal-file, else --calib-file, else None (the dense model samples it)."""
    return args.heal_file or args.calib_file


def check_heal_options(args, config: HealConfig | None, tokenizer, processes: int = 1) -> None:
    """Before the weights load: peft for LoRA, the healing text long enough for one batch, the checkpoint
    to resume a healing checkpoint that trained the same parts."""
    if config is None:
        given = _healing_flags_given(args)
        if given:  # a healing flag alone would otherwise be ignored without a word
            raise ConfigError(f"{' and '.join(given)} take{'s' if len(given) == 1 else ''} effect with --heal; add --heal")
        return
    check_peft(config.train)
    files = heal_text(args)
    if files:
        paths = [check_text_file(p, "healing file") for p in files]
        available = len(text_tokens(tokenizer, paths)) // config.seq_len
        check_enough(available, config, processes, ", ".join(map(str, paths)))
    if config.resume is not None:
        check_resume(config.resume, trained_parts(config))


def _healing_flags_given(args) -> list[str]:
    """The --heal-* flags (or recipe keys) set to something other than their defaults."""
    return [f"--{name.replace('_', '-')}" for name, value in sorted(vars(args).items())
            if name.startswith("heal_") and value is not None and value != getattr(DEFAULTS, name[len("heal_"):], None)]


def check_heal_model(config: HealConfig | None, model) -> None:
    """Once the weights are loaded, before pruning: the model is one healing can train (a causal LM), and a
    checkpoint to resume belongs to it. Not after the pruning's calibration and selection have run."""
    if config is None:
        return
    check_distillable(model)
    if config.resume is not None:
        check_resume(config.resume, {"model": fingerprint(model)})


__all__ = [
    "add_heal_arguments",
    "check_heal_model",
    "check_heal_options",
    "heal_config_of",
    "heal_text",
    "windows_needed",
]
