"""Benchmark sections for scripts/bench.py: one module per topic, each with `run(options) -> list[Table]`."""
