"""Activation capture for compensation: forward hooks that keep the residual states a fit needs.

A pass stops as soon as every state it needs has been captured, so fitting a gap
early in the model does not pay for the layers after it.
"""

from __future__ import annotations

import torch
from torch import nn

from lorp_fx.core.errors import CompensationError


def attach_state_hooks(points, store) -> list:
    """Hooks calling `store(key, state)` with the hidden state entering ("pre") or leaving ("out") each
    module of `points` ((key, module, kind) triples); the handles, for `remove()`. Shared by this
    capture and the statistics' `HookObserver`."""

    def before(key):
        return lambda module, args, kwargs: store(key, args[0] if args else kwargs.get("hidden_states"))

    def after(key):
        return lambda module, args, kwargs, output: store(key, output[0] if isinstance(output, (tuple, list)) else output)

    return [module.register_forward_pre_hook(before(key), with_kwargs=True) if kind == "pre"
            else module.register_forward_hook(after(key), with_kwargs=True) for key, module, kind in points]


class StopForward(Exception):
    """Raised from a hook once every state a pass needs has been read: the rest of the forward pass is skipped
    (`Capture` and `HookObserver` catch it)."""


class Capture:
    """Residual states by key: `points` maps a key to (module, "pre" | "out"), the input or output of that module."""

    def __init__(self, points: dict[str, tuple[nn.Module, str]]):
        self.points = points
        self.states: dict[str, torch.Tensor] = {}

    def run(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Run `model` on `batch` until every point is captured; the states by key."""
        self.states = {}
        handles = attach_state_hooks([(key, module, kind) for key, (module, kind) in self.points.items()], self._store)
        try:
            with torch.no_grad():
                model(**batch)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = set(self.points) - set(self.states)
        if missing:
            raise CompensationError(f"internal error: the forward pass never reached {sorted(missing)}")
        return self.states

    def _store(self, key: str, state) -> None:
        if not isinstance(state, torch.Tensor):
            raise CompensationError(f"internal error: the hook for {key} saw no hidden-state tensor")
        self.states[key] = state.detach()
        if len(self.states) == len(self.points):
            raise StopForward
