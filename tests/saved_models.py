"""Tiny models saved as checkpoint directories, and calibration text they can read: what the CLI tests load."""

import json
import random
from pathlib import Path

import numpy as np
from tiny_models import tiny_model, tiny_tokenizer


def saved_tiny(root: Path, family: str = "llama", layers: int = 6) -> Path:
    """A tiny random `family` model and the tiny tokenizer, saved under `root` (a transformers directory)."""
    path = root / f"{family}-{layers}"
    if not path.exists():
        tiny_model(family, layers=layers).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
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
