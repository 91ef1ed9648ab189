"""`mla-mnist bench`: generation throughput in every decoding mode and attention variant, training throughput,
cache and weight bytes, in each framework, side by side (timing.py: clocks and memory; suites.py: what is
measured; report.py: table, JSON and plot)."""

from .suites import COLUMNS, run

__all__ = ["COLUMNS", "run"]
