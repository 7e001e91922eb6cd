"""Write a depth-pruned copy of a GGUF file: the kept layers' tensors byte for byte, renumbered.

`write_pruned_gguf(source, destination, removed, replaced)` drops layers from a GGUF
file without dequantizing anything. Kept layers' tensors are copied in their
original quantization types and renamed `blk.0..blk.N-1`; the embedding, output
norm and head are copied unchanged; every metadata key is kept byte for byte
except `<arch>.block_count`, the per-layer arrays (shortened) and the keys that
keep each kept layer's role (`gguf_layout.plan_metadata`). Compensated projections
(`replaced`) are requantized (`gguf_requant`).

The file is streamed: header, metadata and tensor infos first, then each
tensor's bytes in turn, into a hidden temporary file next to the destination
that replaces it only when complete. `read_gguf` validates a file cheaply (no
tensor data read) so a caller can check its input before any work.

GGUF layout (gguf-py's reader and llama.cpp's ggml/src/gguf.cpp agree): magic,
version (u32), tensor count (u64), metadata count (u64), the metadata, the tensor
infos (name, dims, type, offset into the data section), padding to
`general.alignment` (32 by default), then each tensor aligned likewise.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

from lorp_fx.core.errors import GGUFError, describe
from lorp_fx.io.gguf.layout import period_conflicts, plan_metadata
from lorp_fx.io.gguf.library import gguf, gguf_package
from lorp_fx.io.gguf.requant import requantize_replaced

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")
_COPY_CHUNK = 64 << 20  # bytes per write when copying a tensor: bounds memory, not speed
# transformers' GGUF loader renames these architectures before looking them up.
_TRANSFORMERS_ARCH_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


@dataclass
class GGUFSource:
    """A GGUF file opened and checked: its architecture, layer count, the metadata values used, and a reader."""

    path: Path
    architecture: str
    n_layers: int
    size: int
    meta: dict[str, Any]  # "<arch>.*" and other layer-related keys, as plain values
    stamp: tuple = ()  # (size, mtime_ns) when checked: a reader opened later must see the same file
    _reader: Any = dataclasses.field(default=None, repr=False)

    @property
    def reader(self):
        """The gguf.GGUFReader (memory-mapped: tensor data is read only when copied), opened again after
        `close`. Its parsed metadata (a vocabulary's strings as arrays) holds ~140 MB for SmolLM2, so the
        CLI closes it while the model is pruned and the writer reopens it."""
        if self._reader is None:

            try:
                stat = self.path.stat()
            except OSError as error:
                raise GGUFError(f"{self.path} cannot be read again to write the pruned GGUF ({error.strerror})") from None
            if (stat.st_size, stat.st_mtime_ns) != self.stamp:
                raise GGUFError(f"{self.path} changed while lorp-fx was pruning it; run again on the new file")
            self._reader = gguf.GGUFReader(self.path)
        return self._reader

    def close(self) -> None:
        """Drop the reader (and its parsed metadata); `reader` opens the file again when needed."""
        self._reader = None

    def layer_tensors(self) -> dict[int, list]:
        """Tensors of each block, by block index."""
        layers: dict[int, list] = {}
        for tensor in self.reader.tensors:
            match = _LAYER_TENSOR.match(tensor.name)
            if match:
                layers.setdefault(int(match.group(1)), []).append(tensor)
        return layers


@dataclass
class OutputTensor:
    """One tensor of the file being written: where its bytes come from (the source file, or `data`)."""

    name: str
    dims: tuple[int, ...]  # GGUF order: ne0 (the contiguous dimension) first
    qtype: Any  # gguf.GGMLQuantizationType
    n_bytes: int
    source_offset: int | None
    data: bytes | None = None


def read_gguf(path: str | os.PathLike) -> GGUFSource:
    """Open `path` and check that it is a complete GGUF file with a layer count; one-line GGUFError if not."""
    gguf_package()  # the optional extra, named where it is missing
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # noqa: BLE001 - every parse failure means the same thing to the user
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt: {describe(error)})") from error
    stat = path.stat()
    size = stat.st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise GGUFError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file")
    arch = _scalar(reader, "general.architecture")
    n_layers = _scalar(reader, f"{arch}.block_count") if arch else None
    if not arch or not isinstance(n_layers, int):
        raise GGUFError(f"{path} has no general.architecture or <arch>.block_count key, so it has no layers to remove")
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith(f"{arch}.") or k.startswith("xielu.")}
    source = GGUFSource(path, arch, n_layers, size, meta, (stat.st_size, stat.st_mtime_ns), reader)
    stray = sorted(i for i in source.layer_tensors() if i >= n_layers)
    if stray:
        raise GGUFError(f"{path} is corrupt: it has tensors of block {stray[0]} but {arch}.block_count is {n_layers}")
    return source


def missing_tensor_bytes(path: str | os.PathLike) -> int:
    """How many bytes the tensors of the GGUF file at `path` extend past its end (0 for a complete file, or one
    whose header cannot be read: that is reported elsewhere)."""
    try:
        reader = gguf_package().GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception:  # noqa: BLE001 - a header that does not parse says nothing about the tensors
        return 0
    return max(0, end - Path(path).stat().st_size)


def check_transformers_can_read(source: str | os.PathLike | GGUFSource) -> GGUFSource:
    """Raise a one-line GGUFError if transformers cannot load this file, or would load it wrongly.

    Wrongly: transformers' GGUF loader derives sliding-window layers from the
    period and ignores a per-layer `sliding_window_pattern` array, which a pruning
    that broke the period writes for llama.cpp.
    """
    # Imported here: transformers' GGUF module costs seconds to import, paid only by runs on a GGUF file.
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    src = source if isinstance(source, GGUFSource) else read_gguf(source)
    arch = src.architecture
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and _TRANSFORMERS_ARCH_NAMES.get(arch) not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(GGUF_SUPPORTED_ARCHITECTURES))
        raise GGUFError(f"transformers cannot load GGUF architecture {arch!r} ({src.path.name}); it loads: {supported}")
    conflicts = period_conflicts(arch, src.meta, src.n_layers)
    if conflicts:
        raise GGUFError(
            f"transformers would misread {src.path.name}: {conflicts[0]} and transformers uses the period; "
            "run this file with llama.cpp, or prune whole periods"
        )
    return src


def write_pruned_gguf(
    source: str | os.PathLike | GGUFSource,
    destination: str | os.PathLike,
    removed: list[int],
    replaced: Mapping[str, Any] | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
    requantize_as: str | None = None,
) -> dict:
    """Write `source` without the layers `removed` (0-based) to `destination`; return a report.

    `replaced` maps parameter names of the pruned transformers model
    ("model.layers.10.mlp.down_proj.weight") to new float tensors; each is
    requantized to its tensor's original type where the gguf package can write
    that type, else to Q8_0 (said in the report's `requantized` and `notes`);
    `requantize_as` ("Q8_0", ...) writes them in that type instead. `overwrite`
    allows replacing an existing `destination`.
    """
    src = source if isinstance(source, GGUFSource) else read_gguf(source)
    destination = _check_destination(Path(destination), overwrite)
    keep = _kept_layers(src, removed)
    edits = plan_metadata(src.architecture, src.meta, keep, src.n_layers)
    tensors = _output_tensors(src, keep)
    requantized, notes = [], list(edits.notes)
    if replaced:
        requantized = requantize_replaced(src, tensors, replaced, notes, requantize_as)
    header = _encode_header(src, edits.values, tensors)
    _write_atomic(destination, lambda out: _write_file(out, src, header, tensors, progress))
    return {
        "file": destination.name,
        "path": str(destination),
        "size_bytes": destination.stat().st_size,
        "input_file": src.path.name,
        "input_size_bytes": src.size,
        "architecture": src.architecture,
        "layers_before": src.n_layers,
        "layers_after": len(keep),
        "removed_layers": sorted({int(i) for i in removed}),
        "kept_layers": keep,
        "tensor_count": len(tensors),
        "tensor_types": dict(sorted(Counter(t.qtype.name for t in tensors).items())),
        "requantized": requantized,
        "metadata_changes": {k: _brief(v) for k, v in edits.values.items()},
        "notes": notes,
    }


def _kept_layers(src: GGUFSource, removed: list[int]) -> list[int]:
    not_ints = [i for i in removed if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if not_ints:
        raise GGUFError(f"layers to remove must be integer indices, got {not_ints[0]!r}")
    removed = {int(i) for i in removed}
    bad = sorted(i for i in removed if not 0 <= i < src.n_layers)
    if bad:
        raise GGUFError(f"cannot remove layer {bad[0]} from {src.path.name}: it has layers 0..{src.n_layers - 1}")
    keep = [i for i in range(src.n_layers) if i not in removed]
    if not keep:
        raise GGUFError(f"cannot remove all {src.n_layers} layers of {src.path.name}; keep at least one")
    return keep


def _output_tensors(src: GGUFSource, keep: list[int]) -> list[OutputTensor]:
    """The source tensors minus the removed layers', kept layers renamed to their new index, in file order."""
    new_index = {old: new for new, old in enumerate(keep)}
    tensors = []
    for tensor in src.reader.tensors:
        name = tensor.name
        match = _LAYER_TENSOR.match(name)
        if match:
            old = int(match.group(1))
            if old not in new_index:
                continue
            name = f"blk.{new_index[old]}.{match.group(2)}"
        dims = tuple(int(d) for d in tensor.shape)
        tensors.append(OutputTensor(name, dims, tensor.tensor_type, int(tensor.n_bytes), int(tensor.data_offset)))
    return tensors


# --------------------------------------------------------------------------- encoding


def _encode_header(src: GGUFSource, new_values: Mapping[str, Any], tensors: list[OutputTensor]) -> bytes:
    """Magic, counts, metadata (unchanged keys copied raw), tensor infos; not padded."""
    order = _byte_order(src)
    reader = src.reader
    version = int(reader.fields["GGUF.version"].parts[-1][0])
    kv = bytearray()
    n_kv = 0
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own entries for the header counts
            continue
        n_kv += 1
        if key in new_values:
            kv += _pack_string(key, order) + _pack_value(new_values[key], _types_for(new_values[key], field), order)
        else:
            end = field.offset + sum(int(part.nbytes) for part in field.parts)
            kv += bytes(reader.data[field.offset:end])
    for key, value in new_values.items():
        if key not in reader.fields:
            kv += _pack_string(key, order) + _pack_value(value, _types_for(value, None), order)
            n_kv += 1
    infos = bytearray()
    offset = 0
    for tensor in tensors:
        infos += _pack_string(tensor.name, order) + struct.pack(order + "I", len(tensor.dims))
        infos += struct.pack(order + f"{len(tensor.dims)}Q", *tensor.dims)
        infos += struct.pack(order + "IQ", int(tensor.qtype), offset)
        offset += _pad(tensor.n_bytes, reader.alignment)
    head = b"GGUF" + struct.pack(order + "IQQ", version, len(tensors), n_kv)
    return head + bytes(kv) + bytes(infos)


def _types_for(value: Any, field) -> list:
    """The key's own types where the new value has the same shape; a bool array or float32 for a new kind."""
    if field is not None and (field.types[0] == gguf.GGUFValueType.ARRAY) == isinstance(value, list):
        return list(field.types)
    if isinstance(value, list):  # a per-layer flag array replacing a scalar period (sliding_window_pattern)
        return [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL]
    return [gguf.GGUFValueType.FLOAT32]


def _pack_value(value: Any, types: list, order: str) -> bytes:
    """A typed metadata value (type tag included), in the file's own types."""
    main = types[0]
    if main == gguf.GGUFValueType.ARRAY:
        sub = types[1]
        items = b"".join(_pack_item(v, sub, order) for v in value)
        return struct.pack(order + "IIQ", main, sub, len(value)) + items
    return struct.pack(order + "I", main) + _pack_item(value, main, order)


def _pack_item(value: Any, vtype, order: str) -> bytes:
    if vtype == gguf.GGUFValueType.STRING:
        return _pack_string(value, order)
    formats = {
        gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H", gguf.GGUFValueType.INT16: "h",
        gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i", gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.UINT64: "Q",
        gguf.GGUFValueType.INT64: "q", gguf.GGUFValueType.FLOAT64: "d", gguf.GGUFValueType.BOOL: "?",
    }
    if vtype not in formats:
        raise GGUFError(f"cannot rewrite a metadata value of type {gguf.GGUFValueType(vtype).name}")
    return struct.pack(order + formats[vtype], value)


def _pack_string(text: str, order: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(order + "Q", len(raw)) + raw


def _byte_order(src: GGUFSource) -> str:
    return ">" if src.reader.endianess == gguf.GGUFEndian.BIG else "<"


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# --------------------------------------------------------------------------- writing


def _write_file(out, src: GGUFSource, header: bytes, tensors: list[OutputTensor], progress: bool) -> None:
    """Header, padding, then each tensor's bytes (aligned), copied in bounded chunks."""
    alignment = src.reader.alignment
    out.write(header)
    out.write(b"\0" * (_pad(len(header), alignment) - len(header)))
    total = sum(t.n_bytes for t in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing GGUF", disable=not progress) as bar:
        for tensor in tensors:
            if tensor.data is not None:
                out.write(tensor.data)
            else:
                for start in range(tensor.source_offset, tensor.source_offset + tensor.n_bytes, _COPY_CHUNK):
                    end = min(start + _COPY_CHUNK, tensor.source_offset + tensor.n_bytes)
                    out.write(memoryview(src.reader.data[start:end]))
            out.write(b"\0" * (_pad(tensor.n_bytes, alignment) - tensor.n_bytes))
            bar.update(tensor.n_bytes)


def _check_destination(destination: Path, overwrite: bool) -> Path:
    if destination.is_dir():
        raise GGUFError(f"GGUF output {destination} is a directory; give a file path ending in .gguf")
    if destination.exists() and not overwrite:
        raise GGUFError(f"GGUF output {destination} already exists; choose another path or allow overwriting")
    if not destination.parent.is_dir():
        raise GGUFError(f"cannot write {destination}: its directory {destination.parent} does not exist")
    return destination


def _write_atomic(destination: Path, write) -> None:
    """Run `write(file)` on a hidden temporary sibling, then rename it over `destination`; clean up on any failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the model from other users
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- small helpers


def _scalar(reader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


def _brief(value: Any) -> Any:
    """A metadata value short enough for a report."""
    if isinstance(value, list) and len(value) > 16:
        return value[:16] + ["..."]
    return value
