"""Timing dilconv blocks against their peers and the hardware: ``python -m benchmarks.run``."""
