"""Issue 13, items 2 and 3: the CLI never prints a secret and never a traceback, whatever it is given.

Each case gets one ``asyncflow: error:`` line and the documented exit code.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from .cli_helpers import assert_clean_error, call_cli, cli_env, populate, run_cli

SECRET = "Zq9s3cr3tPw"

MALFORMED_WITH_PASSWORD = [
    ("--redis", f"redis://:{SECRET}@127.0.0.1:63x79/7"),  # port not a number
    ("--redis", f"redis://:{SECRET}@[::1/0"),
    ("--redis", f"redis://:{SECRET}@127.0.0.1:99999/0"),
    ("--db", f"postgresql+asyncpg//postgres:{SECRET}@127.0.0.1:5432/test"),  # missing ':'
    ("--db", f"postgresql+asyncpg://postgres:{SECRET}@127.0.0.1:54x2/test"),
    ("--db", f"postgresql+asyncpg://postgres:{SECRET}@[::1/test"),
    ("--db", f"postgresql+asyncpg://postgres:{SECRET}@127.0.0.1:5432/test?sslmode=require"),
    ("--db", f"postgresql+asyncpg://postgres@127.0.0.1:1/test?password={SECRET}&sslmode=x"),
]


@pytest.mark.parametrize(("flag", "url"), MALFORMED_WITH_PASSWORD)
def test_a_malformed_url_never_prints_its_password(tmp_path: pathlib.Path, flag: str, url: str) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path}/s.db"
    assert call_cli("init-db", "--db", db, cwd=tmp_path).returncode == 0
    args = ["ls", flag, url] if flag == "--db" else ["ls", "--db", db, flag, url]
    result = call_cli(*args, cwd=tmp_path)
    assert_clean_error(result, 2, "bad ")
    assert SECRET not in result.stderr + result.stdout
    assert "***" in result.stderr  # redacted, not dropped: the user still sees which URL


@pytest.mark.parametrize(
    "password",
    [f"{SECRET}@tail9x", f"a@{SECRET}", f"{SECRET}/x@y"],
    ids=["at-then-tail", "head-then-at", "slash-and-at"],
)
def test_a_password_with_an_unencoded_at_is_hidden_whole(tmp_path: pathlib.Path, password: str) -> None:
    result = call_cli("ls", "--db", f"postgresql+asyncpg://app:{password}@127.0.0.1:1/nowhere", cwd=tmp_path)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr
    for part in [p for p in [password, *password.replace("/", "@").split("@")] if len(p) > 2]:
        assert part not in result.stderr, (part, result.stderr)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("postgresql+asyncpg://postgres@127.0.0.1:5432/test?sslmode=require", "?ssl=require"),
        ("postgresql+asyncpg://postgres@127.0.0.1:5432/test?foo=1", "'foo' is not understood"),
        ("postgresql+asyncpg://postgres@127.0.0.1:5432/test?ssl=bogus", "ssl must be one of"),
        ("postgresql+asyncpg://postgres@127.0.0.1:5432/test?prepared_statement_cache_size=x", "whole"),
        ("postgresql+asyncpg://postgres@127.0.0.1:5x32/test", "does not parse"),
        ("postgresql+asyncpg://postgres@127.0.0.1:99999/test", "port must be a number"),
        ("postgresql+asyncpg://postgres@[::1/test", "does not parse"),
        ("postgresql+asyncpg://postgres@127.0.0.1:5432,127.0.0.1:5432/test", "does not parse"),
        ("sqlite+aiosqlite:///x.db?timeout=abc", "'timeout' must be a number"),
    ],
)
def test_urls_the_driver_would_reject_are_refused_in_one_line(
    tmp_path: pathlib.Path, url: str, fragment: str
) -> None:
    assert_clean_error(call_cli("ls", "--db", url, cwd=tmp_path), 2, "bad database URL", fragment)


def _nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_nested_too_deep_is_one_line(tmp_path: pathlib.Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path}/deep.db"
    ids = populate(db)
    deep = _nested_json(50_000)
    event = call_cli(
        "event", str(ids.waiting), "manager_approval", "--db", db, "--content", deep, cwd=tmp_path
    )
    assert_clean_error(event, 2, "--content is nested more than 100 levels deep")
    restart = call_cli(
        "restart",
        str(ids.failed),
        "--db",
        db,
        "--context",
        '{"a":' * 600 + "1" + "}" * 600,
        cwd=tmp_path,
    )
    assert_clean_error(restart, 2, "--context is nested more than 100 levels deep")
    config = tmp_path / "deep.json"
    config.write_text('{"id": "w", "nodes": ' + _nested_json(100_000) + "}", encoding="utf-8")
    graph = call_cli("graph", "--config", str(config), cwd=tmp_path)
    assert_clean_error(graph, 2, "workflow config is nested more than 100 levels deep")


def test_json_with_an_integer_too_long_to_read_is_one_line(tmp_path: pathlib.Path) -> None:
    """json refuses an integer of over 4,300 digits with a plain ValueError (not JSONDecodeError): it
    ended as "unexpected ValueError" (exit 1) instead of the usage error of any other bad JSON."""
    db = f"sqlite+aiosqlite:///{tmp_path}/long.db"
    ids = populate(db)
    long_int = "1" + "0" * 5000
    event = call_cli(
        "event", str(ids.waiting), "manager_approval", "--db", db, "--content", long_int, cwd=tmp_path
    )
    assert_clean_error(event, 2, "--content holds an integer of more than 4300 digits")
    restart = call_cli(
        "restart", str(ids.failed), "--db", db, "--context", '{"a": ' + long_int + "}", cwd=tmp_path
    )
    assert_clean_error(restart, 2, "--context holds an integer of more than 4300 digits")
    start = call_cli(
        "start", "order_demo", "b", "--app", "asyncflow.demo:registry", "--db", db,
        "--context", '{"a": [' + long_int + "]}", cwd=tmp_path,
    )  # fmt: skip
    assert_clean_error(start, 2, "--context holds an integer of more than 4300 digits")
    config = tmp_path / "long.json"
    config.write_text('{"id": "w", "nodes": [{"id": "a", "fail_max_count": ' + long_int + "}]}", "utf-8")
    graph = call_cli("graph", "--config", str(config), cwd=tmp_path)
    assert_clean_error(graph, 2, "workflow config holds an integer of more than 4300 digits")


def test_an_unforeseen_error_is_one_line_without_secrets(tmp_path: pathlib.Path) -> None:
    """The last line of defence: an exception no handler knows still prints one line (code 1), with
    the command's URLs' secrets hidden."""
    db = f"sqlite+aiosqlite:///{tmp_path}/u.db"
    ids = populate(db)
    db_with_secret = f"{db}?password={SECRET}"
    (tmp_path / "boom.py").write_text(
        "from asyncflow import Registry\n"
        "class Weird(Registry):\n"
        "    def has_workflow(self, workflow_type):\n"
        f"        raise RuntimeError('exploded near {db_with_secret}')\n"
        "registry = Weird()\n",
        encoding="utf-8",
    )
    result = run_cli("show", str(ids.fresh), "--db", db_with_secret, "--app", "boom:registry", cwd=tmp_path)
    assert_clean_error(result, 1, "unexpected RuntimeError: exploded near", "password=***")
    assert SECRET not in result.stderr


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: pathlib.Path) -> None:
    """``asyncflow show 7 --context | head -1``: exit 141 (as for SIGPIPE), one line, no traceback."""
    db = f"sqlite+aiosqlite:///{tmp_path}/pipe.db"
    ids = populate(db)
    big = {"lines": [f"line {i} " + "x" * 100 for i in range(5000)]}  # far more than a pipe buffer
    restart_ok = call_cli("restart", str(ids.failed), "--db", db, "--context", json.dumps(big), cwd=tmp_path)
    assert restart_ok.returncode == 0, restart_ok.stderr
    with subprocess.Popen(
        [sys.executable, "-m", "asyncflow", "show", str(ids.failed), "--context", "--db", db],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("instance ")
        proc.stdout.close()  # what `head -1` does after its line
        stderr = proc.stderr.read()
        code = proc.wait(timeout=60)
    assert code == 141, (code, stderr)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.strip() == "asyncflow: error: output closed early (broken pipe)"
