"""What trains while healing: the kept layers next to each gap, LoRA adapters (peft), or every weight.

Every choice leaves a model of the pruned model's shape: the first two train weights
that are already there, and LoRA adapters are merged into the weights they adapt and
removed (`finish`). Removed sublayers (a sublayer plan zeroes their output
projections) stay frozen, so they stay removed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from lorp_fx.arch.families import layer_stacks
from lorp_fx.core.errors import ConfigError
from lorp_fx.core.plan import PruningPlan
from lorp_fx.healing.config import HealConfig
from lorp_fx.healing.gaps import neighbour_layers, zeroed_sublayers

PEFT_INSTALL = "pip install peft"


def check_peft(train: str) -> None:
    """ConfigError with the install command where LoRA is asked for and peft is not installed."""
    if train == "lora" and importlib.util.find_spec("peft") is None:
        raise ConfigError(f"healing with LoRA adapters (train lora) needs the peft package, which is not installed: "
                          f"{PEFT_INSTALL}")


@dataclass
class Trainable:
    """The module to train (peft's wrapper around the student for train="lora", else the student), the names
    of the student's parameters training changes, and each parameter's requires_grad as it came."""

    module: nn.Module
    names: list[str]
    flags: dict[str, bool]


def prepare(student: nn.Module, teacher: nn.Module, plan: PruningPlan | None, config: HealConfig) -> Trainable:
    """The parts of `student` that train by `config.train`, requires_grad set, LoRA adapters added for "lora"."""
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    module, names = _choose(student, teacher, plan, config)
    return Trainable(module, names, flags)


def _choose(student: nn.Module, teacher: nn.Module, plan: PruningPlan | None, config: HealConfig) -> tuple[nn.Module, list[str]]:
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    frozen = tuple(zeroed_sublayers(student, teacher, plan)) if plan is not None else ()
    if config.train == "lora":
        return _with_adapters(student, config, frozen)
    if config.train == "gaps":
        if plan is None:
            raise ConfigError("train gaps trains the layers next to each gap, so it needs the pruning plan: pass plan=, "
                              "or a PruneResult as the model to heal")
        chosen = tuple(neighbour_layers(teacher, plan))
    else:
        chosen = ("",)
    names = [name for name, _ in student.named_parameters()
             if any(_under(name, prefix) for prefix in chosen) and not any(_under(name, f) for f in frozen)]
    parameters = dict(student.named_parameters())
    for name in names:
        parameters[name].requires_grad_(True)
    return student, names


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def adapter_targets(student: nn.Module, frozen: tuple[str, ...]) -> list[str]:
    """The linear projections of every layer (transformers' Conv1D too), less removed sublayers."""
    from transformers.pytorch_utils import Conv1D

    targets = []
    for path, layers in layer_stacks(student):
        for i, layer in enumerate(layers):
            for name, module in layer.named_modules():
                full = f"{path}.{i}.{name}"
                if isinstance(module, (nn.Linear, Conv1D)) and not any(_under(full, f) for f in frozen):
                    targets.append(full)
    return targets


def _with_adapters(student: nn.Module, config: HealConfig, frozen: tuple[str, ...]) -> tuple[nn.Module, list[str]]:
    check_peft("lora")
    from peft import (  # an optional dependency, imported when LoRA is asked for
        LoraConfig,
        get_peft_model,
    )

    targets = adapter_targets(student, frozen)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0, target_modules=targets,
                      bias="none")
    with torch.random.fork_rng(devices=[]):  # adapters drawn from the seed, the caller's random state untouched
        torch.manual_seed(config.seed)
        wrapped = get_peft_model(student, lora)
    weight_names = [f"{target}.weight" for target in targets]
    return wrapped, weight_names


def finish(trainable: Trainable, student: nn.Module) -> nn.Module:
    """The student with adapters merged into its weights and removed (nothing to do for the other choices),
    each parameter's requires_grad back as it came."""
    model = trainable.module.merge_and_unload() if trainable.module is not student else student
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable.flags.get(name, True))
    return model


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
