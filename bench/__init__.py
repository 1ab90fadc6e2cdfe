"""Benchmarks with a one-command runner: `python -m bench.run <name>` or `all`.

Each benchmark measures this service against a baseline in the same run and appends the
numbers, with the machine and date, to bench/RESULTS.md (DESIGN section 15).
"""
