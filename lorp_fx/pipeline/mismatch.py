"""Calibration text very unlike the model's own: named in the report, never a reason to stop.

A `--calib-file` in another language, binary noise decoded as text, or one line repeated
gives statistics and maps that fit that text only. The run goes on (the compensation
guard keeps out any map that hurts the model's own text), and `report.json`'s
`calibration.mismatch` says what was seen:

* `repetition`: the share of distinct token 4-grams among all 4-grams of a source's windows
  (running prose: above 0.9; a repeated line: near 0); flagged below `MIN_DISTINCT`;
* `odd_characters`: the share of control, private-use, unassigned and replacement characters
  in the decoded windows (text: about 0; bytes decoded as Latin-1: about a quarter);
  flagged above `MAX_ODD`;
* `loss`: the dense model's mean next-token loss per source. A source whose loss is more
  than `MAX_LOSS_GAP` nats above that of the model's own text is one the model finds far
  less predictable (another language, noise); SmolLM2-135M: own text 2.7, WikiText-2 3.4,
  Python code 2.6, licences 3.2.
"""

from __future__ import annotations

import unicodedata

import torch

from lorp_fx.calibration.batches import on_device, prepare_batches, token_batches
from lorp_fx.core.model import causal_lm, model_device
from lorp_fx.judge.loss import next_token_loss
from lorp_fx.judge.source_guard import by_source

MIN_DISTINCT = 0.3
MAX_ODD = 0.02
MAX_LOSS_GAP = 2.0
_ODD = {"Cc", "Co", "Cn", "Cs"}


def distinct_ngrams(windows: torch.Tensor, n: int = 4) -> float:
    """Distinct token n-grams over all n-grams of the windows (1.0: no n-gram repeats)."""
    grams = [tuple(row[i : i + n]) for row in windows.tolist() for i in range(len(row) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def odd_characters(text: str) -> float:
    """The share of characters that are control (other than whitespace), private-use, unassigned, surrogate or U+FFFD."""
    odd = sum(1 for ch in text if ch == "\ufffd" or (unicodedata.category(ch) in _ODD and ch not in "\n\r\t"))
    return odd / max(1, len(text))


def calibration_mismatch(windows: torch.Tensor, sources: list[str], tokenizer, losses: dict[str, float] | None,
                         raw: dict[str, str] | None = None) -> dict:
    """Per source: the measures above, and `warnings`, one phrase per source that looks unlike text or unlike
    the model's own text (empty: nothing seen). `raw` gives a source's text as read (characters a tokenizer
    maps to one unknown token are seen there); else the decoded windows are checked."""
    found: dict = {"sources": {}, "warnings": []}
    own_loss = (losses or {}).get("own")
    for source in dict.fromkeys(sources):
        rows = windows[[i for i, s in enumerate(sources) if s == source]]
        measures = {"distinct_4grams": round(distinct_ngrams(rows), 4)}
        if raw and source in raw:
            measures["odd_characters"] = round(odd_characters(raw[source]), 4)
        elif tokenizer is not None:
            measures["odd_characters"] = round(odd_characters(tokenizer.decode(rows.reshape(-1).tolist())), 4)
        if losses and source in losses:
            measures["loss"] = round(losses[source], 4)
        found["sources"][source] = measures
        if source == "own":
            continue
        if measures["distinct_4grams"] < MIN_DISTINCT:
            found["warnings"].append(f"the {source} text repeats itself ({measures['distinct_4grams']:.0%} distinct 4-grams)")
        if measures.get("odd_characters", 0.0) > MAX_ODD:
            found["warnings"].append(f"the {source} text looks like binary data or wrongly decoded text "
                                     f"({measures['odd_characters']:.0%} control or unassigned characters)")
        if own_loss is not None and "loss" in measures and measures["loss"] - own_loss > MAX_LOSS_GAP:
            found["warnings"].append(f"the model finds the {source} text far less predictable than its own "
                                     f"(loss {measures['loss']:.2f} against {own_loss:.2f} nats: another language, or noise?)")
    return found


@torch.no_grad()
def dense_losses(model, judge, text, per_source: int = 4) -> dict[str, float] | None:
    """The dense model's mean next-token loss per calibration source: from the judge's loss windows and its
    guard windows where it has them, else measured on up to `per_source` windows of each source; None for a
    model without a next-token loss."""
    if judge is not None and not judge.released:  # a plain judge too (no guard windows): its caching pass has them
        values = judge.window_losses[(frozenset(), False)] + judge._guard_losses(frozenset(), {})
        found = by_source(judge, values)
        if set(found) == set(text.sources):
            return found
    if not causal_lm(model):
        return None
    found = {}
    for source in dict.fromkeys(text.sources):
        rows = text.windows[[i for i, s in enumerate(text.sources) if s == source][:per_source]]
        # One window per call: a call holds its logits and their log-softmax (SmolLM2: 100 MB a 256-token window).
        calls = prepare_batches(model, on_device(token_batches(rows, 1), model_device(model)))
        found[source] = sum(next_token_loss(model, call) for call in calls) / len(calls)
    return found
