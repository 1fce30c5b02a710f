"""Compute kernels behind stable seams: attention backends, sampling."""
