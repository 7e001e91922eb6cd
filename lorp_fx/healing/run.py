"""`lorp_fx.heal`: train a pruned model to match the dense one's next-token distributions, in Lightning.

    result = lorp_fx.prune_model(model, "valid.txt", lorp_fx.PruneConfig(remove=9), tokenizer=tokenizer)
    healed = lorp_fx.heal(result, model, "valid.txt", lorp_fx.HealConfig(steps=150), tokenizer=tokenizer)
    result.save("pruned/", tokenizer)                 # the healed model, its report and healing.png

Steps: check everything (the models, the plan, a checkpoint to resume, peft for LoRA)
-> the healing windows, some held out -> perplexity of the dense and the pruned model
on the held-out windows -> what trains -> the teacher's outputs (on the fly or cached)
-> `Trainer.fit` with a progress bar and a checkpoint every `checkpoint_every` steps
-> adapters merged -> perplexity after. The healed model has the pruned model's
parameters, shapes and speed.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lorp_fx.arch.surgery import count_parameters
from lorp_fx.core.errors import ConfigError
from lorp_fx.core.model import causal_lm, model_device, synchronize
from lorp_fx.core.plan import PruningPlan
from lorp_fx.healing.config import HealConfig, lightning_precision
from lorp_fx.healing.data import HealingData, HealingText, healing_text
from lorp_fx.healing.gaps import check_pair, match_points
from lorp_fx.healing.identity import check_resume, identity
from lorp_fx.healing.teacher import Teacher, teacher_mode
from lorp_fx.healing.trainable import check_peft, finish, prepare
from lorp_fx.judge.perplexity import perplexity


@dataclass
class HealResult:
    """The healed model, what healing did (report.json's "healing"), and the parameters it changed."""

    model: nn.Module
    report: dict
    changed: list[str] = field(default_factory=list)


def heal(pruned, teacher: nn.Module, data: HealingData = None, config: HealConfig | None = None, *,
         plan: PruningPlan | None = None, tokenizer=None, progress: bool = True, devices: int = 1,
         strategy: str = "auto", pass_unit: dict | None = None, evaluation: torch.Tensor | None = None,
         callbacks: list | None = None) -> HealResult:
    """Heal `pruned` (a pruned causal LM, or a `PruneResult`) by distillation from `teacher`, the dense model.

    * `data`: healing windows (n, seq_len), text file path(s), or None for text the dense model samples itself
      (needs `tokenizer`), as much as the steps read; `config.held_out` windows are kept out of training.
    * `plan`: the pruning plan (taken from a `PruneResult`); needed to train the layers next to each gap.
    * `devices`, `strategy`: Lightning's, for several processes (`devices` > 1 runs DDP by default).
    * `pass_unit`: {"seconds", "tokens"} of a pass (a `PruneResult`'s own by default), to report the time in
      passes; without one, a plain forward of the dense model over one healing batch is timed.
    * `evaluation`: token windows to measure the healed model's perplexity on (report "ppl_healed").
    * `callbacks`: more Lightning callbacks for the healing Trainer.

    A `PruneResult` is healed in place: its model is replaced by the healed one, and its report gains
    "healing", so `result.save` writes the healed model, its GGUF and the healing curve.
    """
    config = config if config is not None else HealConfig()
    if not isinstance(config, HealConfig):
        raise ConfigError(f"config must be a lorp_fx.HealConfig, got {type(config).__name__}")
    result = pruned if hasattr(pruned, "model") and hasattr(pruned, "plan") else None
    student = result.model if result is not None else pruned
    plan = plan if plan is not None else (result.plan if result is not None else None)
    check_models(student, teacher, plan, config)
    expected = identity(teacher, plan, config)
    if config.resume is not None:
        check_resume(config.resume, expected)
    text = healing_text(teacher, data, config, tokenizer, world=_world(devices), progress=progress)
    if pass_unit is None and result is not None:
        pass_unit = result.report.get("pass_unit")
    healed = _heal(student, teacher, plan, text, config, expected, progress, devices, strategy, pass_unit, callbacks)
    if evaluation is not None:
        healed.report["evaluation"] = {"ppl_healed": perplexity(healed.model, evaluation.to(model_device(healed.model)),
                                                                batch_size=config.batch_size, progress=progress)}
    if result is not None:
        _update_result(result, healed)
    return healed


def check_distillable(model: nn.Module, which: str = "model") -> None:
    """Healing distils next-token distributions: `model` must predict them."""
    if not causal_lm(model):
        raise ConfigError(f"healing matches next-token distributions, which the {which} ({type(model).__name__}) "
                          "does not model: heal causal language models")


def check_models(student: nn.Module, teacher: nn.Module, plan: PruningPlan | None, config: HealConfig) -> None:
    """Everything about the two models and the options that can be checked before any work."""
    check_peft(config.train)
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise ConfigError("heal takes the pruned model (or a PruneResult) and the dense teacher, both torch modules")
    if student is teacher:
        raise ConfigError("the teacher must be the dense model the pruned one came from, not the pruned model itself; "
                          "prune a copy (PruneConfig(inplace=False), the default) and keep the original")
    for which, model in (("pruned model", student), ("teacher", teacher)):
        check_distillable(model, which)
    if model_device(student) != model_device(teacher):
        raise ConfigError(f"the pruned model is on {model_device(student)} and the teacher on {model_device(teacher)}; "
                          "put both on the same device")
    if plan is not None:
        check_pair(student, teacher, plan)
    elif config.hidden_weight > 0:
        raise ConfigError("hidden-state matching compares the states at each gap, so it needs the pruning plan: pass plan=")


def _world(devices: int) -> int:
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"devices must be a whole number of processes >= 1, got {devices!r}")
    return devices


def _heal(student, teacher, plan, text: HealingText, config: HealConfig, expected: dict, progress: bool, devices: int,
          strategy: str, pass_unit: dict | None, callbacks: list | None) -> HealResult:
    # Imported here: Lightning's import costs about 2 s, paid by runs that heal.
    from lorp_fx.healing.trainer import fit

    parameters = count_parameters(student)
    points = match_points(student, teacher, plan) if config.hidden_weight > 0 else []
    mode, figures = teacher_mode(config.teacher, teacher, text.tokens, student.get_input_embeddings().num_embeddings,
                                 student.config.hidden_size, len(points), world=devices)
    before = held_out_perplexity(student, teacher, text.held_out, config, progress)
    unit = pass_unit or _pass_unit(teacher, text.train[: config.batch_size])
    trainable = prepare(student, teacher, plan, config)
    trained_count = sum(p.numel() for p in trainable.module.parameters() if p.requires_grad)
    outputs = Teacher(teacher, [t for t, _ in points])
    device = model_device(student)
    precision = lightning_precision(config, device, next(student.parameters()).dtype)
    start = time.perf_counter()
    if mode == "cached":
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):  # as fit computes it
            outputs.cache(text.train, config.batch_size, progress)
    synchronize(device)
    run = fit(trainable, student, outputs, [s for _, s in points], text.train, config, expected, progress, devices, strategy,
              callbacks or [], precision)
    healed = finish(trainable, student)
    seconds = time.perf_counter() - start
    after = held_out_perplexity(healed, None, text.held_out, config, progress)
    if count_parameters(healed) != parameters:
        raise AssertionError(f"healing changed the parameter count ({parameters} -> {count_parameters(healed)}): a lorp_fx bug")
    report = {
        "steps": config.steps,
        "train": config.train,
        "trained_parameters": trained_count,
        "trained_tensors": len(trainable.names),
        "tokens": config.steps * config.batch_size * devices * int(text.train.shape[1]),
        "windows": int(text.train.shape[0]),
        "seq_len": int(text.train.shape[1]),
        "text": text.source,
        "teacher": {"outputs": mode, **figures},
        "learning_rate": config.learning_rate,
        "precision": precision,
        "devices": devices,
        "seconds": round(seconds, 2),
        "passes": round(seconds / unit["seconds"], 2),
        "pass_unit": unit,
        "loss_curve": run["curve"],
        "held_out": before if after is None else {**before, "ppl_after": after},
        "parameters": parameters,
        "peak_memory_bytes": peak_memory(model_device(healed)),
        "resumed_from": None if config.resume is None else str(config.resume),
        "config": config.to_dict(),
    }
    return HealResult(healed, report, list(trainable.names))


def held_out_perplexity(model, teacher, windows: torch.Tensor, config: HealConfig, progress: bool) -> dict | float | None:
    """Perplexity on the held-out windows: {ppl_dense, ppl_before, windows, tokens} with a teacher, else a number."""
    if windows.shape[0] == 0:
        return {"windows": 0} if teacher is not None else None
    device = model_device(model)
    ppl = perplexity(model, windows.to(device), batch_size=config.batch_size, progress=progress)
    if teacher is None:
        return ppl
    dense = perplexity(teacher, windows.to(device), batch_size=config.batch_size, progress=progress)
    return {"windows": int(windows.shape[0]), "tokens": int(windows.numel()), "ppl_dense": dense, "ppl_before": ppl}


@torch.no_grad()
def _pass_unit(teacher: nn.Module, batch: torch.Tensor) -> dict:
    """One plain forward of the dense model over one healing batch: the unit of healing's time in passes."""
    device = model_device(teacher)
    synchronize(device)
    start = time.perf_counter()
    teacher(input_ids=batch.to(device))
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": int(batch.numel()),
            "measured": f"one plain forward of the dense model over one healing batch ({tuple(batch.shape)} tokens)"}


def peak_memory(device: torch.device) -> int:
    """Peak bytes: the GPU's allocations on CUDA, else the process's resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _update_result(result, healed: HealResult) -> None:
    """A PruneResult healed in place: the healed model, the report's "healing", the healed perplexity."""
    report = result.report
    result.model = healed.model
    report["healing"] = {**healed.report, "changed_parameters": healed.changed}
    report.setdefault("timings", {})["healing_s"] = healed.report["seconds"]
    passes = report.get("timings_in_passes")
    if passes and healed.report["pass_unit"] is report.get("pass_unit"):
        passes["healing"] = healed.report["passes"]
        passes["total"] = round(passes.get("total", 0.0) + healed.report["passes"], 3)
    if report.get("evaluation") and "evaluation" in healed.report:
        report["evaluation"]["ppl_healed"] = healed.report["evaluation"]["ppl_healed"]
