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
    all_reduced,
    choose_ridge,
    source_ratios,
)
from lorp_fx.core.model import float64_device


def gap_statistics(views, masks, method: str, form: str, row_keys: list[tuple], keys: list[tuple],
                   held_only=frozenset(), reduce=None, state_shape: tuple | None = None,
                   ) -> tuple[list[GapStatistics], GapStatistics, list]:
    """Per-part and total statistics of a gap, and each part's source; `views` holds (x, x_out, y) per window
    this process holds, `row_keys` its part (source, fold), `keys` every part in a fixed order (the same in
    every process: `judge.layout.WindowLayout.part_keys`). The parts are summed over the processes
    (`reduce`), so every process holds the sums of every window. Parts of `held_only` sources are left out
    of the total: measured, never fitted on. `state_shape` (width, device) is needed where `views` is empty
    (a process that holds none of the gap's windows)."""
    width, where = state_shape if state_shape is not None else (views[0][0].shape[-1], views[0][0].device)
    d, device = width, float64_device(where)  # where the states are (a GPU's)
    parts = {key: GapStatistics(d, method, device, form) for key in keys}
    for (x, x_out, y), mask, key in zip(views, masks, row_keys):
        for r in range(x.shape[0]):
            keep = None if mask is None or tuple(mask.shape) != tuple(x.shape[:2]) else mask[r].bool()
            parts[key].update(x[r], x_out[r], y[r], keep)
    ordered = all_reduced([parts[key] for key in keys], reduce)
    total = GapStatistics(d, method, device, form)
    for (source, _), part in zip(keys, ordered):
        if source not in held_only:
            total.merge(part)
    return ordered, total, [source for source, _ in keys]


def cv_errors(parts: list[GapStatistics], total: GapStatistics, grid=RIDGE_GRID) -> dict[float, float]:
    """Cross-validated relative error of every ridge in `grid` (what `compensate` minimises)."""
    held = held_out_errors(parts, total, grid)
    return {ridge: sum(errors[ridge] for errors in held) / max(total.target_sum, 1e-300) for ridge in grid}


def held_out_errors(parts: list[GapStatistics], total: GapStatistics, grid=RIDGE_GRID,
                    fitted: list[bool] | None = None) -> list[dict[float, float]]:
    """Per part, every ridge's held-out error sum: the map fitted on the other parts, measured on this one
    (a part not in the total, `fitted[i]` false: the map fitted on the whole total; empty parts: 0)."""
    out = []
    for i, held in enumerate(parts):
        if held.tokens == 0:
            out.append({ridge: 0.0 for ridge in grid})
            continue
        train = total.minus(held) if fitted is None or fitted[i] else total
        if total.form == "diagonal":  # per-channel solves are cheap: the direct sum, as `compensate` computes it
            out.append({ridge: held.error_sum(train.solve(ridge)) for ridge in grid})
            continue
        out.append(_eigen_errors(train, held, grid))
    return out


def _eigen_errors(train: GapStatistics, held: GapStatistics, grid) -> dict[float, float]:
    """Every ridge's held-out error of `held` for maps fitted on `train`, from one eigendecomposition."""
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
    errors = {}
    for ridge in grid:
        lam = ridge * scale if scale > 0 else 1.0
        D = 1.0 / (values + lam)
        cross = float((D * (g1 + lam * g2)).sum())
        DD = D[:, None] * D[None, :]
        quad = float((DD * H * (P0 + lam * P1).T).sum()) + lam * lam * float((D * D * Hdiag).sum())
        errors[ridge] = held.residual_sum - 2.0 * cross + quad
    return errors


def fit_gap(views, masks, method: str, ridge, names: list[str], fold_into: str, reject: bool = True,
            form: str = "full", row_keys: list[tuple] | None = None, keys: list[tuple] | None = None,
            held_only=frozenset(), reduce=None, state_shape: tuple | None = None) -> GapFit | None:
    """The gap's map as a `GapFit` (ridge "auto": cross-validated), or None when `reject` and no
    ridge beats leaving the gap alone (T = I) on the held-out windows of every source
    (`solver.choose_ridge`). `row_keys` gives each window's part (source, fold) and `keys` every part
    (`judge.layout.WindowLayout.part_keys`; default: one source, window i in fold i % CV_FOLDS);
    sources in `held_only` are measured, never fitted on; `reduce` sums over processes (`state_shape`:
    `gap_statistics`).
    `projections` is left empty: the parameter names are the eager model's (`fit.eager_fits`)."""
    folds = CV_FOLDS if ridge == "auto" else 1
    if row_keys is None:
        keys = [(None, k) for k in range(folds)]
        row_keys = [(None, i % folds) for i in range(len(views))]
    elif folds == 1:  # a fixed ridge: one part per source
        row_keys = [(source, 0) for source, _ in row_keys]
        keys = list(dict.fromkeys((source, 0) for source, _ in keys))
    parts, total, part_sources = gap_statistics(views, masks, method, form, row_keys, keys, held_only, reduce,
                                                 state_shape)
    fitted = [source not in held_only for source in part_sources]
    errors: dict = {}
    held_out: dict = {}
    identity = total.relative_error(None)
    if ridge == "auto":
        if sum(p.tokens > 0 for p, f in zip(parts, fitted) if f) < 2:
            ridge = FALLBACK_RIDGE
        else:
            held = held_out_errors(parts, total, fitted=fitted)
            errors = {r: sum(e[r] for e, f in zip(held, fitted) if f) / max(total.target_sum, 1e-300) for r in RIDGE_GRID}
            ratios = source_ratios(held, parts, part_sources)
            ridge = choose_ridge(ratios, reject, check_only=held_only)
            if ridge is None:
                return None
            if part_sources[0] is not None:  # several sources: per source, held-out gap error with the map over without
                held_out = {str(s): r[ridge] for s, r in ratios.items()}
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
        held_out=held_out,
    )
