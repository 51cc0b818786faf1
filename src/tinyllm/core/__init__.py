"""Shared machinery: kernels, step configs and the calibration runner."""
