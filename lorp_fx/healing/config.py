"""`HealConfig`: everything `lorp_fx.heal` needs to know, with documented defaults.

The defaults are chosen so that SmolLM2-135M at 9 of 30 layers heals in at most 15
minutes on 2 CPU cores (benchmarks/results/heal-smollm2.md). The same fields, prefixed
`heal_`, are the command line's `--heal-*` flags and a recipe's keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from lorp_fx.core.errors import ConfigError
from lorp_fx.core.fields import check_choice, check_whole, from_mapping

TRAINABLE = ("gaps", "lora", "all")
TEACHER_MODES = ("auto", "on_the_fly", "cached")
PRECISIONS = ("auto", "32", "bf16")
# Learning rates by what trains: adapters start at zero and need a larger step than pretrained weights.
DEFAULT_LR = {"gaps": 3e-4, "lora": 1e-3, "all": 1e-4}


@dataclass(frozen=True)
class HealConfig:
    """How to heal a pruned model by distillation from the dense one.

    steps             optimizer steps
    batch_size        windows per step (per process)
    seq_len           tokens per healing window
    train             what trains: "gaps" (the kept layers next to each gap), "lora" (peft adapters on every
                      linear layer, merged at the end) or "all" (every weight)
    lr                AdamW learning rate; None: DEFAULT_LR[train]
    hidden_weight     weight of the hidden-state term (relative squared error at each gap) added to the KL; 0: off
    lora_rank         adapter rank for train="lora" (alpha = 2 x rank)
    held_out          windows of the healing text kept out of training, to measure perplexity before and after
    seed              data order, self-sampled healing text, adapter initialisation
    teacher           "auto" (cache the teacher's logits where that takes less memory than the teacher itself),
                      "on_the_fly" or "cached"
    precision         "auto" (bfloat16 autocast where the device computes bfloat16 natively: a GPU, or a CPU with
                      AVX512-BF16 or AMX, where it trains about 1.6x faster; float32 elsewhere), "32" or "bf16"
    checkpoint_every  steps between Lightning checkpoints (the last one is kept for resuming)
    checkpoint_dir    where the checkpoints go; None: a temporary folder, deleted after a run that ends well
    resume            a Lightning checkpoint of this healing run to resume from
    """

    steps: int = 300
    batch_size: int = 2
    seq_len: int = 256
    train: str = "gaps"
    lr: float | None = None
    hidden_weight: float = 0.0
    lora_rank: int = 8
    held_out: int = 8
    seed: int = 0
    teacher: str = "auto"
    precision: str = "auto"
    checkpoint_every: int = 50
    checkpoint_dir: str | None = None
    resume: str | None = None

    def __post_init__(self) -> None:
        check_whole(self.steps, "steps", 1)
        check_whole(self.batch_size, "batch_size", 1)
        check_whole(self.seq_len, "seq_len", 2)
        check_choice(self.train, "train", TRAINABLE)
        if self.lr is not None:
            _positive(self.lr, "lr")
        _non_negative(self.hidden_weight, "hidden_weight")
        check_whole(self.lora_rank, "lora_rank", 1)
        check_whole(self.held_out, "held_out", 0)
        check_whole(self.seed, "seed", 0)
        check_choice(self.teacher, "teacher", TEACHER_MODES)
        check_choice(self.precision, "precision", PRECISIONS)
        check_whole(self.checkpoint_every, "checkpoint_every", 1)
        for name in ("checkpoint_dir", "resume"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value).strip()):
                raise ConfigError(f"{name} must be a path, got {value!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.train]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HealConfig:
        return from_mapping(cls, data, "heal config")


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _positive(value, name: str) -> None:
    if not _number(value) or value <= 0:
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")


def _non_negative(value, name: str) -> None:
    if not _number(value) or value < 0:
        raise ConfigError(f"{name} must be a number >= 0, got {value!r}")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matrix products in hardware (else bf16 autocast is slow emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        capabilities = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # an older torch: no way to ask
        return False
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def lightning_precision(config: HealConfig, device: torch.device, dtype: torch.dtype) -> str:
    """Lightning's precision flag for `config.precision` on `device`, with the model's weights stored in `dtype`."""
    if dtype == torch.float16 and device.type == "cuda":
        return "16-mixed"
    wants_bf16 = config.precision == "bf16" or (config.precision == "auto" and native_bf16(device))
    return "bf16-mixed" if wants_bf16 or dtype != torch.float32 else "32-true"
