"""A memo of `torch.export.export` for the test processes: the same module tree and input shapes, one export.

torch.export takes 2 to 3 s for a tiny transformers model (dynamic sizes, non-strict tracing), and the suite
exports the same tiny models with inputs of the same shapes again and again: over a hundred exports in the two xdist
workers, a third of the suite's time. The library runs unchanged; only the tracer's answer is remembered.

What makes two calls "the same" is everything an export can read:
* the module tree: each module's name, class, the code of its `forward`, its simple attributes (ints, floats,
  strings, ...) and its `config` where it has one;
* every parameter and buffer: name, shape, dtype, device and requires_grad;
* the inputs: names, shapes and dtypes, the values of non-tensor inputs, the dynamic-shape spec and the
  other options.
Values of tensors are not part of it: export traces with fake tensors, which have shapes and no values
(a data-dependent branch on a value fails to export, it is never baked in), so a graph is the same for
any weights and inputs of those shapes. A module with hooks, or a `forward` patched on an instance, is
never memoised.

A hit hands back the remembered ExportedProgram with its state rebound to the *current* module's
parameters and buffers (the same tensor objects, as a fresh export's are), so a graph still shares its
weights with the model it was traced from. `tests/test_export_cache.py` checks both halves: a hit equals a
fresh export and computes with the current weights, and another tree, other input shapes, another fixed
argument, a patched forward or a hook misses.

Off with `LORP_FX_TEST_EXPORT_CACHE=0`.
"""

from __future__ import annotations

import copy
import hashlib
import os

import torch
from torch import nn

SIMPLE = (int, float, str, bool, type(None))

_memo: dict[str, torch.export.ExportedProgram] = {}
counts = {"hits": 0, "misses": 0, "skipped": 0}


def enabled() -> bool:
    return os.environ.get("LORP_FX_TEST_EXPORT_CACHE", "1") != "0"


def _tensor_digest(h, tensor: torch.Tensor) -> None:
    h.update(f"{tuple(tensor.shape)}|{tuple(tensor.stride())}|{tensor.dtype}|{tensor.device.type}|{tensor.requires_grad}".encode())


def _simple(value) -> bool:
    return isinstance(value, SIMPLE) or (isinstance(value, tuple) and all(isinstance(v, SIMPLE) for v in value))


def _module_digest(h, module: nn.Module) -> bool:
    """Feed the module tree into `h`; False where the module must not be memoised."""
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return False
    for name, sub in module.named_modules(remove_duplicate=False):
        if sub._forward_hooks or sub._forward_pre_hooks or "forward" in sub.__dict__:
            return False
        forward = type(sub).forward
        code = getattr(forward, "__code__", None)
        h.update(f"{name}|{type(sub).__module__}.{type(sub).__qualname__}|{id(code)}|{sub.training}".encode())
        attrs = sorted((k, repr(v)) for k, v in vars(sub).items() if not k.startswith("_") and _simple(v))
        h.update(repr(attrs).encode())
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            h.update(config.to_json_string(use_diff=False).encode())
            h.update(repr(getattr(config, "_attn_implementation", None)).encode())
    bound = getattr(module, "_model_forward", None)  # lorp_fx's wrapper calls the model's own forward
    if bound is not None:
        if "forward" in getattr(getattr(bound, "__self__", None), "__dict__", {}):
            return False
        h.update(f"{id(getattr(getattr(bound, '__func__', bound), '__code__', None))}".encode())
        h.update(repr(sorted((k, repr(v)) for k, v in getattr(module, "_fixed", {}).items())).encode())
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        h.update(name.encode())
        _tensor_digest(h, tensor)
    return True


def _key(module: nn.Module, args, kwargs, options: dict) -> str | None:
    if not isinstance(module, nn.Module):
        return None
    h = hashlib.blake2b(digest_size=20)
    if not _module_digest(h, module):
        return None
    for part in (tuple(args or ()), dict(kwargs or {})):
        items = enumerate(part) if isinstance(part, tuple) else sorted(part.items())
        for name, value in items:
            h.update(repr(name).encode())
            if isinstance(value, torch.Tensor):
                _tensor_digest(h, value)
            elif _simple(value):
                h.update(repr(value).encode())
            else:
                return None
    h.update(repr(sorted((k, repr(v)) for k, v in options.items())).encode())
    h.update(repr(torch.is_grad_enabled()).encode())
    return h.hexdigest()


def _rebound(program: torch.export.ExportedProgram, module: nn.Module) -> torch.export.ExportedProgram:
    """`program` with its parameters, buffers and non-persistent buffers taken from `module` by name."""
    current = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
    copied = copy.copy(program)
    copied._state_dict = {name: current[name] for name in program.state_dict}
    copied._constants = {name: current.get(name, value) for name, value in program.constants.items()}
    return copied


def memoised(export):
    """`export`, remembering its answer per `_key`."""

    def cached_export(mod, args=(), kwargs=None, **options):
        key = _key(mod, args, kwargs, options) if enabled() else None
        if key is None:
            counts["skipped"] += 1
            return export(mod, args, kwargs, **options)
        if key in _memo:
            counts["hits"] += 1
            return _rebound(_memo[key], mod)
        counts["misses"] += 1
        program = export(mod, args, kwargs, **options)
        _memo[key] = program
        return program

    cached_export.__wrapped__ = export
    return cached_export
