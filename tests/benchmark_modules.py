"""The benchmark scripts as modules, for the smoke tests (benchmarks/ is not a package)."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py imported under a private module name (registered, so dataclasses and pickling work)."""
    spec = importlib.util.spec_from_file_location(f"lorp_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
