"""The least-squares solver behind compensation: streaming normal equations, ridge, cross-validation.

Pure torch, no model: a gap is described by tokens (x, m, y), the skip input and
branch output of the unit before the gap and the dense state after it, and the
map T minimises

    sum_t w_t |T m_t - r_t|^2 + lam |T - I|_F^2,   r_t = y_t - x_t,   lam = ridge * tr(A) / d

with A = sum w m m^T and B = sum w m r^T accumulated in float64:
T^T = (A + lam I)^-1 (B + lam I). Weights are 1 ("lstsq") or 1 / |y_t|^2
("cosine": every token's error relative to its own norm). The "diagonal" form
restricts T to a per-channel scale (what folds into a norm's weight), solved from
the diagonals of A and B. docs/compensation.md has the derivation and results.
"""

from __future__ import annotations

import math

import torch

from lorp_fx.core.errors import CalibrationError, CompensationError

METHODS = ("lstsq", "cosine")
FORMS = ("full", "diagonal")
# Candidate ridges for ridge="auto" (relative to tr(A)/d), chosen per gap by cross-validation.
RIDGE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
FALLBACK_RIDGE = 1e-1  # what "auto" uses when there are too few sequences to cross-validate
CV_FOLDS = 4
_SUMS = ("weight_sum", "target_sum", "residual_sum", "before_sum", "tokens")


def check_method(method: str, form: str = "full") -> None:
    if method not in METHODS:
        raise CompensationError(f"unknown compensation method {method!r}; choose one of {', '.join(METHODS)}")
    if form not in FORMS:
        raise CompensationError(f"unknown compensation form {form!r}; choose one of {', '.join(FORMS)}")


def fold_count(ridge) -> int:
    """Folds the statistics are kept in: CV_FOLDS for ridge="auto", else 1."""
    if ridge == "auto":
        return CV_FOLDS
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise CompensationError(f"ridge must be 'auto' or a number >= 0, got {ridge!r}")
    return 1


def beats_no_map(cv_errors: dict, identity_error: float) -> bool:
    """Whether the best ridge's cross-validated error is below that of leaving the gap alone (T = I):
    what `--compensate auto` asks of a gap's map before folding it."""
    return min(cv_errors.values()) < identity_error


def source_ratios(held_errors: list[dict], parts: list["GapStatistics"], part_sources: list) -> dict:
    """Per calibration source, per ridge: the held-out error of the map over that of no map on the source's
    own held-out parts (below 1: the map helps that source). `held_errors[i]` maps each ridge to part i's
    held-out error sum (the map fitted on every other part); sources whose parts hold no tokens are left out."""
    ratios: dict = {}
    for source in dict.fromkeys(part_sources):
        mine = [i for i, s in enumerate(part_sources) if s == source and parts[i].tokens > 0]
        before = sum(parts[i].before_sum for i in mine)
        if not mine or before <= 0:
            continue
        ratios[source] = {ridge: sum(held_errors[i][ridge] for i in mine) / before for ridge in held_errors[mine[0]]}
    return ratios


def choose_ridge(ratios: dict, reject: bool, check_only=frozenset()) -> float | None:
    """The ridge of `auto` from `source_ratios`: among the ridges whose map does better than no map on the
    held-out parts of *every* source, the one with the lowest mean ratio over the sources fitted on (every
    source counts alike; `check_only` sources constrain the choice, they do not steer it). None where no
    ridge does and `reject` (the gap stays open); without `reject`, the lowest mean anyway. With one
    source this is the plain cross-validated choice (`beats_no_map`)."""
    ridges = list(next(iter(ratios.values())))
    steering = [r for s, r in ratios.items() if s not in check_only] or list(ratios.values())
    mean = {ridge: sum(r[ridge] for r in steering) / len(steering) for ridge in ridges}
    safe = [ridge for ridge in ridges if all(r[ridge] < 1.0 for r in ratios.values())]
    if not safe and reject:
        return None
    return min(safe or ridges, key=mean.get)


def all_reduced(parts: list["GapStatistics"], reduce) -> list["GapStatistics"]:
    """`parts` summed over the processes in one all-reduce (`reduce` sums a float64 tensor over them; None:
    one process, `parts` as they are)."""
    if reduce is None or not parts:
        return parts
    flat = torch.cat([torch.cat([p.A.flatten(), p.B.flatten(),
                                 torch.tensor([getattr(p, n) for n in _SUMS], dtype=torch.float64, device=p.A.device)])
                      for p in parts])
    flat = reduce(flat)
    out, offset, d = [], 0, parts[0].d
    for p in parts:
        part = GapStatistics(d, p.method, p.A.device, p.form)
        part.A = flat[offset : offset + d * d].view(d, d).clone()
        part.B = flat[offset + d * d : offset + 2 * d * d].view(d, d).clone()
        offset += 2 * d * d
        for k, name in enumerate(_SUMS):
            value = float(flat[offset + k])
            setattr(part, name, int(round(value)) if name == "tokens" else value)
        offset += len(_SUMS)
        out.append(part)
    return out


class GapStatistics:
    """Streaming normal equations of one gap: A = sum w m m^T, B = sum w m r^T, and error sums."""

    def __init__(self, d: int, method: str, device: torch.device | str = "cpu", form: str = "full"):
        self.d, self.method, self.form = d, method, form
        self.A = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.B = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.weight_sum = 0.0
        self.target_sum = 0.0  # sum w |y|^2
        self.residual_sum = 0.0  # sum w |r|^2
        self.before_sum = 0.0  # sum w |r - m|^2: the error without compensation
        self.tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_out: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """One batch: the fold unit's input `x` and output `x_out`, the dense state `y` after the gap.

        Tensors are (..., d); `keep` (same leading shape, bool) drops padding tokens.
        """
        x, x_out, y = (t.reshape(-1, self.d) for t in (x, x_out, y))
        if keep is not None:
            keep = keep.reshape(-1).to(x.device).bool()
            x, x_out, y = x[keep], x_out[keep], y[keep]
        if x.shape[0] == 0:
            return
        device = self.A.device
        x, x_out, y = (t.to(device=device, dtype=torch.float64) for t in (x, x_out, y))
        m = x_out - x
        r = y - x
        if self.method == "cosine":
            w = 1.0 / (y * y).sum(1).clamp_min(torch.finfo(torch.float64).tiny)
        else:
            w = torch.ones(x.shape[0], dtype=torch.float64, device=device)
        wm = m * w[:, None]
        self.A += wm.T @ m
        self.B += wm.T @ r
        self.weight_sum += float(w.sum())
        self.target_sum += float((w * (y * y).sum(1)).sum())
        self.residual_sum += float((w * (r * r).sum(1)).sum())
        self.before_sum += float((w * ((r - m) ** 2).sum(1)).sum())
        self.tokens += x.shape[0]

    def merge(self, other: "GapStatistics") -> None:
        self.A += other.A.to(self.A.device)
        self.B += other.B.to(self.B.device)
        for name in _SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def minus(self, other: "GapStatistics") -> "GapStatistics":
        """The statistics of the tokens in `self` but not in `other` (a sub-collection of them)."""
        out = GapStatistics(self.d, self.method, self.A.device, self.form)
        out.A, out.B = self.A - other.A, self.B - other.B
        for name in _SUMS:
            setattr(out, name, getattr(self, name) - getattr(other, name))
        return out

    def error_sum(self, transform: torch.Tensor) -> float:
        """sum w |x + T m - y|^2 over these tokens (T fitted elsewhere: a held-out error)."""
        t = transform.to(self.A)
        return self.residual_sum - 2.0 * float(torch.trace(t @ self.B)) + float(((t @ self.A) * t).sum())

    def solve(self, ridge: float = FALLBACK_RIDGE) -> torch.Tensor:
        """T minimising sum w |T m - r|^2 + ridge * tr(A)/d * |T - I|^2 (float64, on the statistics' device)."""
        if self.tokens == 0:
            raise CalibrationError("no calibration tokens reached this gap: the calibration batches are empty or all padding")
        scale = float(torch.trace(self.A)) / self.d
        if not math.isfinite(scale):
            raise CalibrationError("NaN or Inf in the calibration activations; use float32 or bfloat16 rather than float16")
        lam = ridge * scale if scale > 0 else 1.0
        if self.form == "diagonal":
            return torch.diag((torch.diagonal(self.B) + lam) / (torch.diagonal(self.A) + lam))
        eye = torch.eye(self.d, dtype=torch.float64, device=self.A.device)
        system, rhs = self.A + lam * eye, self.B + lam * eye
        try:
            transposed = torch.cholesky_solve(rhs, torch.linalg.cholesky(system))
        except RuntimeError:  # not positive definite in floating point: fall back to a least-squares solve
            transposed = torch.linalg.lstsq(system, rhs).solution
        return transposed.T.contiguous()

    def relative_error(self, transform: torch.Tensor | None = None) -> float:
        """sum w |x + T m - y|^2 / sum w |y|^2 on the calibration tokens (T = I: uncompensated)."""
        err = self.before_sum if transform is None else self.error_sum(transform)
        return max(err, 0.0) / max(self.target_sum, 1e-300)


class FoldedStatistics:
    """The statistics of one gap, split into folds by sequence for ridge="auto" (one fold otherwise).

    Sequence r of the calibration data (counting rows across batches) goes to fold
    r % folds: tokens of one sequence are correlated, so they stay together. With
    `sources` (a calibration-source label per row) each source's sequences are split into
    folds of their own, so that every source has held-out parts (`solver.choose_ridge`).
    """

    def __init__(self, d: int, method: str, folds: int, device, form: str = "full", sources: list | None = None,
                 held_only=frozenset()):
        labels = list(dict.fromkeys(sources)) if sources is not None else [None]
        counts = {label: 1 if label in held_only else folds for label in labels}
        self.part_sources = [label for label in labels for _ in range(counts[label])]
        self.fitted = [label not in held_only for label in self.part_sources]
        self.folds = [GapStatistics(d, method, device, form) for _ in self.part_sources]
        self.row_parts = None if sources is None else _parts_of_rows(sources, self.part_sources, counts)
        self.held_out_ratios: dict = {}  # source -> ridge -> held-out error with the map over that without

    def update(self, x, x_out, y, keep, first_row: int) -> None:
        n = len(self.folds)
        if n == 1 or x.dim() < 3:
            self.folds[0].update(x, x_out, y, keep)
            return
        parts = torch.tensor([self._part(first_row + r) for r in range(x.shape[0])], device=x.device)
        for k in range(n):
            pick = parts == k
            if bool(pick.any()):
                self.folds[k].update(x[pick], x_out[pick], y[pick], None if keep is None else keep[pick])

    def _part(self, row: int) -> int:
        return row % len(self.folds) if self.row_parts is None else self.row_parts[row]

    def total(self) -> GapStatistics:
        """The statistics the map is fitted on: every part but those of `held_only` sources."""
        first = self.folds[0]
        total = GapStatistics(first.d, first.method, first.A.device, first.form)
        for fold, fitted in zip(self.folds, self.fitted):
            if fitted:
                total.merge(fold)
        return total

    def choose_ridge(self, total: GapStatistics) -> tuple[float, dict[float, float]]:
        """The ridge of `solver.choose_ridge` (the plain cross-validated choice with one source), and every
        candidate's cross-validated relative error; the per-source ratios are kept in `held_out_ratios`."""
        usable = [f for f, fitted in zip(self.folds, self.fitted) if fitted and f.tokens > 0]
        if len(usable) < 2:
            return FALLBACK_RIDGE, {}
        held = [{ridge: fold.error_sum((total.minus(fold) if fitted else total).solve(ridge)) if fold.tokens else 0.0
                 for ridge in RIDGE_GRID} for fold, fitted in zip(self.folds, self.fitted)]
        errors = {ridge: sum(h[ridge] for h, fitted in zip(held, self.fitted) if fitted) / max(total.target_sum, 1e-300)
                  for ridge in RIDGE_GRID}
        self.held_out_ratios = source_ratios(held, self.folds, self.part_sources)
        check_only = {s for s, fitted in zip(self.part_sources, self.fitted) if not fitted}
        return choose_ridge(self.held_out_ratios, reject=False, check_only=check_only), errors

    def solve(self, ridge) -> tuple[GapStatistics, torch.Tensor, float, dict]:
        """(all tokens' statistics, T, the ridge used, cross-validated errors per ridge)."""
        total = self.total()
        if total.tokens == 0:
            raise CalibrationError("no calibration tokens reached this gap: the calibration batches are empty or all padding")
        cv_errors: dict = {}
        if ridge == "auto":
            ridge, cv_errors = self.choose_ridge(total)
        return total, total.solve(float(ridge)), float(ridge), cv_errors


def _parts_of_rows(sources: list, part_sources: list, counts: dict) -> list[int]:
    """The part of each row: its source's first part + (its place among its source's rows) % its part count."""
    seen = dict.fromkeys(counts, 0)
    parts = []
    for label in sources:
        parts.append(part_sources.index(label) + seen[label] % counts[label])
        seen[label] += 1
    return parts
