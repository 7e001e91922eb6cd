"""Token windows for calibration and evaluation: from text files, or sampled from the model itself.

Windows from text are consecutive and start at the beginning of the text, so that
two runs on the same files see the same tokens (REFERENCE.md: "the first 32 x 256
tokens of valid.txt" is the first 8,192 tokens cut into 32 windows of 256).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import CalibrationError


def shared_data_dir() -> Path | None:
    """`../shared/data` next to the repository (WikiText-2 and reference results), or None if absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


def text_windows(tokenizer, paths, n_samples: int, seq_len: int) -> torch.Tensor:
    """The first `n_samples * seq_len` tokens of the files, as a (n_samples, seq_len) LongTensor.

    The files are read in order and joined (a newline is inserted where one does
    not end with a newline), then tokenized once as a single text, with no special
    tokens: no BOS per window or per file. Each window is a plain slice of
    running text, which is what perplexity on WikiText-2 is usually measured on.
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need at least 1 window of at least 2 tokens, got {n_samples} windows of {seq_len}")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise CalibrationError("no text file given")
    text = _read_texts(paths)
    # verbose=False: a whole file is far longer than the model's context, and
    # the tokenizer would warn about it although we cut it into windows.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    needed = n_samples * seq_len
    if len(ids) < needed:
        names = ", ".join(str(p) for p in paths)
        raise CalibrationError(
            f"{names} has {len(ids)} tokens, but {n_samples} windows of {seq_len} tokens need {needed}; "
            "give more text or ask for fewer or shorter windows"
        )
    return torch.tensor(ids[:needed], dtype=torch.long).view(n_samples, seq_len)


def check_text_file(path, what: str = "text file") -> Path:
    """`path` as a Path if it is a readable regular file; CalibrationError naming the problem otherwise.

    Cheap (no reading): the command line checks every input file before any work.
    """
    if path is None or not str(path).strip():
        raise CalibrationError(f"the {what} name is empty; name a text file")
    path = Path(path).expanduser()
    if not path.exists():
        raise CalibrationError(f"{what} {path} does not exist")
    if path.is_dir():
        raise CalibrationError(f"{what} {path} is a directory; name a text file")
    if not os.access(path, os.R_OK):
        raise CalibrationError(f"cannot read {what} {path}: permission denied")
    return path


def _read_texts(paths: list) -> str:
    parts = []
    for path in paths:
        path = check_text_file(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CalibrationError(f"cannot read text file {path}: {error}") from None
        if parts and not parts[-1].endswith("\n"):
            parts.append("\n")
        parts.append(text)
    return "".join(parts)


@torch.no_grad()
def self_calibration(
    model,
    tokenizer,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """Calibration windows sampled from the model itself, as a (n_samples, seq_len) LongTensor.

    Each window starts with the BOS token (EOS when the tokenizer has no BOS) and
    continues with `seq_len - 1` tokens sampled with `temperature` and nucleus
    `top_p` (REFERENCE.md: temperature 1.0, top-p 0.95, seed 0). Sampling goes on
    past an EOS, as in concatenated pretraining text, so that every window is full.

    Window i draws from its own random generator, seeded from (seed, i): the
    result depends on the seed, not on `batch_size` or `n_samples` (the first 8
    windows of 32 are the 8 windows asked alone), and the global torch random
    state is left alone. (Different batch sizes can change logits in the last
    float bits, which could flip a draw that lands on a boundary: rare, not
    impossible.)
    """
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need at least 1 window of at least 2 tokens, got {n_samples} windows of {seq_len}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CalibrationError("the tokenizer has neither a BOS nor an EOS token to start self-calibration from")
    seeds = np.random.SeedSequence(seed).spawn(n_samples)
    windows = []
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=n_samples * (seq_len - 1), unit="tok", desc="self-calibration", disable=not progress) as bar:
            for first in range(0, n_samples, batch_size):
                generators = [
                    torch.Generator().manual_seed(int(s.generate_state(1, np.uint64)[0]))
                    for s in seeds[first : first + batch_size]
                ]
                windows.append(_sample_batch(model, start, generators, seq_len, temperature, top_p, bar))
    finally:
        model.train(was_training)
    return torch.cat(windows)


def _sample_batch(model, start: int, generators, seq_len: int, temperature: float, top_p: float, bar) -> torch.Tensor:
    device = next(model.parameters()).device
    tokens = torch.full((len(generators), 1), start, dtype=torch.long)
    step_input, cache = tokens.to(device), None
    for _ in range(seq_len - 1):
        out = model(input_ids=step_input, cache=cache, use_cache=True)
        cache = out.cache
        # Sampling on the CPU: the generators live there, and (n, vocab) is small.
        probs = _nucleus(torch.softmax(out.logits[:, -1, :].float().cpu() / temperature, dim=-1), top_p)
        chosen = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        step_input = chosen[:, None].to(device)
        bar.update(len(generators))
    return tokens


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches `top_p` (rows of `probs`)."""
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0  # the most likely token always has mass_before == 0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
