"""Benchmarks, runnable as `python -m sparse_detr.bench.<name>`."""
