"""Token windows for calibration and evaluation, from text files (the model's own text: `calibration/sampling.py`).

Windows from text are consecutive and start at the beginning of the text, so that
two runs on the same files see the same tokens (REFERENCE.md: "the first 32 x 256
tokens of valid.txt" is the first 8,192 tokens cut into 32 windows of 256).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lorp_fx.core.errors import CalibrationError
from lorp_fx.core.files import read_text


def shared_data_dir() -> Path | None:
    """`../shared/data` next to the repository (WikiText-2 and reference results), or None if absent."""
    path = Path(__file__).resolve().parents[3] / "shared" / "data"  # lorp_fx/io/text.py -> beside the checkout
    return path if path.is_dir() else None


def text_windows(tokenizer, paths, n_samples: int, seq_len: int) -> torch.Tensor:
    """The first `n_samples * seq_len` tokens of the files, as a (n_samples, seq_len) LongTensor.

    The files are read in order and joined (a newline is inserted where one does
    not end with a newline), then tokenized once as a single text, with no special
    tokens: no BOS per window or per file. Each window is a plain slice of
    running text, which is what perplexity on WikiText-2 is usually measured on.
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need at least 1 window of at least 2 tokens, got {n_samples} windows of {seq_len}")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    ids = text_tokens(tokenizer, paths)
    needed = n_samples * seq_len
    if len(ids) < needed:
        names = ", ".join(str(p) for p in paths)
        raise CalibrationError(
            f"{names} has {len(ids)} tokens, but {n_samples} windows of {seq_len} tokens need {needed}; "
            "give more text or ask for fewer or shorter windows"
        )
    return torch.tensor(ids[:needed], dtype=torch.long).view(n_samples, seq_len)


def text_head(paths, chars: int = 1_000_000) -> str:
    """The first `chars` characters of the files, undecodable bytes replaced (what a check of the text reads)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    parts = []
    for path in paths:
        with open(check_text_file(path), encoding="utf-8", errors="replace") as handle:
            parts.append(handle.read(max(0, chars - sum(len(p) for p in parts))))
    return "\n".join(parts)


def text_tokens(tokenizer, paths) -> list[int]:
    """The token ids of the files read in order and joined as one text (see `text_windows`), no special tokens."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise CalibrationError("no text file given")
    # verbose=False: a whole file is far longer than the model's context, and
    # the tokenizer would warn about it although we cut it into windows.
    return tokenizer(_read_texts(paths), add_special_tokens=False, verbose=False)["input_ids"]


_PATHS_ONLY = "text is read from files: pass the path of a file holding it, not the text itself"


def _short(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 80 else text[:77] + "..."


def check_text_file(path, what: str = "text file") -> Path:
    """`path` as a Path if it is a readable regular file; CalibrationError naming the problem otherwise.

    Cheap (no reading): the command line checks every input file before any work.
    """
    if path is None or not str(path).strip():
        raise CalibrationError(f"the {what} name is empty; name a text file")
    path = Path(path).expanduser()
    try:
        exists = path.exists()
    except OSError as error:  # a name too long for the file system, or otherwise unusable
        raise CalibrationError(f"{what} {_short(path)} cannot be a file name ({error.strerror}); {_PATHS_ONLY}") from None
    if not exists:
        hint = f"; {_PATHS_ONLY}" if "\n" in str(path) or len(str(path).split()) > 3 else ""  # looks like prose
        raise CalibrationError(f"{what} {_short(path)} does not exist{hint}")
    if path.is_dir():
        raise CalibrationError(f"{what} {path} is a directory; name a text file")
    if not os.access(path, os.R_OK):
        raise CalibrationError(f"cannot read {what} {path}: permission denied")
    return path


def _read_texts(paths: list) -> str:
    parts = []
    for path in paths:
        text = read_text(check_text_file(path), "text file", CalibrationError)
        if parts and not parts[-1].endswith("\n"):
            parts.append("\n")
        parts.append(text)
    return "".join(parts)
