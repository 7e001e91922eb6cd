"""Training-free compensation of removed layers: fit a linear map per gap, fold it into the weights.

Each gap a removal leaves in the residual stream is closed by a map T fitted on
calibration activations (ReplaceMe, arXiv 2505.02819) and folded into the output
projection of the last kept unit before the gap, so the pruned model keeps exactly
the parameters and latency of the uncompensated one. Method, derivation and
measurements: docs/compensation.md.

* `solver.py`: the least-squares solver (pure torch, testable without a model);
* `fold.py`: folding a map into weights, and its numerical check;
* `fit.py`: `compensate`, `fit_compensation`, `apply_compensation`, `Compensator`;
* `gap_fit.py`: one gap's map from cached states, with a cheap cross-validated ridge.

Where each map goes (units, stacks, gaps) is model anatomy: `lorp_fx.arch.anatomy`.
"""
