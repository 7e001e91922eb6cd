"""Saving a `transformers` model and its tokenizer as an output directory that appears complete or not at all.

The directory rules (where output may go, the temporary sibling, the atomic move) are `output_dir.py`'s,
which imports no torch: the crash tests run it in subprocesses that start in tens of milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from lorp_fx.core.errors import CallError, OutputDirError
from lorp_fx.core.model import is_offloaded
from lorp_fx.io.output_dir import write_directory_atomic


def save_pretrained_atomic(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    extra_files: dict[str, bytes | str] | None = None,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """`save_pretrained` model and tokenizer into `out_dir`, which appears complete or not at all.

    `extra_files` maps relative file names to contents (report.json, ...), or to a
    function that writes the file at the path it is given (a GGUF file is streamed
    that way rather than built in memory); they are written in order. An existing
    non-empty `out_dir` is replaced only with `overwrite` and only if lorp-fx wrote it.
    `protect` names inputs `out_dir` must not be or contain; the directory the model
    was loaded from (its `name_or_path`) is always protected.
    """
    _check_save_arguments(model, tokenizer, out_dir)
    loaded_from = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)

    def write(tmp: Path) -> None:
        if model is not None:
            _retie_offloaded(model)
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            _write_extra_file(tmp, name, content)

    protected = [*protect, *([loaded_from] if loaded_from and Path(str(loaded_from)).exists() else [])]
    return write_directory_atomic(out_dir, write, overwrite, protect=protected)


def _retie_offloaded(model) -> None:
    """Tie the head to the embeddings again where the config ties them and accelerate offloads the model: its hooks
    put a new meta tensor in each module after every forward pass, so the tie is lost and `save_pretrained` would
    write the head as a tensor of its own (the same values, twice the bytes)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if is_offloaded(model) and getattr(text, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()


def _check_save_arguments(model, tokenizer, out_dir) -> None:
    """CallError for arguments in another order or of the wrong kind (PruneResult.save takes (out_dir, tokenizer))."""
    if isinstance(model, (str, os.PathLike)):
        raise CallError("save_pretrained_atomic takes (model, tokenizer, out_dir), model first; "
                        f"got the path {os.fspath(model)!r} in the model's place")
    if model is not None and not callable(getattr(model, "save_pretrained", None)):
        raise CallError(f"model must have save_pretrained (a transformers model) or be None, got {type(model).__name__}")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise CallError(f"tokenizer must have save_pretrained (a transformers tokenizer) or be None, "
                        f"got {type(tokenizer).__name__}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise CallError(f"out_dir must be a path (str or pathlib.Path), got {type(out_dir).__name__}")


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
