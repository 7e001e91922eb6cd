"""Healing inside a user's own Lightning loop: what `LoRPCallback(..., heal_steps=N)` needs.

The callback calibrates and prunes as it always does; with healing asked for it also
keeps a copy of the dense network (the teacher: layer plans are applied to the network
in place) and the token ids of the calibration calls, then heals the pruned network by
distillation on them (or on `heal_data`) in a Trainer of its own, on the network's
device, before handing the network back to the LightningModule.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from lorp_fx.core.errors import ConfigError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.healing.config import HealConfig
from lorp_fx.healing.run import heal
from lorp_fx.healing.trainable import check_peft


class HealAfterPruning:
    """Healing options of a LoRPCallback, the teacher and windows it keeps, and the healing run."""

    def __init__(self, steps: int | None, config: HealConfig | None, data, apply: bool, tokenizer=None):
        if steps is not None and config is not None:
            raise ConfigError("give heal_steps or heal (a HealConfig), not both")
        if steps is not None:
            try:
                config = HealConfig(steps=steps)  # validates steps
            except ConfigError as error:  # "steps must be ...": named as the caller wrote it, heal_steps
                raise ConfigError(f"heal_{error}" if str(error).startswith("steps ") else str(error)) from None
        if config is not None and not isinstance(config, HealConfig):
            raise ConfigError(f"heal must be a lorp_fx.HealConfig, got {type(config).__name__}")
        if config is not None and not apply:
            raise ConfigError("healing trains the pruned network the callback hands back: pass apply=True with heal_steps")
        if config is not None:
            check_peft(config.train)
        if data is not None and not isinstance(data, (torch.Tensor, str, os.PathLike, list, tuple)):
            raise ConfigError(f"heal_data must be token windows (n, seq_len) or text file path(s), got {type(data).__name__}")
        if isinstance(data, (str, os.PathLike, list, tuple)) and tokenizer is None:
            raise ConfigError("heal_data names text files: pass heal_tokenizer= to read them")
        self.config, self.data, self.tokenizer = config, data, tokenizer
        self.inputs: list[torch.Tensor] = []

    @property
    def asked(self) -> bool:
        return self.config is not None

    def record(self, inputs: dict) -> None:
        """Keep a calibration call's token ids (the healing text, unless heal_data was given)."""
        if not self.asked or self.data is not None:
            return
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ConfigError("healing on the calibration batches needs the network called with input_ids (batch, seq); "
                              "pass LoRPCallback(heal_data=windows)")
        if isinstance(mask, torch.Tensor) and not bool(mask.all()):
            raise ConfigError("the calibration batches are padded, and healing trains on whole windows: pass "
                              "LoRPCallback(heal_data=windows) with unpadded token windows")
        self.inputs.append(ids.detach().cpu())

    def teacher(self, network: nn.Module) -> nn.Module | None:
        """A frozen copy of the dense network, taken before pruning changes it (as ordinary tensors: the
        callback runs inside Lightning's inference mode)."""
        if not self.asked:
            return None
        with torch.inference_mode(False):
            return copy.deepcopy(network).eval()

    def heal(self, pruned: nn.Module, teacher: nn.Module, plan: PruningPlan, progress: bool) -> nn.Module:
        """The pruned network healed by distillation from `teacher`."""
        data = self.data
        if data is None:
            lengths = {int(x.shape[1]) for x in self.inputs}
            if len(lengths) != 1:
                raise ConfigError("the calibration batches have windows of different lengths; pass "
                                  "LoRPCallback(heal_data=windows) of one length")
            data = torch.cat(self.inputs)
        self.inputs = []
        # The evaluation loop that calibrated runs without gradients (inference mode): healing trains.
        with torch.inference_mode(False), torch.enable_grad():
            data = data.clone() if isinstance(data, torch.Tensor) else data
            result = heal(pruned, teacher, data, self.config, plan=plan, tokenizer=self.tokenizer, progress=progress)
        self.report = result.report
        return result.model
