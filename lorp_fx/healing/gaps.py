"""Where the gaps are, seen from both models: the kept layers next to each gap, and the state each gap must match.

A plan names blocks of the dense model (the teacher). In each layer list the kept
layers are renumbered 0..n-1 in the pruned model (the student), as `arch.surgery`
does. A gap is a run of removed layers, or a layer that lost a sublayer (a sublayer
plan zeroes its output projection and keeps the layer). Its neighbours are the kept
layer before it and the kept layer after it (and, for a sublayer gap, the layer
itself). Its matching point is the residual state where the stream leaves the gap:
the input of the first kept layer after it, or the stack's output at its end.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorp_fx.arch.families import family_of, layer_stacks
from lorp_fx.arch.surgery import removed_indices
from lorp_fx.core.errors import ConfigError
from lorp_fx.core.plan import PruningPlan


@dataclass(frozen=True)
class Gap:
    """One gap of the stack at `path`, in the dense model's layer indices."""

    path: str
    removed: tuple[int, ...]  # whole layers removed (empty for a sublayer gap)
    before: int | None  # the kept layer before the gap
    after: int | None  # the kept layer after the gap
    partial: int | None = None  # the layer that lost sublayers (a sublayer gap)


def find_gaps(teacher: nn.Module, plan: PruningPlan) -> list[Gap]:
    """The gaps `plan` leaves in `teacher`'s layer lists, in order."""
    gaps = []
    for path, layers in layer_stacks(teacher):
        whole = removed_indices(path, list(plan.remove))
        partial = {int(name[len(path) + 1:].partition(".")[0]) for name in plan.remove
                   if name.startswith(path + ".") and name[len(path) + 1:].partition(".")[2]}
        kept = [i for i in range(len(layers)) if i not in whole]
        i = 0
        while i < len(layers):
            if i in whole:
                run = []
                while i < len(layers) and i in whole:
                    run.append(i)
                    i += 1
                gaps.append(_gap(path, tuple(run), kept, run[0], run[-1]))
                continue
            if i in partial:
                gaps.append(_gap(path, (), kept, i, i, partial=i))
            i += 1
    return gaps


def _gap(path: str, removed: tuple[int, ...], kept: list[int], first: int, last: int, partial: int | None = None) -> Gap:
    before = max((k for k in kept if k < first), default=None)
    after = min((k for k in kept if k > last), default=None)
    return Gap(path, removed, before, after, partial)


def new_names(teacher: nn.Module, plan: PruningPlan) -> dict[str, str]:
    """Each kept layer's dense name -> its name in the pruned model (`model.layers.12` -> `model.layers.10`)."""
    names = {}
    for path, layers in layer_stacks(teacher):
        whole = removed_indices(path, list(plan.remove))
        kept = [i for i in range(len(layers)) if i not in whole]
        names.update({f"{path}.{old}": f"{path}.{new}" for new, old in enumerate(kept)})
    return names


def neighbour_layers(teacher: nn.Module, plan: PruningPlan) -> list[str]:
    """The pruned model's names of the kept layers next to each gap (what train="gaps" trains), in order."""
    names = new_names(teacher, plan)
    chosen = []
    for gap in find_gaps(teacher, plan):
        for index in (gap.before, gap.partial, gap.after):
            if index is not None:
                name = names[f"{gap.path}.{index}"]
                if name not in chosen:
                    chosen.append(name)
    return sorted(chosen, key=lambda n: (n.rpartition(".")[0], int(n.rpartition(".")[2])))


def zeroed_sublayers(student: nn.Module, teacher: nn.Module, plan: PruningPlan) -> list[str]:
    """The pruned model's names of the sublayers a sublayer plan removed: they stay frozen (and zero)."""
    names = new_names(teacher, plan)
    out = []
    for name in plan.remove:
        layer = next((old for old in names if name.startswith(old + ".")), None)
        if layer is not None:
            out.append(names[layer] + name[len(layer):])
    return out


def match_points(student: nn.Module, teacher: nn.Module, plan: PruningPlan) -> list[tuple[tuple[nn.Module, str], tuple[nn.Module, str]]]:
    """For each gap, ((teacher module, "pre"|"out"), (student module, "pre"|"out")): where the stream leaves the gap
    in each model (the input of the first kept layer after it, or the last layer's output at the stack's end)."""
    names = new_names(teacher, plan)
    student_stacks = dict(layer_stacks(student))
    points = []
    for gap in find_gaps(teacher, plan):
        teacher_layers = teacher.get_submodule(gap.path)
        if gap.after is not None:
            new = int(names[f"{gap.path}.{gap.after}"].rpartition(".")[2])
            points.append(((teacher_layers[gap.after], "pre"), (student_stacks[gap.path][new], "pre")))
        else:
            points.append(((teacher_layers[len(teacher_layers) - 1], "out"), (student_stacks[gap.path][-1], "out")))
    return points


def check_pair(student: nn.Module, teacher: nn.Module, plan: PruningPlan) -> None:
    """ConfigError unless `student` is `teacher` with `plan`'s layers removed (same family, layer counts that fit)."""
    if family_of(student).name != family_of(teacher).name or type(student) is not type(teacher):
        raise ConfigError(f"the pruned model ({type(student).__name__}) and the teacher ({type(teacher).__name__}) "
                          "are not the same kind of model; heal a model with the dense model it was pruned from")
    student_stacks = dict(layer_stacks(student))
    for path, layers in layer_stacks(teacher):
        expected = len(layers) - len(removed_indices(path, list(plan.remove)))
        have = len(student_stacks.get(path, ()))
        if have != expected:
            raise ConfigError(f"the pruned model has {have} layers in {path}, but the teacher's {len(layers)} minus the plan's "
                              f"{len(layers) - expected} removed make {expected}; heal with the plan it was pruned by")
