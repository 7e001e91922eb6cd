"""Shared pieces of the research scripts for issue 14 (robust default selector, chosen with compensation).

Protocol (../shared/REFERENCE.md, benchmarks/results/quality-smollm2.md): SmolLM2-135M-Instruct,
fp32 on CPU, one torch thread. Calibration: the first 32 x 256 tokens of WikiText-2 valid.txt
("wiki") or 32 x 256 tokens the model samples itself (`lorp_fx.calibration.sampling.self_calibration`, seed 0:
"self"). Candidate losses on the first 8 calibration windows. Reported, never used for a
decision:
  * test      : perplexity on the first 40 x 512 tokens of test.txt (the benchmark's numbers);
  * test-held : test windows 40..79 x 512.
  * self-held : self-generated windows 32..63 (seed 0), for research/calibration_domain.py.
Used for decisions besides the calibration loss:
  * valid-held: 40 x 512 tokens of valid.txt from token 32,768 on (past any calibration
    window used here: 64 x 256 = 16,384 at most).

Everything expensive is memoised in research/cache/ (git-ignored): calibration windows
(self-generated ones), statistics, measured losses and perplexities.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "research" / "cache"
DATA = Path("/work/shared/data/wikitext-2")
sys.path.insert(0, str(ROOT))

from lorp_fx.judge.candidates import CandidateLoss  # noqa: E402

HELD_VALID_START = 32768
_STATE: dict = {}


def threads(n: int = 1) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def model():
    """(model, tokenizer), loaded once per process."""
    if "model" not in _STATE:
        from lorp_fx.io.models import load_model

        _STATE["model"] = load_model("smollm2-135m")
    return _STATE["model"]


def token_ids(name: str) -> torch.Tensor:
    key = f"ids:{name}"
    if key not in _STATE:
        _, tok = model()
        text = (DATA / f"{name}.txt").read_text(encoding="utf-8")
        _STATE[key] = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    return _STATE[key]


def slice_windows(name: str, start: int, n: int, length: int) -> torch.Tensor:
    ids = token_ids(name)
    return ids[start : start + n * length].view(n, length)


def calibration(source: str, n: int = 32, length: int = 256) -> torch.Tensor:
    """Calibration windows: "wiki" (the first n x length tokens of valid.txt) or "self" (seed 0)."""
    if source == "wiki":
        return slice_windows("valid", 0, n, length)
    if source != "self":
        raise ValueError(source)
    # Window i depends on (seed, i) only, so the first n of 64 are the n windows asked alone.
    CACHE.mkdir(parents=True, exist_ok=True)
    total = max(n, 64)
    path = CACHE / f"self_{total}x{length}.pt"
    if not path.exists():
        from lorp_fx.calibration.sampling import self_calibration

        m, tok = model()
        clock = time.perf_counter()
        windows = self_calibration(m, tok, total, length, seed=0, progress=False)
        torch.save({"windows": windows, "seconds": time.perf_counter() - clock}, path)
    return torch.load(path)["windows"][:n]


def evaluation(which: str) -> torch.Tensor:
    if which == "test":
        return slice_windows("test", 0, 40, 512)
    if which == "test-held":
        return slice_windows("test", 40 * 512, 40, 512)
    if which == "valid-held":
        return slice_windows("valid", HELD_VALID_START, 40, 512)
    if which == "self-held":  # self-generated windows past every calibration window used here (32 x 256)
        return calibration("self", 64)[32:64]
    raise ValueError(which)


def batches(windows: torch.Tensor, size: int = 4) -> list[dict]:
    return [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in windows.split(size)]


def graph():
    """The traced graph of the dense model (traced once per process)."""
    if "graph" not in _STATE:
        from lorp_fx.graph.trace import trace

        m, _ = model()
        example = batches(calibration("wiki", 4))[0]
        _STATE["graph"] = trace(m, dict(example, use_cache=False))
    return _STATE["graph"]


def statistics(source: str, n: int = 32, length: int = 256):
    """LayerStatistics of the calibration windows (collect_statistics), memoised on disk."""
    from lorp_fx.core.stats import LayerStatistics

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"stats_{source}_{n}x{length}.json"
    if path.exists():
        return LayerStatistics.from_dict(json.loads(path.read_text()))
    from lorp_fx.calibration.graph_observer import collect_statistics

    m, _ = model()
    stats, _ = collect_statistics(m, batches(calibration(source, n, length)), progress=False)
    path.write_text(json.dumps(stats.to_dict()))
    return stats


class Memo:
    """A JSON dict on disk (research/cache/<name>.json), re-read before every write."""

    def __init__(self, name: str):
        CACHE.mkdir(parents=True, exist_ok=True)
        self.path = CACHE / f"{name}.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        fresh = json.loads(self.path.read_text()) if self.path.exists() else {}
        fresh[key] = value
        self.data = fresh
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(fresh, indent=0))
        tmp.replace(self.path)


def emit(row: dict, rows: list) -> None:
    """Print a measured row as a JSON line (so a long run shows its progress) and keep it for the report."""
    print(json.dumps(row), flush=True)
    rows.append(row)


def set_key(indices) -> str:
    return ",".join(str(i) for i in sorted(indices))


def layer_names(indices) -> list[str]:
    return [f"model.layers.{i}" for i in sorted(indices)]


def layer_indices(names) -> list[int]:
    return sorted(int(str(n).rsplit(".", 1)[1]) for n in names)


def evaluator(source: str, n: int = 32, compensation: str | None = "cosine", loss_windows: int = 8, **options):
    """A CandidateLoss on the calibration windows (one caching pass), kept per process."""
    key = ("evaluator", source, n, compensation, loss_windows, tuple(sorted(options.items())))
    if key not in _STATE:
        _STATE[key] = CandidateLoss(graph(), batches(calibration(source, n)), loss_windows=loss_windows,
                                    compensation=compensation, **options)
    return _STATE[key]


class MemoLoss:
    """loss_fn(names) answered from the disk memo when known, else measured (and stored).

    `mode` is "plain" (uncompensated) or "cosine" (dense-view cosine maps). Counts the
    questions asked and the measurements made."""

    def __init__(self, source: str, mode: str, n: int = 32, loss_windows: int = 8, replay: bool = True):
        self.source, self.mode, self.n, self.loss_windows, self.replay = source, mode, n, loss_windows, replay
        self.memo = Memo(f"loss_{source}_{n}_{loss_windows}")
        self.asked = 0
        self.computed = 0

    @property
    def evaluator(self) -> CandidateLoss:
        return evaluator(self.source, self.n, "cosine", self.loss_windows)

    def __call__(self, names) -> float:
        self.asked += 1
        key = f"{self.mode}:{set_key(layer_indices(names))}"
        value = self.memo.get(key) if self.replay else None
        if value is None:
            value = self.evaluator.loss(names, compensate=self.mode == "cosine")
            self.computed += 1
            self.memo.put(key, value)
        return float(value)


def perplexity(indices, fits=None, which: str = "test", tag: str = "plain") -> float:
    """Perplexity of the model without `indices`, with `fits` folded in (memoised under `tag`)."""
    memo = Memo("ppl")
    key = f"{which}:{tag}:{set_key(indices)}"
    if memo.get(key) is not None:
        return memo.get(key)
    from lorp_fx.compensation.fit import apply_compensation
    from lorp_fx.judge.perplexity import perplexity as ppl
    from lorp_fx.arch.surgery import remove_layers

    m, _ = model()
    names = layer_names(indices)
    pruned = remove_layers(m, names) if indices else None
    if fits:
        apply_compensation(pruned, names, fits)
    value = ppl(pruned.model if pruned is not None else m, evaluation(which), batch_size=4, progress=False)
    memo.put(key, value)
    return value
