"""Tolerances that follow from the arithmetic, for the statistics' cosines and angles (issue 29).

`SimilarityAccumulator` normalises each token vector and takes the dot products in float32, then sums and
takes arccos in float64 (lorp_fx/core/stats.py); the last-token angles are float64 throughout. A float64
reference computed from the same states differs from it only by that rounding, which depends on the CPU
kernels (their reductions sum in another order), so a tolerance must bound it on every machine:

* a cosine of two unit vectors of `dim` features is off by at most `cosine_error(dim, dtype)`;
* arccos turns an error e in a cosine c into at most |arccos(c - e) - arccos(c + e)|: about e / sin(theta)
  for angles well away from 0, but up to sqrt(2 e) at c = 1, where arccos is vertical (identical states,
  such as a ReLU branch that adds nothing at a pixel). `angular_tolerance` takes that bound token by token.
"""

from __future__ import annotations

import numpy as np

UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53}


def cosine_error(dim: int, dtype: str) -> float:
    """A bound on |computed - exact| cosine of two vectors of `dim` features, normalised and multiplied in `dtype`.

    Normalising leaves each unit vector off by a relative ~(dim / 2 + 2) roundings (the norm's sum, its square
    root, the division); the dot product adds dim more over a sum of |x_i y_i| <= 1 (Higham's gamma_dim).
    Both vectors' errors reach the cosine, hence 2 * (dim / 2 + 2) + dim, with a margin of 4 for the clamp
    and for the float64 rounding of the sums.
    """
    return (2 * dim + 8) * UNIT_ROUNDOFF[dtype]


def angular_tolerance(cosines: np.ndarray, error: float) -> np.ndarray:
    """Per entry, the mean over tokens of how far arccos(c) / pi can move when each token's cosine c
    (axis 0: tokens) is off by `error`; `cosines` are the reference's, so `error` includes its own rounding."""
    c = np.clip(cosines, -1.0, 1.0)
    low, high = np.arccos(np.clip(c + error, -1.0, 1.0)), np.arccos(np.clip(c - error, -1.0, 1.0))
    return (high - low).mean(0) / np.pi


def assert_within(measured: np.ndarray, expected: np.ndarray, tolerance, name: str = "") -> None:
    """|measured - expected| <= tolerance everywhere (`tolerance` a number or an array of expected's shape)."""
    difference = np.abs(np.asarray(measured, dtype=np.float64) - expected)
    excess = difference - tolerance
    assert (excess <= 0).all(), (
        f"{name}: {int((excess > 0).sum())} entries beyond the tolerance; worst {difference.flat[excess.argmax()]:.3g} "
        f"against {np.broadcast_to(tolerance, difference.shape).flat[excess.argmax()]:.3g}"
    )
