"""One gap's compensation map from cached states, with a cheap cross-validated ridge.

`lorp_fx.compensation` chooses the ridge of each gap by 4-fold cross-validation over the
calibration sequences: 9 ridges x 4 folds = 36 Cholesky solves of a d x d system with d
right-hand sides (1.1 to 1.6 s per gap on SmolLM2, d = 576, one thread). A selector that
judges candidates by their compensated loss fits dozens of gaps, so `cv_errors` gets the
same 36 held-out errors from one eigendecomposition per fold: with A' = Q diag(e) Q^T the
training fold's normal matrix, every ridge's solution is T(lam)^T = Q diag(1/(e + lam)) M(lam)
with M(lam) = Q^T B' + lam Q^T, and its held-out error is a sum over the eigenbasis that
costs O(d^2) per ridge once six d x d products per fold are done (0.4 s per gap).
The ridge chosen, and the map solved with it, are `compensate`'s.
"""

from __future__ import annotations

import torch

from lorp_fx.compensation.fit import GapFit
from lorp_fx.compensation.solver import (
    CV_FOLDS,
    FALLBACK_RIDGE,
    RIDGE_GRID,
    GapStatistics,
    beats_no_map,
)
from lorp_fx.core.model import float64_device


def gap_statistics(views, masks, method: str, folds: int, form: str = "full") -> tuple[list[GapStatistics], GapStatistics]:
    """Per-fold and total statistics of a gap; `views` holds (x, x_out, y) per batch, sequences
    going to fold (row number % folds) as in `compensate`."""
    d, device = views[0][0].shape[-1], float64_device(views[0][0].device)  # where the states are (a GPU's)
    parts = [GapStatistics(d, method, device, form) for _ in range(folds)]
    row = 0
    for (x, x_out, y), mask in zip(views, masks):
        for r in range(x.shape[0]):
            keep = None if mask is None or tuple(mask.shape) != tuple(x.shape[:2]) else mask[r].bool()
            parts[(row + r) % folds].update(x[r], x_out[r], y[r], keep)
        row += x.shape[0]
    total = GapStatistics(d, method, device, form)
    for part in parts:
        total.merge(part)
    return parts, total


def cv_errors(parts: list[GapStatistics], total: GapStatistics, grid=RIDGE_GRID) -> dict[float, float]:
    """Cross-validated relative error of every ridge in `grid` (what `compensate` minimises)."""
    usable = [p for p in parts if p.tokens > 0]
    if total.form == "diagonal":  # per-channel solves are cheap: the direct sum, as `compensate` computes it
        return {ridge: sum(p.error_sum(total.minus(p).solve(ridge)) for p in usable) / max(total.target_sum, 1e-300)
                for ridge in grid}
    errors = {ridge: 0.0 for ridge in grid}
    for held in usable:
        train = total.minus(held)
        d = train.d
        scale = float(torch.trace(train.A)) / d
        values, Q = torch.linalg.eigh(train.A)
        Qt = Q.T
        C = Qt @ train.B
        G = Qt @ held.B
        H = Qt @ held.A @ Q
        P0 = C @ C.T
        P1 = C @ Q + Qt @ C.T
        g1 = (G * C).sum(1)
        g2 = (G * Qt).sum(1)
        Hdiag = torch.diagonal(H)
        for ridge in grid:
            lam = ridge * scale if scale > 0 else 1.0
            D = 1.0 / (values + lam)
            cross = float((D * (g1 + lam * g2)).sum())
            DD = D[:, None] * D[None, :]
            quad = float((DD * H * (P0 + lam * P1).T).sum()) + lam * lam * float((D * D * Hdiag).sum())
            errors[ridge] += held.residual_sum - 2.0 * cross + quad
    return {ridge: value / max(total.target_sum, 1e-300) for ridge, value in errors.items()}


def fit_gap(views, masks, method: str, ridge, names: list[str], fold_into: str, reject: bool = True,
            form: str = "full") -> GapFit | None:
    """The gap's map as a `GapFit` (ridge "auto": cross-validated), or None when `reject` and no
    ridge beats leaving the gap alone (T = I) on held-out sequences. `projections` is left
    empty: the parameter names are the eager model's (`CandidateLoss.named_fits`)."""
    folds = CV_FOLDS if ridge == "auto" else 1
    parts, total = gap_statistics(views, masks, method, folds, form)
    errors: dict = {}
    identity = total.relative_error(None)
    if ridge == "auto":
        if sum(p.tokens > 0 for p in parts) < 2:
            ridge = FALLBACK_RIDGE
        else:
            errors = cv_errors(parts, total)
            ridge = min(errors, key=errors.get)
            if reject and not beats_no_map(errors, identity):
                return None
    transform = total.solve(float(ridge))
    return GapFit(
        removed=list(names),
        fold_into=fold_into,
        projections=[],
        transform=transform.cpu(),
        tokens=total.tokens,
        error_before=identity,
        error_after=total.relative_error(transform),
        ridge=float(ridge),
        cv_errors=errors,
        form=form,
    )
