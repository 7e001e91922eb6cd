"""What the benchmarks share: the machine and commit they ran on, the text options, markdown tables, safe file writes.

Imported by `benchmarks/quality.py` and `benchmarks/speed.py` (they put this folder on
`sys.path`); not part of the installed package.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def add_text_arguments(parser, batch_help: str | None = None) -> None:
    """The calibration and evaluation text options every quality benchmark takes: WikiText-2 from
    ../shared when it is there (calibrate on valid, evaluate on test), else they must be given."""
    from lorp_fx.io.text import shared_data_dir

    data = shared_data_dir()
    wikitext = data / "wikitext-2" if data is not None else None
    parser.add_argument("--calib-file", type=Path, default=wikitext / "valid.txt" if wikitext else None)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--eval-file", type=Path, default=wikitext / "test.txt" if wikitext else None)
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help=batch_help)


def git_commit() -> str:
    """`git rev-parse --short HEAD`, with "+ uncommitted changes" when the tree is dirty (read-only git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=30,
            check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(command: str | None = None) -> dict:
    """The machine, software and commit of a run; `command` is how the script was called."""
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_at_start": None if load is None else [round(x, 2) for x in load],
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def machine_markdown(info: dict) -> str:
    load = info.get("load_average_at_start")
    lines = [
        f"- commit: `{info['commit']}`",
        f"- date: {info['date']}",
        f"- machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}"
        + (f", load average at start {load[0]} / {load[1]} / {load[2]} (1 / 5 / 15 min)" if load else ""),
        f"- software: torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}",
    ]
    if info.get("command"):
        lines.append(f"- command: `python benchmarks/{info['command']}`")
    return "\n".join(lines)


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; None cells print empty."""
    def cell(value) -> str:
        return "" if value is None else str(value).replace("|", "\\|")

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write atomically (readers never see half a file), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


NOTES_HEADING = "## Notes"
NOTES_MARKER = "<!-- notes: hand-written, kept when the script rewrites this file -->"


def png_bytes(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes (for `write_bytes`), the figure closed."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def kept_notes(path: str | os.PathLike) -> str | None:
    """The hand-written notes section of an existing results file (from NOTES_MARKER on), if any."""
    path = Path(path)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    at = text.find(NOTES_MARKER)
    if at < 0:
        return None
    start = text.rfind(NOTES_HEADING, 0, at)
    return text[start if start >= 0 else at :].rstrip() + "\n"


def fmt_ppl(value: float | None) -> str:
    if value is None:
        return ""
    if math.isnan(value):
        return "nan"
    if value >= 1e5:
        return f"{value:.2e}"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if value < 1 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def median(values) -> float:
    values = sorted(values)
    n = len(values)
    if not n:
        return float("nan")
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2
