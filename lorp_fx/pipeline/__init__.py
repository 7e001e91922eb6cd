"""The whole run: configuration, calibration, selection, removal and compensation, the report."""
