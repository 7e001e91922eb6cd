"""The key-value metadata at the head of a GGUF file, read without its tensors.

`transformers` and `gguf.GGUFReader` parse every tensor description too, which takes
seconds for a small model; the checks made before a model loads need only a few
numbers (context length, layer count, vocabulary size), which sit in the first part
of the file. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
(versions 2 and 3: little-endian, 64-bit counts).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from lorp_fx.core.errors import ModelLoadError

# value type -> struct format of one item (8: string, 9: array are read separately)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_metadata(path: str | Path) -> dict:
    """The file's metadata as {key: value}; an array becomes its length (enough for these checks)."""
    path = Path(path)
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(data)
    except (OSError, ValueError, struct.error) as error:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({error}); check the file") from None


def _parse(data) -> dict:
    if data[:4] != b"GGUF":
        raise ValueError("no GGUF magic number at the start")
    version, _tensors, count = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    offset, metadata = 24, {}
    for _ in range(count):
        key, offset = _string(data, offset)
        (kind,), offset = struct.unpack_from("<I", data, offset), offset + 4
        metadata[key], offset = _value(data, offset, kind)
    return metadata


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
