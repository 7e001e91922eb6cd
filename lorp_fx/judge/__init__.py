"""Measuring a candidate removal or a model: calibration losses, the compensated candidate judge, perplexity."""
