"""Calibration passes: batches, network calls, hooks and observers that read the residual stream, self-sampling."""
