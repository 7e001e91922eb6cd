"""What a healing checkpoint belongs to, and the check that a resumed run is the same run.

A checkpoint holds only the parameters that train, so it resumes only on the model it
was made from, pruned by the same plan, training the same parts. Its identity records
the dense model's fingerprint (its kind, shape and the first rows of its input
embedding, rounded to bfloat16 so that a float32 and a bfloat16 load agree), the
removed blocks, and what trains. `check_resume` compares them before any training.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from lorp_fx.arch.surgery import count_layers
from lorp_fx.core.errors import ConfigError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.healing.config import HealConfig

IDENTITY_KEY = "lorp_fx_healing"


def fingerprint(model: nn.Module) -> str:
    """A short hash of the dense model: its type, config shape, and the first rows of its input embedding."""
    config = getattr(model, "config", None)
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    for key in ("model_type", "hidden_size", "vocab_size", "intermediate_size", "num_attention_heads"):
        digest.update(f"{key}={getattr(config, key, None)};".encode())
    digest.update(f"layers={count_layers(model)};".encode())
    embedding = model.get_input_embeddings().weight
    rows = embedding[:16].detach().to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
    digest.update(rows.numpy().tobytes())
    return digest.hexdigest()[:16]


def trained_parts(config: HealConfig) -> dict:
    """What trains: a checkpoint of other parts does not load."""
    return {"train": config.train, "lora_rank": config.lora_rank if config.train == "lora" else None}


def identity(teacher: nn.Module, plan: PruningPlan | None, config: HealConfig) -> dict:
    """What a checkpoint of this run must match to be resumed."""
    return {
        "model": fingerprint(teacher),
        "model_name": getattr(getattr(teacher, "config", None), "name_or_path", None) or type(teacher).__name__,
        "removed": sorted(plan.remove) if plan is not None else None,
        **trained_parts(config),
    }


def read_identity(path: str | os.PathLike) -> dict:
    """The identity stored in a healing checkpoint; ConfigError (one line) for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--heal-resume {path} does not exist; give the last.ckpt a healing run left")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - every unreadable file means the same to the user
        raise ConfigError(f"--heal-resume {path} is not a readable Lightning checkpoint ({type(error).__name__})") from None
    stored = checkpoint.get(IDENTITY_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(stored, dict):
        raise ConfigError(f"--heal-resume {path} is not a lorp-fx healing checkpoint (it has no {IDENTITY_KEY} record)")
    return stored


def check_resume(path: str | os.PathLike, expected: dict) -> dict:
    """The checkpoint's identity, or ConfigError naming what differs from `expected` (any of the model, the plan,
    what trains: the keys it holds)."""
    stored = read_identity(path)
    if "model" in expected and stored.get("model") != expected["model"]:
        raise ConfigError(f"--heal-resume {path} is a checkpoint of another model ({stored.get('model_name')}); "
                          f"resume it with that model, or heal from the start without --heal-resume")
    if "removed" in expected and stored.get("removed") != expected["removed"]:
        raise ConfigError(f"--heal-resume {path} healed another pruning plan (removed {_brief(stored.get('removed'))}, "
                          f"this run removes {_brief(expected['removed'])}); prune as that run did, or heal from the start")
    for key in ("train", "lora_rank"):
        if key in expected and stored.get(key) != expected[key]:
            raise ConfigError(f"--heal-resume {path} trained with {key} {stored.get(key)}, this run with {expected[key]}; "
                              f"pass the same, or heal from the start")
    return stored


def _brief(names) -> str:
    if not names:
        return "nothing"
    return ", ".join(n.rpartition(".")[2] if n.rpartition(".")[2].isdigit() else n for n in names)
