"""Issue 8, item 7 (the CI variant): 20,000 instances through one driver on PostgreSQL; the process's
memory is sampled at 5,000, 10,000 and 20,000 completed instances and must not grow with them.

The full 50,000-instance run (marks 10k/25k/50k) is ``python -m tests.reliability.load_memory``; its
figures are in docs/reliability.md.
"""

from __future__ import annotations

import pytest

from .load_memory import run_load

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(300)]

GROWTH_LIMIT_MB = 16.0
"""RSS may move by this much between the 10k and 20k marks (allocator noise: measured 1-3 MiB; a leak of
1.6 KiB per completed instance would add 16 MiB there)."""
BLOCKS_LIMIT = 25_000
"""Live Python heap blocks may move by this much between the 10k and 20k marks (measured noise about
±10,000; an object or three kept per completed instance would add 10,000-30,000)."""


async def test_memory_does_not_grow_with_completed_instances(pg_url: str) -> None:
    result = await run_load(pg_url, 20_000, [5_000, 10_000, 20_000])
    print(f"load: {result.as_dict()}")
    assert len(result.samples) == 3
    assert all(s.completed >= m for s, m in zip(result.samples, [5_000, 10_000, 20_000], strict=True))
    late_growth = result.growth_mb(1, 2)
    assert late_growth < GROWTH_LIMIT_MB, f"RSS grew {late_growth:.1f} MiB from 10k to 20k instances"
    blocks = result.growth_blocks(1, 2)
    assert blocks < BLOCKS_LIMIT, f"{blocks} more live Python blocks at 20k than at 10k instances"
