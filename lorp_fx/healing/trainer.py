"""The Lightning side of healing: the Trainer (progress bar, checkpoints, precision, strategy) and `fit`.

Checkpoints: `last.ckpt` in the checkpoint folder, written every `checkpoint_every`
steps and when a run in one process stops on an exception or Ctrl-C, so the newest state
is the one to resume from. (Not Lightning's OnExceptionCheckpoint: with it, `fit` resumes
from any last.ckpt it finds, unasked and unchecked.) A run that ends well deletes it
(the healed model is the output then), and the folder where it is left empty.

Precision (`config.lightning_precision`): bfloat16 autocast where the hardware computes in
bfloat16 natively, float32 elsewhere; weights stored in 16 bits train through autocast, the
trained ones upcast to float32 for the optimizer and cast back at the end.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lorp_fx.core.model import model_device
from lorp_fx.healing.config import HealConfig
from lorp_fx.healing.module import Distillation
from lorp_fx.healing.teacher import Teacher
from lorp_fx.healing.trainable import Trainable, trainable_parameters

LAST = "last"


def fit(trainable: Trainable, student: nn.Module, teacher: Teacher, student_points: list, windows: torch.Tensor,
        config: HealConfig, identity: dict, progress: bool, devices: int, strategy: str, callbacks: list,
        precision: str) -> dict:
    """Train `trainable` in a Lightning Trainer with Lightning's `precision`; {"curve"}."""
    device = model_device(student)
    upcast = _upcast(trainable.module)
    module = Distillation(trainable.module, student, teacher, student_points, windows, config, identity, world=devices)
    folder, temporary = checkpoint_folder(config)
    last = folder / f"{LAST}.ckpt"
    options = dict(
        accelerator={"cuda": "gpu", "mps": "mps"}.get(device.type, "cpu"),
        devices=[device.index or 0] if device.type == "cuda" and devices == 1 else devices,
        strategy=strategy, precision=precision, max_steps=config.steps, max_epochs=1, logger=False,
        callbacks=[ModelCheckpoint(dirpath=folder, filename=LAST, save_top_k=0, save_last=True,
                                   every_n_train_steps=config.checkpoint_every, enable_version_counter=False),
                   SaveOnException(last), *callbacks],
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        gradient_clip_val=1.0, use_distributed_sampler=False, default_root_dir=folder,
    )
    try:
        with quiet_lightning():
            trainer = L.Trainer(**options)
            trainer.fit(module, ckpt_path=config.resume)
    except SystemExit:  # Lightning exits on Ctrl-C (and SIGTERM) after its own clean-up
        raise interrupted(last) from None
    finally:
        _downcast(upcast)
    if trainer.state.status.value == "interrupted":
        raise interrupted(last)
    remove_checkpoint(last, folder, temporary)  # a run that ended well: the healed model is the output now
    return {"curve": module.curve}


@contextlib.contextmanager
def quiet_lightning():
    """Lightning's chatter kept out of a run's output: its info lines (devices, tips, "max_steps reached") and
    warnings that do not apply (the modules are in eval mode on purpose, module.py; a deprecation inside it)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
            # a resumed run may checkpoint at another interval: its ModelCheckpoint state is not needed
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class SaveOnException(Callback):
    """Write the state of the last finished step to `path` when a run in one process stops on an exception or
    Ctrl-C (several processes: a rank that failed alone would wait for the others forever at the save)."""

    def __init__(self, path: Path):
        self.path = path

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.world_size == 1 and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)


def _upcast(module: nn.Module) -> dict[nn.Parameter, torch.dtype]:
    """Trained parameters stored in 16 bits, moved to float32 for the optimizer; their dtypes, to cast back."""
    original = {}
    for parameter in trainable_parameters(module):
        if parameter.dtype in (torch.float16, torch.bfloat16):
            original[parameter] = parameter.dtype
            parameter.data = parameter.data.float()
    return original


def _downcast(original: dict[nn.Parameter, torch.dtype]) -> None:
    for parameter, dtype in original.items():
        parameter.data = parameter.data.to(dtype)


class HealingInterrupted(KeyboardInterrupt):
    """Ctrl-C during healing: nothing was written, and the last checkpoint is named for `--heal-resume`."""


def checkpoint_folder(config: HealConfig) -> tuple[Path, bool]:
    """(where checkpoints go, whether the folder is a temporary one, deleted after a run that ends well)."""
    if config.checkpoint_dir is not None:
        path = Path(config.checkpoint_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix="lorp-fx-healing-")), True


def interrupted(checkpoint: Path | None) -> HealingInterrupted:
    """The interruption to raise after Lightning's own Ctrl-C handling (which exits), with Ctrl-C restored."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C presses
    where = f"; resume with --heal-resume {checkpoint}" if checkpoint is not None and checkpoint.is_file() else ""
    return HealingInterrupted(f"healing was interrupted{where}")


def remove_checkpoint(last: Path, folder: Path, temporary: bool) -> None:
    """Delete the checkpoint of a run that ended well, and its folder where lorp-fx made it or it is left empty."""
    if temporary:
        shutil.rmtree(folder, ignore_errors=True)
        return
    last.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # the user's folder holds other files: left as it is
        pass
