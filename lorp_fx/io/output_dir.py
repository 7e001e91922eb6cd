"""Writing results: an output directory that appears complete or not at all, and never costs the user data.

The rules (docs/safety.md states them for users):

* `--out` is resolved (symbolic links included) before any work and refused when it
  is empty, is or contains an input (the model, a calibration, eval or config file)
  or the current directory, cannot be created, or has a name too long for the file
  system. `overwrite` never overrides these.
* An existing non-empty directory is replaced only with `overwrite`, and only when
  lorp-fx wrote it: its `report.json` holds the `"lorp_fx"` marker key that every
  save adds (`is_lorp_fx_output`). Anything else is refused, with or without it.
* The result is written into a hidden temporary sibling (`.NAME.lorpfx-tmp-HOST-PID-RAND`)
  and moved into place by one rename (`atomic.py`): without `overwrite` an exclusive
  one that never replaces anything but an empty directory; with it, an atomic swap,
  after which the swapped-out directory is checked for the marker again (and swapped
  back if another process put something else there) before it is deleted.
* Temporary directories of processes that died are removed by the next run for the
  same output, and an overwrite interrupted between its two renames (portable
  fallback only) is restored, so the output is never left missing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from lorp_fx.core.errors import OutputDirError
from lorp_fx.core.version import __version__
from lorp_fx.io import atomic

MARKER = "lorp_fx"  # the key in report.json that says lorp-fx wrote a directory
REPORT = "report.json"


def write_directory_atomic(out_dir: str | os.PathLike, write, overwrite: bool = False, protect: Iterable = ()) -> Path:
    """Call `write(tmp)` on a hidden temporary sibling of `out_dir`, mark it, then move it into place.

    A crash or an error leaves no half-written `out_dir` (and a later run removes the
    temporary directory a crash left). Returns the resolved output directory.
    """
    out_dir = check_output_location(out_dir, overwrite, protect)
    tmp = _make_temporary(out_dir)
    try:
        atomic.checkpoint("tmp-created")
        write(tmp)
        atomic.checkpoint("written")
        stamp_report(tmp)
        atomic.checkpoint("stamped")
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: created above
        raise
    return out_dir


# --------------------------------------------------------------------------- where output may go


def check_output_location(out_dir, overwrite: bool, protect: Iterable = ()) -> Path:
    """The resolved output directory, or OutputDirError: call before any work, and again when saving.

    Refused: an empty name, a dangling or looping symbolic link, a name too long for
    the file system, a place that cannot be created or written, a path that is or
    contains one of `protect` or the current directory, an existing file, and an
    existing non-empty directory unless `overwrite` and lorp-fx wrote it. What dead
    runs for the same output left behind is cleaned up first (`atomic.recover`).
    """
    if out_dir is None or not str(out_dir).strip():
        raise OutputDirError("the output directory is empty (an unset shell variable?); name the directory to write")
    given = Path(os.path.expanduser(str(out_dir)))
    _check_lengths(given.absolute())  # first: a name too long makes every other system call fail
    if os.path.islink(given) and not os.path.exists(given):
        raise OutputDirError(f"output path {given} is a symbolic link to {os.readlink(given)}, which does not exist; "
                             "remove the link or point it at a directory")
    out = _resolve(given, "output path")
    _check_not_an_input(out, given, protect)
    _check_creatable(out)
    atomic.recover(out, _replaceable)  # a crashed earlier run: restore or remove what it left
    if out.is_dir() and _non_empty(out):
        if not overwrite:
            raise OutputDirError(f"output directory {out} exists and is not empty; choose another"
                                 " (or pass --overwrite / overwrite=True if lorp-fx wrote it)")
        if not is_lorp_fx_output(out):
            raise OutputDirError(f"output directory {out} was not written by lorp-fx (no {REPORT} with a "
                                 f"{MARKER!r} key), so it is never replaced, even with overwrite; choose another")
    elif out.exists() and not out.is_dir():
        raise OutputDirError(f"output path {out} exists and is not a directory; choose another")
    return out


def is_lorp_fx_output(directory: str | os.PathLike) -> bool:
    """True when `directory` holds a report.json (a regular file) with the lorp-fx marker key."""
    report = Path(directory) / REPORT
    if report.is_symlink() or not report.is_file():
        return False
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get(MARKER), dict)


def _replaceable(path: Path) -> bool:
    """What an overwrite may delete: a lorp-fx output, or an empty directory (nothing in it to lose)."""
    if path.is_symlink() or not path.is_dir():
        return False
    return is_lorp_fx_output(path) or not any(path.iterdir())


def stamp_report(directory: Path) -> None:
    """Add the marker to `directory`/report.json (creating it if absent): lorp-fx wrote this directory."""
    report = directory / REPORT
    data = {}
    if report.exists():
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict):
            raise OutputDirError(f"{REPORT} is where lorp-fx marks its output directories and must hold a JSON object")
    data = {MARKER: {"version": __version__, "format": 1}, **{k: v for k, v in data.items() if k != MARKER}}
    report.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _non_empty(directory: Path) -> bool:
    try:
        return any(directory.iterdir())
    except OSError as error:
        raise OutputDirError(f"cannot read output directory {directory}: {error.strerror or error}") from None


def _resolve(path: Path, what: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise OutputDirError(f"{what} {path} cannot be resolved ({error}); fix the symbolic links on the way") from None


def is_model_folder(path: Path) -> bool:
    """A `transformers` checkpoint's folder (what save_pretrained writes): output goes nowhere inside one. The
    folder that merely holds a .gguf file or a text file is not one (writing beside an input is fine)."""
    return path.is_dir() and (path / "config.json").is_file()


def _check_not_an_input(out: Path, given: Path, protect: Iterable) -> None:
    inputs = [(Path.cwd(), "the current directory")]
    for item in protect:
        if item is not None and str(item).strip():
            path = Path(os.path.expanduser(str(item))).absolute()
            inputs += [(path, f"the input {path}"), (_resolve(path, "input path"), f"the input {path}")]
    for path, what in inputs:
        if path == out or out in path.parents or path == given.absolute():
            relation = "is" if path == out else "contains"
            raise OutputDirError(f"output directory {out} {relation} {what}; writing there could destroy it, "
                                 "so it is refused even with overwrite: choose another output directory")
        if path in out.parents and is_model_folder(path) and what != "the current directory":
            # The same rule as --offload-dir: a model's folder is never written into.
            raise OutputDirError(f"output directory {out} lies inside {what}; lorp-fx does not write into an input "
                                 "directory: choose an output directory outside it")


def check_offload_location(offload_dir, out: Path | None, protect: Iterable = ()) -> Path:
    """`--offload-dir` resolved, or OutputDirError: not empty, not a file, creatable, and neither the output
    directory nor inside it (the output is replaced whole when written) nor inside an input. Only a fresh
    folder inside it is written (`devices.offload_folder`), removed when the run ends."""
    if not str(offload_dir).strip():
        raise OutputDirError("--offload-dir is empty (an unset shell variable?); name a folder, or leave the option out "
                             "for a temporary one")
    folder = _resolve(Path(os.path.expanduser(str(offload_dir))), "--offload-dir")
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"--offload-dir {folder} exists and is not a folder; name a folder")
    if out is not None and (folder == out or out in folder.parents):
        raise OutputDirError(f"--offload-dir {folder} is or lies inside the output directory {out}, which is written "
                             "whole at the end; put offloaded weights elsewhere")
    for item in protect:
        path = _resolve(Path(os.path.expanduser(str(item))), "input path")
        if folder == path or (path in folder.parents and is_model_folder(path)):
            raise OutputDirError(f"--offload-dir {folder} is or lies inside the input {path}; put offloaded weights elsewhere")
    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise OutputDirError(f"cannot create --offload-dir {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write to --offload-dir {folder}: permission denied in {existing}")
    return folder


def _check_creatable(out: Path) -> None:
    existing = next(p for p in (out, *out.parents) if os.path.lexists(p))
    if not existing.is_dir():
        if existing != out:
            raise OutputDirError(f"cannot create output directory {out}: {existing} is a file, not a directory")
        return  # out itself is a file: check_output_location says so
    writable_in = existing if existing != out else out.parent
    if not os.access(writable_in, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write to {writable_in}: permission denied (or a read-only file system)")


def _check_lengths(out: Path) -> None:
    """Every component within the file system's name limit, the last with room for the temporary name."""
    existing = next(p for p in out.parents if os.path.lexists(p))
    limit = _pathconf(existing, "PC_NAME_MAX", 255)
    for name in [p.name for p in (out, *out.parents) if p != existing and existing in p.parents]:
        if len(os.fsencode(name)) > limit:
            raise OutputDirError(f"output path component {name[:40]}... is {len(os.fsencode(name))} bytes; "
                                 f"the file system allows {limit}: choose a shorter name")
    room = limit - atomic.NAME_OVERHEAD
    if len(os.fsencode(out.name)) > room:
        raise OutputDirError(f"output directory name {out.name[:40]}... is {len(os.fsencode(out.name))} bytes; lorp-fx "
                             f"needs it to be at most {room} (the file system's {limit} less room for its temporary name)")
    if len(os.fsencode(str(out))) + atomic.NAME_OVERHEAD >= _pathconf(existing, "PC_PATH_MAX", 4096):
        raise OutputDirError(f"output path {str(out)[:60]}... is too long for the file system; choose a shorter one")


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError, AttributeError):
        return default


# --------------------------------------------------------------------------- writing


def _make_temporary(out_dir: Path) -> Path:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / atomic.temporary_name(out_dir.name, "tmp")
        tmp.mkdir()  # os.mkdir (unlike mkdtemp's 0700) gives the checkpoint the user's usual permissions
    except OSError as error:
        raise OutputDirError(f"cannot write to {out_dir.parent}: {error.strerror or error}") from error
    return tmp


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    try:
        # Not "overwrite and out_dir exists": in the portable fallback another run's output
        # is briefly missing between its two renames, and reappears before our rename.
        if overwrite:
            atomic.replace_directory(tmp, out_dir, is_replaceable=_replaceable)
        else:
            atomic.rename_exclusive(tmp, out_dir)
    except FileExistsError:
        raise OutputDirError(
            f"output directory {out_dir} appeared while this run was writing (another run?); it was left as it is "
            "and this run's result was discarded: choose another output directory, or pass overwrite"
        ) from None
