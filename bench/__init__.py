"""Benchmarks: each prints its figures and the ratio against the alternative (run as python -m bench.NAME)."""
