"""How a PostgreSQL bulk create cuts its rows into statements (``create_pages``)."""

from __future__ import annotations

import pytest

from asyncflow.store._prepare import InstanceRow
from asyncflow.store.postgres import sql as pg


def _rows(*lengths: int) -> list[tuple[InstanceRow, int]]:
    return [(InstanceRow("wf", f"b{i}", "init", "x" * n, 0, 0), 1) for i, n in enumerate(lengths)]


def _sizes(pages: list[object]) -> list[int]:
    return [len(page) for page in pages]  # type: ignore[arg-type]


def test_pages_hold_at_most_page_size_rows_in_order() -> None:
    rows = _rows(*([2] * 5))
    pages = pg.create_pages(rows, 2)
    assert _sizes(pages) == [2, 2, 1]
    assert [row for page in pages for row in page] == rows
    assert pg.create_pages([], 2) == []


def test_pages_hold_at_most_the_context_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "CREATE_CONTEXT_CHARS", 10)
    assert _sizes(pg.create_pages(_rows(4, 4, 2, 1, 10, 3), 100)) == [3, 1, 1, 1]  # 10, 1, 10, 3
    # a row over the limit on its own is a page of its own (the server decides about it)
    assert _sizes(pg.create_pages(_rows(3, 25, 3), 100)) == [1, 1, 1]
    assert _sizes(pg.create_pages(_rows(25), 100)) == [1]
