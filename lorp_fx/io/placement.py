"""Where a run computes: device, dtype, process count and device map, resolved and checked before any work.

    placement = resolve_placement(device="auto", dtype="auto")   # CUDA in bfloat16 where there is a GPU, else CPU float32
    model = place(model, placement)

Every check raises `DeviceError` with one line naming the problem and the fix (the
CLI prints it and exits 2). Nothing here creates a tensor on a fixed device: the
probes run on the device being checked.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

try:
    import accelerate  # optional: only --device-map needs it (resolve_placement says so in one line)
    import accelerate.utils
except ImportError:
    accelerate = None

from lorp_fx.core.errors import ConfigError, DeviceError, ModelLoadError, describe
from lorp_fx.io.models import finish_loading, load_weights, model_class

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STRATEGIES = ("ddp", "fsdp")
DEVICE_MAPS = ("auto",)
_DEVICE = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Placement:
    """A resolved device and dtype, and how a model is laid out on it.

    `device_map` "auto" spreads one model over the GPUs, the CPU and `offload_dir`
    (accelerate), within `max_memory` ({"cpu": "2GiB", 0: "20GiB"}).
    """

    device: torch.device
    dtype: torch.dtype
    device_map: str | None = None
    max_memory: dict | None = None
    offload_dir: str | None = None

    def describe(self) -> str:
        where = f"{self.device}" if self.device_map is None else f"device map {self.device_map} over {self.max_memory or 'all memory'}"
        return f"{where}, {str(self.dtype).removeprefix('torch.')}"


# --------------------------------------------------------------------------- device and dtype


def resolve_device(name: str = "auto") -> torch.device:
    """"auto": the first CUDA GPU, else MPS, else the CPU; an explicit device must exist and be usable."""
    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    match = _DEVICE.match(name)
    if match is None:
        raise DeviceError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise DeviceError(f"device {name} does not exist: the CPU is one device; use --device cpu")
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise DeviceError("device mps is not available (it needs Apple silicon and a torch built with MPS); use --device cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else " is built without CUDA")
        raise DeviceError(f"device {name} is not available: {build} and sees no CUDA GPU; use --device cpu or auto")
    count = torch.cuda.device_count()
    number = int(index or 0)
    if number >= count:
        raise DeviceError(f"device {name} does not exist: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", number)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on a GPU that runs it (float16 on one that does not), float32 on the CPU.

    An explicit dtype must run on the device: a few operations a transformer uses
    are tried there first (a CUDA GPU before Ampere has no bfloat16, for example).
    """
    name = str(name).strip().lower()
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; choose {', '.join(DTYPES)}")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if _cuda_bf16(device) else torch.float16
        if device.type == "mps":
            return torch.bfloat16 if _runs(device, torch.bfloat16) else torch.float32
        return torch.float32
    dtype = getattr(torch, name)
    if device.type == "cuda" and dtype == torch.bfloat16 and not _cuda_bf16(device):
        raise DeviceError(f"dtype bfloat16 does not run on {device} ({_cuda_name(device)}); use --dtype float16 or float32")
    if not _runs(device, dtype):
        raise DeviceError(f"dtype {name} does not run on {device}; use --dtype float32 (or auto)")
    return dtype


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _cuda_bf16(device: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch: no including_emulation
        return bool(torch.cuda.is_bf16_supported())


def _cuda_name(device: torch.device) -> str:
    try:
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    except Exception:  # noqa: BLE001 - only a description
        return "this GPU"


def _runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a linear layer, softmax, RMS norm and an embedding lookup run in `dtype` on `device`."""
    try:
        x = torch.ones(2, 8, dtype=dtype, device=device)
        weight = torch.ones(8, 8, dtype=dtype, device=device)
        y = torch.nn.functional.linear(x, weight).softmax(-1) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        torch.nn.functional.embedding(torch.zeros(2, dtype=torch.long, device=device), weight)
        return bool(torch.isfinite(y).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


# --------------------------------------------------------------------------- processes and device maps


def check_process_count(devices: int, device: torch.device) -> None:
    """`--devices N`: N processes, one per GPU, or one per CPU core on the CPU."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise DeviceError(f"--devices must be a whole number of processes >= 1, got {devices!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if devices > count:
            raise DeviceError(f"--devices {devices} asks for more GPUs than this machine has ({count}); use --devices {count} or fewer")
    elif device.type == "mps":
        if devices > 1:
            raise DeviceError("--devices: MPS is a single device, so only one process can use it; use --devices 1")
    else:
        cores = available_cores()
        if devices > cores:
            raise DeviceError(f"--devices {devices} asks for more CPU processes than this machine has cores ({cores}); use --devices {cores} or fewer")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_max_memory(text: str | None) -> dict | None:
    """"0=20GiB,cpu=30GiB" -> {0: 20 * 2**30, "cpu": 30 * 2**30}: the bytes each device may hold under
    --device-map (sizes in bytes, so accelerate reads every accepted spelling the same way). Each device
    once, and only devices this machine has: a GPU index below the GPU count, cpu, or mps where it runs."""
    if text is None:
        return None
    limits: dict = {}
    for part in str(text).split(","):
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        match = _SIZE.match(size)
        if not sep or not match:
            raise DeviceError(f"--max-memory entry {part.strip()!r} is not DEVICE=SIZE; write e.g. 0=20GiB,cpu=30GiB")
        if key.isdigit():
            key = int(key)
            if key >= torch.cuda.device_count():
                raise DeviceError(f"--max-memory names GPU {key}, but this machine has {torch.cuda.device_count()} CUDA "
                                  "GPU(s); name only devices it has")
        elif key == "mps":
            if not _mps_available():
                raise DeviceError("--max-memory names mps, which this machine does not have; name only devices it has")
        elif key != "cpu":
            raise DeviceError(f"--max-memory device {key!r} is not a GPU index, cpu or mps (disk takes what fits nowhere "
                              "else); write e.g. 0=20GiB,cpu=30GiB")
        if key in limits:
            raise DeviceError(f"--max-memory names {key} twice; give each device once")
        number, unit = match.groups()
        limits[key] = int(float(number) * _UNITS[(unit or "").lower()])
    return limits


def resolve_placement(device: str = "auto", dtype: str = "auto", *, devices: int | None = None, strategy: str = "ddp",
                      device_map: str | None = None, max_memory: str | None = None, offload_dir: str | None = None) -> Placement:
    """Every device option checked together, before a model is loaded."""
    resolved = resolve_device(device)
    if strategy not in STRATEGIES:
        raise DeviceError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if devices is None and strategy != "ddp":  # ddp is the default, also in recipes written without --devices
        raise DeviceError(f"--strategy {strategy} only applies with --devices N; add --devices or drop --strategy")
    if devices is not None and strategy == "fsdp" and resolved.type != "cuda":
        raise DeviceError(f"--strategy fsdp runs on CUDA GPUs only (Lightning refuses FSDP on {resolved.type}); use --strategy ddp here")
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise DeviceError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
        if devices is not None:
            raise DeviceError("--device-map spreads one model over devices inside one process; it does not combine with --devices")
        if accelerate is None:
            raise DeviceError("--device-map needs the accelerate package: pip install accelerate (or 'lorp-fx[gguf]')")
    elif max_memory is not None or offload_dir is not None:
        raise DeviceError("--max-memory and --offload-dir only apply with --device-map auto")
    if devices is not None:
        check_process_count(devices, resolved)
    return Placement(resolved, resolve_dtype(dtype, resolved), device_map, parse_max_memory(max_memory), offload_dir)


# --------------------------------------------------------------------------- models on devices


def place(model: nn.Module, placement: Placement) -> nn.Module:
    """The model in the placement's dtype, on its device or spread by its device map (in place where possible)."""
    if placement.device_map is None:
        return model.to(device=placement.device, dtype=placement.dtype)
    return dispatch(model.to(placement.dtype), placement)


def load_placed(source, tokenizer, placement: Placement, *, processes: bool = False) -> nn.Module:
    """The model of a checked `models.ModelSource`, loaded in the placement's dtype and put where it says.

    Loading keeps `models.load_weights`' rules (no remote code, tensors only, every
    tensor accounted for). With `processes` (several Lightning ranks) the model stays
    on the CPU: Lightning moves it to each rank's device. With a device map, a
    transformers checkpoint is loaded straight into place (weights that fit nowhere go
    to disk as they are read); a GGUF file is dequantized in CPU memory first, then spread.
    """
    if placement.device_map is not None and source.kind != "gguf":
        return _load_dispatched(source, tokenizer, placement)
    model = load_weights(source, placement.dtype, tokenizer)
    if processes:
        return model
    return place(model, placement)


def _load_dispatched(source, tokenizer, placement: Placement) -> nn.Module:
    """A transformers checkpoint loaded straight into its device map (weights that fit nowhere go to disk)."""
    offload_dir = offload_folder(placement.offload_dir)
    try:
        model, info = model_class(source.config).from_pretrained(
            source.location, dtype=placement.dtype, device_map=placement.device_map, max_memory=placement.max_memory,
            offload_folder=offload_dir, trust_remote_code=False, weights_only=True, output_loading_info=True,
        )
    except Exception as error:  # noqa: BLE001 - one line for any loading failure
        raise ModelLoadError(f"could not load {source.location} with --device-map {placement.device_map}: "
                             f"{describe(error)}") from error
    return finish_loading(model, info, source, tokenizer)


def offload_folder(parent: str | None) -> str:
    """A fresh, empty folder for this run's offloaded weights, removed when the process exits (it can hold a
    model's worth of weights): inside `parent` (--offload-dir, created if missing), else in the system's
    temporary folder. Never `parent` itself: accelerate reads any index.json it finds in the folder it is
    given, so weights that another run or model left there would be used silently."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    path = tempfile.mkdtemp(prefix="lorp-fx-offload-", dir=parent)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def dispatch(model: nn.Module, placement: Placement) -> nn.Module:
    """accelerate's device map: layers on the GPUs, then the CPU, then a fresh folder on disk, within max_memory."""

    no_split = getattr(model, "_no_split_modules", None) or []
    device_map = accelerate.infer_auto_device_map(model, max_memory=placement.max_memory, no_split_module_classes=no_split,
                                       dtype=placement.dtype)
    on_disk = [name for name, where in device_map.items() if where == "disk"]
    offload_dir = None
    if on_disk:
        # The model's own weights are written first: accelerate writes none when the whole model goes to disk
        # (the device map {"": "disk"}), and then looked for an index.json that was not there.
        offload_dir = offload_folder(placement.offload_dir)
        accelerate.utils.offload_state_dict(offload_dir, {key: tensor for key, tensor in model.state_dict().items()
                                         if any(name in ("", key) or key.startswith(name + ".") for name in on_disk)})
    model = accelerate.dispatch_model(model, device_map=device_map, offload_dir=offload_dir)
    model.hf_device_map = dict(device_map)
    return model


def check_offload_granularity(granularity: str) -> None:
    if granularity != "layer":
        raise ConfigError("--device-map prunes whole layers only (granularity layer): a sublayer cannot be skipped "
                          "inside an offloaded layer's forward; drop --granularity sublayer or --device-map")


def streamed_weights(model: nn.Module):
    """`fetch(name) -> tensor`: the model's parameter or buffer `name` (a full name, as a traced graph's
    attributes are named), read from accelerate's store where it is offloaded, where the store holds it (the
    runner brings it to its inputs' device). The store is read on every call and nothing is kept, so a graph
    run over an offloaded model holds what its forward would (`graph.runner.GraphRunner(fetch=...)`)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}

    def fetch(name: str) -> torch.Tensor:
        path, _, attribute = name.rpartition(".")
        module = model.get_submodule(path)
        value = getattr(module, attribute)
        if value.device.type != "meta":
            return value
        for owner_path in _ancestors(path):  # the hook that loads it: on its module, or above with place_submodules
            owner = model.get_submodule(owner_path)
            relative = name[len(owner_path) + 1:] if owner_path else name
            for align in _alignment_hooks(owner):
                store = getattr(align, "weights_map", None)
                if store is None:
                    continue
                try:  # not `in`: a Mapping's __contains__ would read the tensor to answer
                    return store[relative]
                except KeyError:
                    continue
        if name in tied:  # a tied head whose hook holds no copy of its own: the tensor it is tied to
            return fetch(tied[name])
        raise DeviceError(f"{name} is offloaded, and no accelerate hook of the model holds its value")

    return fetch


def _ancestors(path: str) -> list[str]:
    """`path` and each module above it, the root ("") last."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _alignment_hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [h for h in getattr(hook, "hooks", [hook]) if h is not None]  # a SequentialHook holds several


def make_resident(module: nn.Module) -> int:
    """Copy `module`'s offloaded weights in for good (so maps can be folded into them); the bytes made resident."""

    moved = 0
    for sub in module.modules():
        for align in _alignment_hooks(sub):
            if not getattr(align, "offload", False):
                continue
            for name, tensor in accelerate.utils.named_module_tensors(sub, include_buffers=align.offload_buffers, recurse=align.place_submodules):
                if tensor.device.type != "meta":
                    continue
                value = align.weights_map[name]
                accelerate.utils.set_module_tensor_to_device(sub, name, align.execution_device, value=value)
                moved += value.numel() * value.element_size()
            align.offload = False  # its hook now leaves the weights where they are
    return moved
