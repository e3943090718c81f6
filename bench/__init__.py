"""Benchmarks: each prints its figures and the ratio to its alternative.

Run one as ``python -m bench.NAME``.
"""
