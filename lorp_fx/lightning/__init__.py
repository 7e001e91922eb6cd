"""Lightning: the calibration callback, the pruned network it hands back, and multi-process runs."""
