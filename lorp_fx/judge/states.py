"""The judge's cached states, kept in float16 where the loss they give matches float32's, in float32 where not.

`CandidateLoss` keeps the residual state entering every layer of every calibration window
(SmolLM2, 32 windows: 585 MB in float32, more than the weights), and resumes each
candidate's forward pass from one. Stored in float16 a state is rounded to 11 significant
bits (a relative error of at most 2^-11 per entry, where |x| >= 2^-14; float16's range ends
at 65,504: SmolLM2's largest entry is 24,215), which halves that memory. Whether the loss
survives the rounding is measured on the model, not assumed (`half_precision_holds`): the
first loss window, resumed from its float16 state at the first layer's entry and at the
middle layer's, must give a loss within `LOSS_TOLERANCE` nats of its float32 loss; where it
does not (or a state does not fit float16's range, or the model is not float32), every
state stays as computed, as before.

`LOSS_TOLERANCE` is 1e-4 nats a window. On SmolLM2 the rounding moved a loss by 1e-6 to 8.5e-5 per
window over resume points from the first layer to the last (two WikiText-2 windows), and a whole selection with float16 states
moved every measured loss (a mean of 8 windows, maps fitted from float16 states included)
by at most 8.4e-5 nats, while the closest decision was won by 1.66e-3 nats
(`benchmarks/results/cost-smollm2.md` prints each run's decisions and their closest
margin): a tolerance more than ten times below the margins the judge decided by there. A
model whose rounding moves the loss more keeps float32. Statistics are read from the
float32 states before they are packed (`CandidateLoss._cache_dense`), so they are exactly
`collect_statistics`'.
"""

from __future__ import annotations

import torch

from lorp_fx.judge.head import head_loss
from lorp_fx.judge.layout import reduce_sums

HALF = torch.float16
LOSS_TOLERANCE = 1e-4


def pack(state: torch.Tensor, half: bool) -> torch.Tensor:
    """`state` as it is cached: in float16 where `half` and it is float32 and fits float16's range."""
    if not half or state.dtype != torch.float32:
        return state
    packed = state.to(HALF)
    return packed if bool(torch.isfinite(packed).all()) or not bool(torch.isfinite(state).all()) else state


def unpack(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A cached state in the model's `dtype`, to compute with."""
    return state if state.dtype == dtype else state.to(dtype)


def half_precision_holds(runner, batches: list[dict], states: list[dict], losses: list[float], reduce=None) -> bool:
    """Whether float16 states give the loss float32 states give, within LOSS_TOLERANCE: each window of
    `batches` (with its float32 checkpoint `states` and its loss `losses`) resumed from its float16 state at
    the first layer's entry and at the middle layer's. Every process decides alike (`reduce` sums the
    failures over them); a process without a window adds none."""
    failures, final = 0, len(runner.units)
    entries = [group[0] for group in runner.layer_units]
    for batch, window, loss in zip(batches, states, losses):
        for unit in dict.fromkeys([entries[0], entries[len(entries) // 2]]):
            packed = pack(window[unit], True)
            if packed.dtype == window[unit].dtype:  # outside float16's range (or not float32): not halved
                failures += 1
                break
            resumed = runner.run(batch, resume=(unit, unpack(packed, window[unit].dtype)), record=True, stop=final)[1]
            if not abs(head_loss(runner, batch, resumed[final]) - loss) <= LOSS_TOLERANCE:
                failures += 1
                break
    if reduce is not None:
        failures = int(reduce_sums([failures], reduce)[0])
    return failures == 0


def packed_bytes(states: list[dict]) -> int:
    """Bytes held by the cached states (each tensor counted once)."""
    seen, total = set(), 0
    for window in states:
        for tensor in window.values():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total
