"""The renames that put an output directory in place, and the clean-up after a crash.

Names. A run writes into `.NAME.lorpfx-tmp-HOST-PID-RAND` beside the output `NAME`
(HOST: 8 hex digits of the host name, so that a shared file system's other hosts'
runs are never taken for dead; PID: the writing process). The portable overwrite
moves the old output to `.NAME.lorpfx-old-HOST-PID-RAND` for a moment.

Guarantees. On Linux (glibc's `renameat2`, called through ctypes):

* exclusive rename (no overwrite): RENAME_NOREPLACE, so an output that appeared
  meanwhile is never replaced; an existing *empty* directory is replaced by rename(2),
  which the kernel refuses as soon as anything is in it (ENOTEMPTY);
* overwrite: RENAME_EXCHANGE swaps the new directory and the old one in one step, so
  the output is never missing; the old one, now under the temporary name, is checked
  (is it still lorp-fx's?) and deleted, or swapped back and the run refused.

Elsewhere, or on a file system that does not support those flags (EINVAL), the
portable fallback: rename(2) for the exclusive rename (POSIX: it replaces only a
missing or empty directory, so the guarantee is the same), and two renames for the
overwrite (old -> `lorpfx-old`, new -> output). A crash between those two renames
leaves the output missing until the next run for the same output restores the old
one (`recover`); a concurrent run that takes the name in that moment wins over the
old output, and is then replaced in turn.

Stale names. `recover` removes the temporary directories of dead processes of this
host and restores (when the output is missing) or removes their `lorpfx-old`
directories. A process is alive while `kill(pid, 0)` finds it and it is not a
zombie; a reused PID only delays the clean-up, it never deletes a live run's files.

`checkpoint(stage)` is the fault-injection hook of the tests: with
`LORP_FX_FAULT=stage:kill` the process kills itself with SIGKILL at that stage, with
`stage:wait=FILE` it creates `FILE.waiting-PID` and waits (up to a minute) for FILE to exist. It does nothing when
the variable is unset.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import time
import uuid
from pathlib import Path

from lorp_fx.core.errors import OutputDirError

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_KINDS = ("tmp", "old")
_ATTEMPTS = 5
# Bytes a temporary name adds to the output's name: "." + ".lorpfx-tmp-" + 8 + "-" + pid (<= 10) + "-" + 8.
NAME_OVERHEAD = 1 + 12 + 8 + 1 + 10 + 1 + 8
_renameat2 = None  # resolved on first use; False where unavailable


def temporary_name(name: str, kind: str) -> str:
    return f".{name}.lorpfx-{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.lorpfx-({'|'.join(_KINDS)})-([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{8}}$")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- renames


def rename_exclusive(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst` unless `dst` exists (an empty directory excepted): FileExistsError."""
    try:
        if _rename2(src, dst, RENAME_NOREPLACE):
            return
    except FileExistsError:
        pass  # perhaps an empty directory, which rename(2) replaces (and refuses once anything is in it)
    try:
        os.rename(src, dst)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise


def replace_directory(new: Path, out: Path, is_replaceable) -> None:
    """Put directory `new` at `out`, replacing what is there if `is_replaceable(it)`.

    The check is made on what was actually swapped out, so that something another
    process put at `out` after the caller's check is given back untouched
    (OutputDirError). When another run puts its output at `out` between two of our
    steps, that one is replaced in turn (a few attempts).
    """
    for _ in range(_ATTEMPTS):
        try:
            return _replace_once(new, out, is_replaceable)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "kept being replaced by other runs", str(out))


def _replace_once(new: Path, out: Path, is_replaceable) -> None:
    try:
        swapped = _rename2(new, out, RENAME_EXCHANGE)
    except FileNotFoundError:  # `out` is gone meanwhile: nothing to replace
        return rename_exclusive(new, out)
    if swapped:
        checkpoint("exchanged")
        old = new  # the swap put the old output under our temporary name
        if not is_replaceable(old):
            _give_back(old, out, exchange=True)
        checkpoint("before-delete")
        shutil.rmtree(old, ignore_errors=True)
        return None
    old = out.parent / temporary_name(out.name, "old")
    try:
        os.rename(out, old)
    except FileNotFoundError:
        return rename_exclusive(new, out)
    if not is_replaceable(old):
        _give_back(old, out, exchange=False)
    checkpoint("old-moved")
    try:
        rename_exclusive(new, out)
    except FileExistsError:  # another run's output took `out` between our renames: ours replaces it next
        shutil.rmtree(old, ignore_errors=True)
        raise
    checkpoint("before-delete")
    shutil.rmtree(old, ignore_errors=True)
    return None


def _give_back(old: Path, out: Path, exchange: bool) -> None:
    """Put back at `out` what was swapped out of it, and refuse the run (it was not lorp-fx's to replace)."""
    try:
        if not (exchange and _rename2(old, out, RENAME_EXCHANGE)):
            rename_exclusive(old, out)
        where = f"it was left at {out}"
    except OSError:
        kept = out.parent / temporary_name(out.name, "old")  # an "old" name: `recover` never deletes a foreign one
        os.rename(old, kept)
        where = f"it was moved to {kept}"
    raise OutputDirError(f"output directory {out} was replaced, while this run was writing, by a directory lorp-fx "
                         f"did not write; {where} and this run's result was discarded")


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False where unavailable; other errors raise OSError."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = _load_renameat2()
    if _renameat2 is False or os.environ.get("LORP_FX_PORTABLE_RENAME"):
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # flags unsupported by this file system
        return False
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), str(dst))
    if code == errno.ENOENT:
        raise FileNotFoundError(code, os.strerror(code), str(dst))
    raise OSError(code, os.strerror(code), str(dst))


def _load_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


# --------------------------------------------------------------------------- after a crash


def recover(out: Path, is_replaceable) -> None:
    """Clean up after dead runs for `out`: restore a lost output from its `lorpfx-old` copy, remove the rest.

    An `lorpfx-old` directory that `is_replaceable` does not accept (not lorp-fx's)
    is left where it is: never deleted.
    """
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return  # no parent yet: nothing to recover
    pattern, host = _pattern(out.name), _host()
    stale = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match and match.group(2) == host and not _alive(int(match.group(3))) and not entry.is_symlink():
            stale.append((match.group(1), entry))
    for kind, entry in sorted(stale, key=lambda item: item[0] != "old"):  # restore before deleting
        if kind == "old" and not os.path.lexists(out):
            try:
                rename_exclusive(entry, out)
                continue
            except OSError:
                pass
        if kind == "tmp" or is_replaceable(entry):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return True
    try:  # a killed child its parent has not waited for yet is a zombie: dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# --------------------------------------------------------------------------- fault injection (tests)


def checkpoint(stage: str) -> None:
    """The tests' fault-injection hook (module docstring); nothing unless LORP_FX_FAULT names `stage`."""
    spec = os.environ.get("LORP_FX_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        name, _, action = item.partition(":")
        if name != stage:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("wait="):
            Path(f"{action[5:]}.waiting-{os.getpid()}").touch()  # tells the test this run has arrived
            deadline = time.monotonic() + 60
            while not os.path.exists(action[5:]) and time.monotonic() < deadline:
                time.sleep(0.01)
