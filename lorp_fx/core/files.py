"""Reading a text file the user named (a plan, a recipe, calibration text): one line for each way it fails."""

from __future__ import annotations

import os
from pathlib import Path

from lorp_fx.core.errors import LoRPError


def read_text(path: str | os.PathLike, what: str, error: type[LoRPError]) -> str:
    """The UTF-8 text of `path`; `error` naming `what` (e.g. "plan file") and the problem where it cannot be read."""
    path = Path(path).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory; name a file") from None
    except (OSError, UnicodeDecodeError) as problem:
        raise error(f"cannot read {what} {path}: {problem}") from None
