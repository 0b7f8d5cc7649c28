"""``python -m benchmarks dashboard`` with a small N: it loads what it says and times every page.

Unmarked (it takes a few seconds), so it runs with the suite; it checks what is reported, never how
fast anything is.
"""

from __future__ import annotations

import argparse

from benchmarks import dashboard


async def test_dashboard_benchmark_small(postgres_url: str) -> None:
    args = argparse.Namespace(n=500, nodes=30, repeat=3, pg_url=postgres_url, json=None)
    results = await dashboard.run(args)
    assert results["n"] == 500 and results["nodes"] == 30
    assert set(results["pages"]) == set(dashboard.pages(501))
    for row in results["pages"].values():
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
