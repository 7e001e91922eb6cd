"""The shared Hypothesis strategies and synthetic statistics every property test draws from."""

from dataclasses import replace

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from lorp_fx.core.stats import LayerStatistics


def random_walk_stats(n_blocks: int, seed: int, dim: int = 6) -> LayerStatistics:
    """A residual stream of unit vectors drifting with depth: a real (PSD) cosine matrix.

    The last-token angles differ a little from the token-mean ones, as they do in real models.
    """
    rng = np.random.default_rng(seed)
    h = np.cumsum(rng.normal(size=(n_blocks + 1, dim)) * rng.uniform(0.2, 1.5, size=(n_blocks + 1, 1)), axis=0)
    h += rng.normal(size=dim) * 2
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    stats = LayerStatistics.from_similarity(h @ h.T)
    noise = rng.uniform(0, 0.05, size=stats.angular.shape)
    last = np.clip(stats.angular + (noise + noise.T) / 2, 0, 1)
    np.fill_diagonal(last, 0.0)
    return replace(stats, last_token_angular=last)


def stats_over_inputs(S: np.ndarray) -> LayerStatistics:
    """Stats whose N blocks have exactly S as input similarity (the LoRP paper's matrix).

    S covers only the N layer inputs; the final output point is a copy of the last
    input, which no input-based selector reads.
    """
    n = S.shape[0]
    full = np.ones((n + 1, n + 1))
    full[:n, :n] = S
    full[n, :n] = full[:n, n] = S[n - 1]
    return LayerStatistics.from_similarity(full)


@st.composite
def selection_scenarios(draw, max_blocks: int = 12):
    """(stats, n_remove, protected block names or None, eligible indices): any legal selection problem."""
    n = draw(st.integers(3, max_blocks))
    stats = random_walk_stats(n, draw(st.integers(0, 2**32 - 1)))
    stats = replace(stats, removable=draw(st.lists(st.booleans() | st.just(True), min_size=n, max_size=n)))
    protected = draw(st.none() | st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    guarded = {0, n - 1} if protected is None else set(protected)
    eligible = [b for b in range(n) if stats.removable[b] and b not in guarded]
    assume(eligible)
    n_remove = draw(st.integers(1, min(len(eligible), n - 2)))
    names = None if protected is None else [stats.blocks[b] for b in protected]
    return stats, n_remove, names, eligible


@st.composite
def residual_states(draw):
    """(states (P, B, T, d), attention mask (B, T), batch cut points): a calibration pass in pieces."""
    p, b, t, d = draw(st.integers(2, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(2, 7))
    rng = np.random.default_rng(draw(st.integers(0, 10_000)))
    states = rng.normal(size=(p, b, t, d))
    mask = rng.random((b, t)) < 0.7
    mask[:, 0] = True  # every sequence keeps a token
    cuts = sorted(draw(st.sets(st.integers(1, max(1, b - 1)), max_size=b - 1))) if b > 1 else []
    return states, mask.astype(np.int64), cuts


def legal_removals(depth: int):
    """Sets of block indices whose removal follows the budget rule (lorp_fx/budget.py: at least 2 blocks stay)."""
    return st.sets(st.integers(0, depth - 1), max_size=max(depth - 2, 0))
