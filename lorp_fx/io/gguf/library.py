"""llama.cpp's `gguf` package, an optional extra (`pip install 'lorp-fx[gguf]'`), imported in one place.

Every GGUF step calls `gguf_package()`, which names the missing extra in one line
instead of an ImportError from deep inside transformers.
"""

from __future__ import annotations

from types import ModuleType

from lorp_fx.core.errors import GGUFError

try:
    import gguf
except ImportError:  # the extra is not installed: say so where a GGUF file is first touched
    gguf = None


def gguf_package() -> ModuleType:
    """The `gguf` package, or GGUFError with the install command."""
    if gguf is None:
        raise GGUFError("reading or writing GGUF files needs the gguf package: pip install 'lorp-fx[gguf]'")
    return gguf
