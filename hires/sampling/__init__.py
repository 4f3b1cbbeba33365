"""Sampling layer: progressive stages (structure guidance), schedules and re-noising, wavelets."""
