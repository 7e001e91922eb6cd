"""The installed version of lorp-fx, recorded in every output directory it writes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorp-fx")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"
