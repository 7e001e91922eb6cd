"""The tests that compare numbers with a reference (marker `numeric`), once under each set of CPU kernels torch
has on this machine: `ATEN_CPU_CAPABILITY=default`, `avx2` and, where the CPU has it, `avx512`.

    python tests/numeric_kernels.py [more pytest arguments, or test files]

float32 results round differently under each (vectorised reductions sum in another order), so a tolerance
that holds on one machine can fail on the next (issue 29). One pytest run with one xdist worker per
capability (`--dist each`: every test in every worker); tox runs it before the whole suite.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

# What torch needs for its AVX2 and AVX512 kernels (aten/src/ATen/native/DispatchStub.cpp, via cpuinfo).
NEEDS = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def capabilities() -> list[str]:
    """`default` everywhere; the vector kernel sets this x86 CPU runs."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    flags = cpu_flags()
    return ["default", *(name for name, needed in NEEDS.items() if needed <= flags)]


def numeric_test_files() -> list[str]:
    """The test files that hold numeric tests: collecting only these spares each worker the other imports."""
    here = Path(__file__).resolve().parent
    return [str(path) for path in sorted(here.glob("test_*.py")) if "pytest.mark.numeric" in path.read_text()]


def main(argv: list[str]) -> int:
    found = capabilities()
    workers = [f"--tx=popen//env:ATEN_CPU_CAPABILITY={name}" for name in found]
    workers_named = ", ".join(f"gw{i}: {name}" for i, name in enumerate(found))  # xdist numbers them in --tx order
    print(f"numeric tests under each ATEN_CPU_CAPABILITY ({workers_named})", flush=True)
    command = [sys.executable, "-m", "pytest", "-m", "numeric", "-p", "xdist", "--dist=each", *workers,
               "-q", "-p", "no:cacheprovider", *argv]
    if not any(arg.endswith(".py") or "::" in arg for arg in argv):  # no tests named: every numeric one
        command += numeric_test_files()
    return subprocess.call(command, cwd=Path(__file__).resolve().parents[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
