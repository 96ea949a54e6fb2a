"""maskdiet benchmarks: each module measures maskdiet beside a hand-written baseline, in the same run.

Every `benchmarks/<name>.py` has `run(quick: bool = False) -> list[tuple[str, float]]` and prints its rows as
`name: value` when run as a script (`python -m benchmarks.<name> [--quick]`). `benchmarks/run_all.py` runs
them all and can rewrite the table in `benchmarks/README.md`.
"""
