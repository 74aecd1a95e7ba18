"""Benchmarks of cni-fan: `make bench` (`python -m bench.run`).

A benchmark is a module `bench/<name>.py` with `run(args) -> dict` and,
optionally, `TITLE`, `ORDER`, `add_arguments(parser)` and
`render(result) -> str`; `bench.run` finds it by itself (see bench/run.py).
Its figures on the page are drawn by bench/plots.py, keyed by its name.
"""
