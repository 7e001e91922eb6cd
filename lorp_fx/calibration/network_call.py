"""One call of a network, its arguments named by the network's own signature.

A LightningModule's `validation_step` may call its network positionally
(`self.model(x)`), by keyword (`self.model(input_ids=x, use_cache=False)`) or both
(`self.model(x, attention_mask=m)`). Everything that reads a calibration call
(which input is the padding mask, which holds the token ids, what to trace with,
how to call the traced graph again for a calibration loss) reads a `NetworkCall`:
the call as it was made (`args`, `kwargs`) and the same arguments by parameter
name (`inputs`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lorp_fx.calibration.batches import accepts_argument
from lorp_fx.core.errors import InputMismatchError


@dataclass(frozen=True)
class NetworkCall:
    """`network(*args, **kwargs)`, and `inputs`: every argument under its parameter's name.

    Arguments a `*args` parameter collects have no name and stay in `args` only.
    """

    args: tuple
    kwargs: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    has_varargs: bool = False

    @classmethod
    def bind(cls, network: nn.Module, args: tuple, kwargs: dict) -> "NetworkCall":
        """Name the arguments of one call by `network.forward`'s signature; `use_cache=False` is added
        where the network takes it (a calibration pass needs no KV cache)."""
        kwargs = dict(kwargs)
        try:
            signature = inspect.signature(network.forward)
        except (TypeError, ValueError):  # no signature to read: only keywords have names
            return cls(tuple(args), kwargs, dict(kwargs), has_varargs=bool(args))
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise InputMismatchError(
                f"{type(network).__name__}.forward does not take this call ({error}); "
                "call the network the way its forward() is written"
            ) from None
        inputs: dict[str, Any] = {}
        has_varargs = False
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                has_varargs = has_varargs or bool(value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                inputs.update(value)
            else:
                inputs[name] = value
        if "use_cache" not in inputs and accepts_argument(network, "use_cache"):
            kwargs["use_cache"] = inputs["use_cache"] = False
        return cls(tuple(args), kwargs, inputs, has_varargs)

    @classmethod
    def keywords(cls, batch: dict) -> "NetworkCall":
        """A call made with keyword arguments only."""
        return cls((), dict(batch), dict(batch))

    # ------------------------------------------------------------------ reading

    def key(self) -> tuple:
        """What a traced graph is specific to: the argument structure, tensor ranks and every
        non-tensor value (a call with another key needs another trace)."""
        leaves, spec = pytree.tree_flatten((self.args, self.kwargs))
        shown = tuple(("tensor", leaf.dim()) if isinstance(leaf, torch.Tensor) else repr(leaf) for leaf in leaves)
        return str(spec), shown

    def example(self) -> dict | tuple:
        """Example inputs for `trace`: the arguments by name, or positionally for a `*args` forward."""
        if not self.has_varargs:
            return dict(self.inputs)
        if self.kwargs:
            raise InputMismatchError(
                "the network's forward(*args) cannot be traced from a call that also passes keyword arguments; "
                "call it with positional arguments only"
            )
        return tuple(self.args)

    def tensor_inputs(self) -> dict[str, torch.Tensor]:
        """The tensor arguments by name: what a `torch.export` graph takes (it fixed the others)."""
        tensors = {}
        for name, value in self.inputs.items():
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            elif any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value)):
                raise InputMismatchError(
                    f"the network's argument {name!r} is a {type(value).__name__} holding tensors, which "
                    "torch.export fixes into the graph as constants; pass its tensors as separate arguments"
                )
        return tensors

    def run(self, graph: torch.fx.GraphModule) -> Any:
        """Call a graph traced from the network the way the network was called."""
        if graph.meta.get("lorp_fx_frontend") == "export":
            return graph(**self.tensor_inputs())
        return graph(*self.args, **self.kwargs)

    def rows(self) -> int | None:
        """How many windows (rows) the call holds: the first dimension of its first tensor argument."""
        first = next((v for v in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(v, torch.Tensor) and v.dim()), None)
        return None if first is None else int(first.shape[0])

    def row(self, index: int) -> "NetworkCall":
        """The call on window `index` alone: every tensor whose first dimension is the call's rows, sliced."""
        rows = self.rows()

        def take(value):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
                return value[index : index + 1]
            return value

        args, kwargs, inputs = pytree.tree_map(take, (self.args, self.kwargs, self.inputs))
        return NetworkCall(args, kwargs, inputs, self.has_varargs)

    def detached(self) -> "NetworkCall":
        """A copy whose tensors are detached clones, safe to keep after the batch is gone."""
        clones: dict[int, torch.Tensor] = {}  # a tensor in both `kwargs` and `inputs` is cloned once

        def keep(value):
            if not isinstance(value, torch.Tensor):
                return value
            if id(value) not in clones:
                clones[id(value)] = value.detach().clone()
            return clones[id(value)]

        args, kwargs, inputs = pytree.tree_map(keep, (self.args, self.kwargs, self.inputs))
        return NetworkCall(args, kwargs, inputs, self.has_varargs)
