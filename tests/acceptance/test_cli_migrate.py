"""``asyncflow migrate`` (and ``init-db``) upgrade a database written by 0.1.0 in place."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import sqlite3

import asyncflow as af

from .cli_helpers import run_cli

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"


def _versions(path: pathlib.Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute("SELECT version FROM asyncflow_schema ORDER BY version")]


def test_migrate_upgrades_a_v010_file_and_init_db_finds_nothing_left(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "v010.sqlite"
    shutil.copy(FIXTURES / "v010.sqlite", path)
    url = f"sqlite+aiosqlite:///{path}"
    assert _versions(path) == [1]
    first = run_cli("migrate", "--db", url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"schema version {af.SCHEMA_VERSION}" in first.stdout
    assert _versions(path) == list(range(1, af.SCHEMA_VERSION + 1))
    again = run_cli("init-db", "--db", url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert _versions(path) == list(range(1, af.SCHEMA_VERSION + 1))
    listed = run_cli("ls", "--db", url, "--json", cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.count('"business_id"') == 6
