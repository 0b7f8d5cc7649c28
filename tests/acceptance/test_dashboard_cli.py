"""``asyncflow dashboard``: the command serves the dashboard with uvicorn (read-only unless
``--allow-actions``) and refuses a database that is not there."""

from __future__ import annotations

import asyncio
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from .cli_helpers import assert_clean_error, call_cli, cli_env
from .dashboard_helpers import free_port, seed

pytestmark = pytest.mark.timeout(90)


def _wait_http(url: str, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            pass
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"{url} did not answer"
        time.sleep(0.1)


@pytest.mark.parametrize("allow", [False, True], ids=["read-only", "allow-actions"])
def test_cli_serves_the_dashboard(tmp_path: pathlib.Path, allow: bool) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path}/cli.db"
    ids = asyncio.run(seed(db))
    port = free_port()
    command = [sys.executable, "-m", "asyncflow", "dashboard", "--db", db, "--port", str(port)]
    command += ["--app", "tests.acceptance.dashboard_helpers:make_registry"] + (
        ["--allow-actions"] if allow else []
    )
    root = pathlib.Path(__file__).resolve().parents[2]
    process = subprocess.Popen(command, cwd=root, env=cli_env(), stderr=subprocess.PIPE, text=True)
    origin = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{origin}/", process)
        with urllib.request.urlopen(f"{origin}/instances/{ids.failed}") as response:
            page = response.read().decode()
        assert 'data-task-type="explode" data-status="failed"' in page  # --app: the whole DAG
        try:
            with urllib.request.urlopen(f"{origin}/instances/{ids.waiting}/cancel") as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        assert status == (200 if allow else 404)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=15)
    assert f"asyncflow dashboard on {origin}/" in err
    assert ("actions allowed" if allow else "read-only") in err


def test_cli_dashboard_refuses_a_missing_database(tmp_path: pathlib.Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asyncflow", "dashboard", "--db", f"sqlite+aiosqlite:///{tmp_path}/nope.db"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_cli_dashboard_on_a_port_it_cannot_use_says_so_in_one_line(tmp_path: pathlib.Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path}/cli.db"
    asyncio.run(seed(db, extra=0))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = call_cli("dashboard", "--db", db, "--port", str(port), cwd=tmp_path)
    assert_clean_error(busy, 1, f"cannot listen on 127.0.0.1:{port}", "in use")
    too_big = call_cli("dashboard", "--db", db, "--port", "70000", cwd=tmp_path)
    assert_clean_error(too_big, 2, "70000")
