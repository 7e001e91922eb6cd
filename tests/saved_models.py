"""Tiny models saved as checkpoint directories, and calibration text they can read: what the CLI tests load."""

import atexit
import functools
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tiny_models import tiny_model, tiny_tokenizer


@functools.cache
def tiny_checkpoint(family: str = "llama", layers: int = 6) -> Path:
    """A tiny random `family` model and the tiny tokenizer saved once per test process (saving costs a second,
    a copy milliseconds); never hand it out itself: `saved_tiny` copies it."""
    root = Path(tempfile.mkdtemp(prefix="lorp-fx-tiny-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    tiny_model(family, layers=layers).save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    return root


def saved_tiny(root: Path, family: str = "llama", layers: int = 6, name: str | None = None) -> Path:
    """The tiny `family` checkpoint as a transformers directory of its own, `root / name` (default
    `family-layers`), which the test may change; an existing one is kept."""
    path = root / (name or f"{family}-{layers}")
    if not path.exists():
        shutil.copytree(tiny_checkpoint(family, layers), path)
    return path


def calibration_text(root: Path, words: int = 3000, seed: int = 0) -> Path:
    """Words of the tiny tokenizer's vocabulary, in random order (a text file)."""
    path = root / "calibration.txt"
    generator = random.Random(seed)
    path.write_text(" ".join(f"w{generator.randrange(90)}" for _ in range(words)))
    return path


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def similarity(out: Path) -> np.ndarray:
    return np.array(report(out)["similarity"])
