"""Expected CLI failures in a real subprocess: one clear line, the documented exit code, no traceback;
and where the database URL comes from (flag, ``ASYNCFLOW_DB_URL``, the default file in the cwd)."""

from __future__ import annotations

import pathlib

import pytest

from .cli_helpers import assert_clean_error, cli_env, run_cli


@pytest.mark.parametrize(
    ("url", "code", "fragment"),
    [
        ("nonsense", 2, "bad database URL 'nonsense'"),
        ("mysql://u@localhost/db", 2, "unsupported database 'mysql'"),
        ("postgresql+asyncpg://app:hunter2@127.0.0.1:1/nowhere", 1, "is the database running"),
    ],
    ids=["not-a-url", "unsupported", "unreachable-postgres"],
)
def test_bad_or_unreachable_database(tmp_path: pathlib.Path, url: str, code: int, fragment: str) -> None:
    result = run_cli("ls", "--db", url, cwd=tmp_path)
    assert_clean_error(result, code, fragment)
    assert "hunter2" not in result.stderr  # passwords never printed


def test_sqlite_file_must_exist_and_have_tables(tmp_path: pathlib.Path) -> None:
    missing = run_cli("show", "1", "--db", f"sqlite+aiosqlite:///{tmp_path}/typo.db", cwd=tmp_path)
    assert_clean_error(missing, 1, "typo.db", "does not exist", "init-db")
    assert not (tmp_path / "typo.db").exists()  # nothing created by a read
    (tmp_path / "empty.db").write_bytes(b"")
    empty = run_cli("ls", "--db", f"sqlite+aiosqlite:///{tmp_path}/empty.db", cwd=tmp_path)
    assert_clean_error(empty, 1, "no such table", "run `asyncflow init-db` first")
    nowhere = run_cli("init-db", "--db", f"sqlite+aiosqlite:///{tmp_path}/no/such/dir.db", cwd=tmp_path)
    assert_clean_error(nowhere, 1, "does not exist")


def test_database_url_sources(tmp_path: pathlib.Path) -> None:
    created = run_cli("init-db", cwd=tmp_path)  # the default: ./asyncflow.db
    assert created.returncode == 0, created.stderr
    assert "sqlite+aiosqlite:///asyncflow.db" in created.stdout
    assert (tmp_path / "asyncflow.db").exists()
    env_db = tmp_path / "from_env.db"
    env = cli_env(ASYNCFLOW_DB_URL=f"sqlite+aiosqlite:///{env_db}")
    assert run_cli("init-db", cwd=tmp_path, env=env).returncode == 0
    assert env_db.exists()
    flag_wins = run_cli("ls", "--db", "nonsense", cwd=tmp_path, env=env)
    assert_clean_error(flag_wins, 2, "nonsense")


def test_redis_url_errors(tmp_path: pathlib.Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path}/r.db"
    assert run_cli("init-db", "--db", db, cwd=tmp_path).returncode == 0
    bad = run_cli("event", "1", "a", "--db", db, "--redis", "http://nope", cwd=tmp_path)
    assert_clean_error(bad, 2, "bad Redis URL")
    down = run_cli(
        "cancel", "1", "--db", db, cwd=tmp_path, env=cli_env(ASYNCFLOW_REDIS_URL="redis://127.0.0.1:1/0")
    )
    assert_clean_error(down, 1, "cannot reach Redis at redis://127.0.0.1:1/0")


def test_usage(tmp_path: pathlib.Path) -> None:
    bare = run_cli(cwd=tmp_path)
    assert bare.returncode == 2 and "usage: asyncflow" in bare.stderr
    version = run_cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("asyncflow ")
    unknown = run_cli("frobnicate", cwd=tmp_path)
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
    helped = run_cli("restart", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--force" in helped.stdout
