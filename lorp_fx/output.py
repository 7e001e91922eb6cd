"""Writing results: an output directory that appears complete or not at all.

`save_pretrained_atomic` writes a checkpoint (model, tokenizer and extra files such
as report.json) into a hidden temporary sibling of the output directory and
renames it into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from .errors import OutputDirError


def save_pretrained_atomic(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    extra_files: dict[str, bytes | str] | None = None,
    overwrite: bool = False,
) -> Path:
    """`save_pretrained` model and tokenizer into `out_dir`, which appears complete or not at all.

    `extra_files` maps relative file names to contents (report.json, ...), or to a
    function that writes the file at the path it is given (a GGUF file is streamed
    that way rather than built in memory). An existing non-empty `out_dir` is
    refused unless `overwrite`.
    """

    def write(tmp: Path) -> None:
        if model is not None:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            _write_extra_file(tmp, name, content)

    return write_directory_atomic(out_dir, write, overwrite)


def write_directory_atomic(out_dir: str | os.PathLike, write, overwrite: bool = False) -> Path:
    """Call `write(tmp)` on a hidden temporary sibling of `out_dir`, then rename it into place.

    A crash or an error leaves no half-written `out_dir`.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    check_output_dir(out_dir, overwrite)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # os.mkdir (unlike tempfile.mkdtemp's 0700) gives the checkpoint the user's usual permissions.
        tmp = parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as error:
        raise OutputDirError(f"cannot write to {parent}: {error.strerror or error}") from error
    try:
        write(tmp)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a path that is a file, or a non-empty directory unless `overwrite`: before long work, too."""
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputDirError(f"output directory {out_dir} exists and is not empty; choose another or pass overwrite")
    parent = next((p for p in out_dir.parents if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        raise OutputDirError(f"cannot write to {parent}: permission denied")


def _write_extra_file(root: Path, name: str, content) -> None:
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise OutputDirError(f"extra file name {name!r} must be a relative path inside the output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    if callable(content):
        content(path)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    # Checked again: another process may have created out_dir while we were writing.
    check_output_dir(out_dir, overwrite)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        # rename(2) only replaces an empty directory: move the old one aside first.
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)  # replaces an empty out_dir too
