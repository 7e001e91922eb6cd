"""The streaming accumulator against a direct float64 computation."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from strategies import residual_states
from tolerances import angular_tolerance, assert_within, cosine_error

from lorp_fx import SimilarityAccumulator
from lorp_fx.core.errors import CalibrationError


def direct(states: np.ndarray, mask: np.ndarray):
    """S, angular and last-token angular straight from the definitions, and the cosines of every token and
    last token they average. states: (P, B, T, d)."""
    p = states.shape[0]
    unit = states / np.linalg.norm(states, axis=-1, keepdims=True)
    tokens = unit.transpose(1, 2, 0, 3)[mask.astype(bool)]  # (n, P, d)
    cos = np.clip(np.einsum("npd,nqd->npq", tokens, tokens), -1, 1)
    last_rows = []
    for b in range(mask.shape[0]):
        valid = np.nonzero(mask[b])[0]
        if len(valid):
            last_rows.append(unit[:, b, valid[-1], :])
    last = np.stack(last_rows)  # (B', P, d)
    last_cos = np.clip(np.einsum("bpd,bqd->bpq", last, last), -1, 1)
    assert cos.shape[1] == p
    return cos.mean(0), (np.arccos(cos) / np.pi).mean(0), (np.arccos(last_cos) / np.pi).mean(0), cos, last_cos


@pytest.mark.numeric
@settings(max_examples=60)
@given(residual_states())
def test_any_batch_split_gives_the_direct_statistics(case):
    """The reference reads the same float32 states in float64: what differs is the accumulator's float32
    cosines (float64 for last tokens), bounded token by token (tests/tolerances.py)."""
    states, mask, cuts = case
    accumulator = SimilarityAccumulator(states.shape[0])
    bounds = [0, *cuts, states.shape[1]]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        accumulator.update(torch.from_numpy(states[:, start:stop]).float(), torch.from_numpy(mask[start:stop]))
    stats = accumulator.statistics([f"p{i}" for i in range(states.shape[0])], [], [])
    s, angle, last, cos, last_cos = direct(states.astype(np.float32).astype(np.float64), mask)
    dim = states.shape[-1]
    float32 = cosine_error(dim, "float32") + cosine_error(dim, "float64")
    float64 = 2 * cosine_error(dim, "float64")
    assert_within(stats.similarity, s, float32, "similarity")
    assert_within(stats.angular, angle, angular_tolerance(cos, float32), "angular")
    assert_within(stats.last_token_angular, last, angular_tolerance(last_cos, float64), "last_token_angular")
    assert stats.token_count == mask.sum() and stats.sequence_count == states.shape[1]
    np.testing.assert_allclose(np.diag(stats.similarity), 1.0, atol=1e-9)


@pytest.mark.numeric
@settings(max_examples=20)
@given(residual_states())
def test_merging_accumulators_equals_one_pass(case):
    states, mask, _ = case
    whole, left, right = (SimilarityAccumulator(states.shape[0]) for _ in range(3))
    tensor, tmask = torch.from_numpy(states), torch.from_numpy(mask)
    whole.update(tensor, tmask)
    half = max(1, states.shape[1] // 2)
    left.update(tensor[:, :half], tmask[:half])
    if half < states.shape[1]:
        right.update(tensor[:, half:], tmask[half:])
    left.merge(right)
    for name in SimilarityAccumulator.SUM_NAMES:
        torch.testing.assert_close(getattr(left, name), getattr(whole, name))


@pytest.mark.numeric
def test_bfloat16_states_match_a_float64_reference():
    rng = np.random.default_rng(0)
    # Residual streams have a few large outlier dimensions; keep them in the test.
    states = rng.normal(size=(6, 4, 64, 96)) + rng.normal(size=(6, 1, 1, 96)) * 3
    states[..., 7] *= 40
    low = torch.from_numpy(states).to(torch.bfloat16)
    accumulator = SimilarityAccumulator(6)
    for batch in range(4):
        accumulator.update(low[:, batch : batch + 1])
    reference = direct(low.double().numpy(), np.ones((4, 64)))[0]
    stats = accumulator.statistics([str(i) for i in range(6)], [], [])
    assert np.abs(stats.similarity - reference).max() < 1e-3


def test_a_batch_without_valid_tokens_is_refused():
    accumulator = SimilarityAccumulator(3)
    with pytest.raises(CalibrationError, match="no valid tokens"):
        accumulator.update(torch.randn(3, 2, 4, 5), torch.zeros(2, 4))


def test_no_batches_is_refused():
    with pytest.raises(CalibrationError, match="empty"):
        SimilarityAccumulator(3).statistics(["a", "b", "c"], [], [])
