"""End-to-end benchmarks of asyncflow, with DBOS Transact and a raw-driver floor as reference rows.

Run ``python -m benchmarks run --help`` for the runner, or ``python -m pytest benchmarks -m benchmark``
for the same scenarios as (deselected by default) pytest tests. ``benchmarks/README.md`` describes the
scenarios, the exact commands and the latest results.
"""
