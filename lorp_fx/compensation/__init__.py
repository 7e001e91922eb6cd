"""Training-free compensation of removed layers: fit a linear map per gap, fold it into the weights.

Each gap a removal leaves in the residual stream is closed by a map T fitted on
calibration activations (ReplaceMe, arXiv 2505.02819) and folded into the output
projection of the last kept unit before the gap, so the pruned model keeps exactly
the parameters and latency of the uncompensated one. Method, derivation and
measurements: docs/compensation.md.

* `solver.py`: the least-squares solver (pure torch, testable without a model);
* `structure.py`: units, stacks and gaps, from `families.py`;
* `fold.py`: folding a map into weights, and its numerical check;
* `capture.py`: activation capture;
* `api.py`: `compensate`, `fit_compensation`, `apply_compensation`.
"""

from ..errors import CompensationError
from .api import DEFAULT_METHOD, DEFAULT_RIDGE, Compensated, Compensator, GapFit, apply_compensation, compensate, default_form, fit_compensation
from .solver import CV_FOLDS, FORMS, METHODS, RIDGE_GRID, GapStatistics
from .structure import check_compensable

__all__ = [
    "CV_FOLDS", "Compensated", "Compensator", "CompensationError", "DEFAULT_METHOD", "DEFAULT_RIDGE", "FORMS", "GapFit",
    "GapStatistics", "METHODS", "RIDGE_GRID", "apply_compensation", "check_compensable", "compensate",
    "default_form", "fit_compensation",
]
