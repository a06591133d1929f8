"""Benchmarks for the batching proxy: load generators, upstream emulators and scenarios.

Run the whole suite with ``python -m benchmarks.run`` (see benchmarks/README.md).
"""
