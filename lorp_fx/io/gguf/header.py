"""The key-value metadata at the head of a GGUF file, read without its tensors.

`transformers` and `gguf.GGUFReader` parse every tensor description too, which takes
seconds for a small model; the checks made before a model loads need only a few
numbers (context length, layer count, vocabulary size), which sit in the first part
of the file. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
(versions 2 and 3: little-endian, 64-bit counts).
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from lorp_fx.core.errors import ModelLoadError
from lorp_fx.io.gguf.library import gguf

# value type -> struct format of one item (8: string, 9: array are read separately)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_metadata(path: str | Path) -> dict:
    """The file's metadata as {key: value}; an array becomes its length (enough for these checks). A file cut
    short, in its header or in its tensor data, is refused here, in one line."""
    path = Path(path)
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            metadata, offset, tensors = _parse(data)
            needed = _tensor_data_end(data, offset, tensors, metadata.get("general.alignment", 32))
            if needed is not None and needed > len(data):
                raise ModelLoadError(f"GGUF file {path} is truncated: its tensors need {needed - len(data):,} more "
                                     f"bytes than its {len(data):,}; the download or copy did not finish")
            return metadata
    except struct.error:  # a read past the end: the file stops inside its header
        raise ModelLoadError(f"GGUF file {path} is truncated: it ends at {path.stat().st_size:,} bytes, inside its "
                             "header; the download or copy did not finish") from None
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({error}); check the file") from None


def _parse(data) -> dict:
    if data[:4] != b"GGUF":
        raise ValueError("no GGUF magic number at the start")
    version, tensors, count = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    offset, metadata = 24, {}
    for _ in range(count):
        key, offset = _string(data, offset)
        (kind,), offset = struct.unpack_from("<I", data, offset), offset + 4
        metadata[key], offset = _value(data, offset, kind)
    return metadata, offset, tensors


def _tensor_data_end(data, offset: int, count: int, alignment: int) -> int | None:
    """Where the last tensor's data ends, from the tensor descriptions after the metadata (None where a tensor
    type's block size is unknown: the `gguf` extra is missing, or the type is newer than it)."""
    if gguf is None:
        return None
    end = 0
    for _ in range(count):
        _, offset = _string(data, offset)
        (dims,) = struct.unpack_from("<I", data, offset)
        shape = struct.unpack_from(f"<{dims}Q", data, offset + 4)
        kind, start = struct.unpack_from("<IQ", data, offset + 4 + 8 * dims)
        offset += 4 + 8 * dims + 12
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            return None
        end = max(end, start + math.prod(shape) // block * size)
    data_start = -(-offset // alignment) * alignment
    return data_start + end

def _string(data, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, offset)
    start = offset + 8
    return bytes(data[start : start + length]).decode("utf-8", errors="replace"), start + length


def _value(data, offset: int, kind: int):
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, data, offset)[0], offset + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(data, offset)
    if kind == _ARRAY:
        item_kind, length = struct.unpack_from("<IQ", data, offset)
        offset += 12
        if item_kind in _SCALARS:
            return length, offset + length * struct.calcsize(_SCALARS[item_kind])
        for _ in range(length):
            _, offset = _value(data, offset, item_kind)
        return length, offset
    raise ValueError(f"unknown GGUF value type {kind}")
