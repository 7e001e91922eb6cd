"""`Distillation`: the LightningModule that heals a pruned model by matching the dense model's next-token
distributions.

The loss of a step is the KL divergence KL(teacher || student) of the next-token
distributions, averaged over the batch's tokens, plus, with `hidden_weight` > 0, that
weight times the mean relative squared error ||s - t||^2 / ||t||^2 of the residual
states where the stream leaves each gap. Only the chosen parameters train (trainable.py);
checkpoints hold those parameters alone, and an identity (the dense model's fingerprint,
the plan, what trains) that a resumed run is checked against before it trains.

Dropout stays off in both models: a healed model depends on its data and seed alone, and
a run resumed from a checkpoint equals an uninterrupted one.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lorp_fx.calibration.batches import with_model_defaults
from lorp_fx.calibration.capture import attach_state_hooks
from lorp_fx.core.errors import CalibrationError
from lorp_fx.healing.config import HealConfig
from lorp_fx.healing.data import StepBatches
from lorp_fx.healing.identity import IDENTITY_KEY
from lorp_fx.healing.teacher import Teacher
from lorp_fx.healing.trainable import trainable_parameters
from lorp_fx.judge.loss import output_logits


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) between next-token distributions, in float32.

    Computed a chunk of tokens at a time, forward and backward (the gradient for the student's
    logits is softmax(student) - softmax(teacher), over the token count): no (tokens, vocabulary)
    temporaries beyond the two logit tensors themselves. For SmolLM2's 49,152 words that saves
    about a gigabyte at a 4 x 256 batch."""
    return _ChunkedKL.apply(student_logits.flatten(0, -2), teacher_logits.detach().flatten(0, -2))


_CHUNK = 128  # tokens per chunk: 128 x 49,152 floats = 25 MB a temporary


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(student, teacher)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for s, t in zip(student.split(_CHUNK), teacher.split(_CHUNK)):
            teacher_log = F.log_softmax(t.float(), dim=-1)
            total += (teacher_log.exp() * (teacher_log - F.log_softmax(s.float(), dim=-1))).sum()
        return total / student.shape[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher = ctx.saved_tensors
        scale = grad / student.shape[0]
        out = torch.empty_like(student)
        for s, t, o in zip(student.split(_CHUNK), teacher.split(_CHUNK), out.split(_CHUNK)):
            o.copy_((F.softmax(s.float(), dim=-1) - F.softmax(t.float(), dim=-1)) * scale)
        return out, None


def state_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor]) -> torch.Tensor:
    """Mean over gaps of the relative squared error of the student's residual states against the teacher's."""
    errors = [((s.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum().clamp_min(1e-12)
              for s, t in zip(student_states, teacher_states)]
    return torch.stack(errors).mean()


class Distillation(L.LightningModule):
    """Trains `trainable` (the student, or peft's wrapper around it) towards `teacher`'s outputs on `windows`."""

    def __init__(self, trainable: nn.Module, student: nn.Module, teacher: Teacher,
                 student_points: list[tuple[nn.Module, str]], windows: torch.Tensor, config: HealConfig, identity: dict,
                 world: int = 1):
        super().__init__()
        self.model = trainable
        self.call_options = with_model_defaults(student, {})  # use_cache=False where the model takes it
        self.teacher, self.student_points, self.windows = teacher, student_points, windows
        self.config, self.identity, self.world = config, identity, world
        self.strict_loading = False  # checkpoints hold the trained parameters only
        self.curve: list[list[float]] = []  # [step, loss, kl] every `log_every` steps
        self.log_every = max(1, config.steps // 100)
        self._window: list[torch.Tensor] = []

    # ------------------------------------------------------------------ data and steps

    def train_dataloader(self):
        return StepBatches(self.windows, self.config, start=self.trainer.global_step,
                           world=self.trainer.world_size, rank=self.trainer.global_rank)

    def train(self, mode: bool = True):
        """Dropout stays off (module docstring): Lightning's train() leaves every module in eval mode."""
        super().train(False)
        return self

    def training_step(self, batch, batch_idx):
        input_ids = batch["input_ids"]
        teacher_logits, teacher_states = self.teacher.outputs(input_ids, batch["index"])
        student_logits, student_states = self._student(input_ids)
        kl = distillation_loss(student_logits, teacher_logits)
        loss = kl
        if self.config.hidden_weight > 0:
            loss = loss + self.config.hidden_weight * state_loss(student_states, teacher_states)
        if not torch.isfinite(loss):
            raise CalibrationError(f"the healing loss is {float(loss)} at step {self.global_step}; lower the learning "
                                   "rate (--heal-lr), or heal in float32")
        self.log("kl", kl.detach(), prog_bar=True, on_step=True, logger=False)
        self._record(loss.detach(), kl.detach())
        return loss

    def _student(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        captured: dict[int, torch.Tensor] = {}
        points = self.student_points if self.config.hidden_weight > 0 else []
        handles = attach_state_hooks([(i, module, kind) for i, (module, kind) in enumerate(points)],
                                     captured.__setitem__)
        try:
            logits = output_logits(self.model(input_ids=input_ids, **self.call_options))
        finally:
            for handle in handles:
                handle.remove()
        return logits, [captured[i] for i in range(len(points))]

    def _record(self, loss: torch.Tensor, kl: torch.Tensor) -> None:
        """The loss curve: the mean of every `log_every` steps (over all processes), kept on every rank."""
        self._window.append(torch.stack([loss, kl]).float())
        step = self.global_step + 1
        if step % self.log_every and step != self.config.steps:
            return
        mean = torch.stack(self._window).mean(0)
        if self.world > 1:
            mean = self.trainer.strategy.reduce(mean, reduce_op="mean")
        self.curve.append([step, round(float(mean[0]), 5), round(float(mean[1]), 5)])
        self._window = []

    # ------------------------------------------------------------------ optimizer

    def configure_optimizers(self):
        parameters = trainable_parameters(self.model)
        optimizer = torch.optim.AdamW(parameters, lr=self.config.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.config.steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Only what trains (the dense and frozen weights are rebuilt by pruning again), the loss curve, and
        the identity a resumed run is checked against."""
        trained = {id(p) for p in trainable_parameters(self.model)}
        named = dict(self.named_parameters())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in named and id(named[k]) in trained}
        checkpoint[IDENTITY_KEY] = {**self.identity, "curve": self.curve}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.curve = [list(point) for point in checkpoint.get(IDENTITY_KEY, {}).get("curve", [])]


def warmup_cosine(steps: int):
    """Learning-rate factor per step: linear warmup over the first 5% of the steps, then cosine decay to 10%."""
    warmup = max(1, math.ceil(0.05 * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
