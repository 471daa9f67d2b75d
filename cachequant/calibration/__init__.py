"""Calibration: inputs, trajectories, and the calibrate() driver."""
