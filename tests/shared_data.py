"""Access to ../shared/data (WikiText-2, reference results), which lives beside the checkout, not in it."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_shared_data(*parts: str) -> Path:
    """Path under ../shared/data; skips where it is absent (a fresh clone), fails where CI is set."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"{path} is absent: these tests read the project's shared data (../shared/data beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return path
