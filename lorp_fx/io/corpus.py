"""The calibration corpus shipped with lorp-fx: ordinary English prose, read without network.

`lorp_fx/io/data/general-english.txt` (about 300 KB, public domain: CIA World Factbook
country backgrounds and State of the Union addresses; lorp_fx/io/data/README.md gives the
sources, the licence and how it was built) is part of the default calibration text when
the user gives none (docs/compensation.md, "Calibration text"). Its SHA-256 is checked
on every read: a missing or damaged installation is one `CalibrationError` naming the
file, never a silent fallback to other text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lorp_fx.core.errors import CalibrationError

CORPUS_PATH = Path(__file__).resolve().parent / "data" / "general-english.txt"
CORPUS_SHA256 = "ecc2c664fb43b8683c9ec0f04ce1e5f77569e89cc9d8a45832b501c920624854"
CORPUS_NAME = "lorp-fx's general English corpus"
_REINSTALL = "reinstall lorp-fx, or pass --calib-file with text of your own"


def corpus_text(path: Path | None = None, sha256: str | None = None) -> str:
    """The shipped corpus (or the file `path` with digest `sha256`) as text, after checking that it is there
    and unchanged."""
    path, sha256 = path or CORPUS_PATH, sha256 or CORPUS_SHA256
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CalibrationError(f"the calibration corpus {path} cannot be read ({error.strerror or error}): "
                               f"the installation is incomplete; {_REINSTALL}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CalibrationError(f"the calibration corpus {path} is damaged (its SHA-256 is not the one lorp-fx shipped); "
                               f"{_REINSTALL}")
    return data.decode("utf-8")


def corpus_windows(tokenizer, n_samples: int, seq_len: int, path: Path | None = None,
                   sha256: str | None = None) -> torch.Tensor:
    """The first `n_samples` windows of `seq_len` tokens of the corpus (fewer where it holds fewer:
    the caller fills the rest with other text and says so), as a LongTensor."""
    ids = _ids(tokenizer, path, sha256)
    n = min(n_samples, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _ids(tokenizer, path: Path | None, sha256: str | None) -> list[int]:
    # verbose=False: the corpus is longer than any model's context; it is cut into windows.
    return list(tokenizer(corpus_text(path, sha256), add_special_tokens=False, verbose=False)["input_ids"])
