"""Benchmarks (edgekd.bench): backends, the timing worker, reports. Importing this package imports nothing heavy."""
