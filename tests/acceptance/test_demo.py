"""``asyncflow demo``: small runs on SQLite and PostgreSQL, the live status line on a terminal, and the
README's demo command in a fresh virtualenv installed from this checkout."""

from __future__ import annotations

import json
import os
import pathlib
import pty
import re
import subprocess
import sys
import uuid

import pytest

from .cli_helpers import ROOT, call_cli, cli_env, run_cli, scratch_database
from .test_readme import DEMO_COMMAND


def _check_summary(stdout: str, n: int) -> dict[str, int]:
    """The status counts and the order outcomes of the summary (keys ``shipped``, ``refunded``)."""
    assert f"Summary: {n} orders of workflow 'order_demo'" in stdout, stdout
    counts = {
        status: int(count)
        for status, count in re.findall(
            r"^(init|running|completed|failed|canceled)\s+(\d+)\s+[\d.]+%$", stdout, re.M
        )
    }
    assert sum(counts.values()) == n
    assert set(counts) <= {"completed", "failed"}  # every order finished
    assert re.search(rf"^total\s+{n}\s+100\.0%$", stdout, re.M)
    shipped = re.search(r"^shipped \(completed\)\s+(\d+)\s+[\d.]+%$", stdout, re.M)
    refunded = re.search(r"^refunded \(completed, branch\)\s+(\d+)\s+[\d.]+%$", stdout, re.M)
    failed = re.search(r"^failed\s+(\d+)\s+[\d.]+%$", stdout, re.M)
    assert shipped and refunded and failed, stdout
    counts["shipped"], counts["refunded"] = int(shipped[1]), int(refunded[1])
    assert counts["shipped"] + counts["refunded"] == counts.get("completed", 0)
    assert re.search(r"^throughput\s+[\d.]+ instances/s", stdout, re.M)
    assert "DAG of order_demo" in stdout and "manager_approval" in stdout and "refund" in stdout
    return counts


def test_demo_on_sqlite(tmp_path: pathlib.Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path}/demo.db"
    result = run_cli("demo", "-n", "12", "--db", db, cwd=tmp_path, timeout=110)
    assert result.returncode == 0, result.stderr
    counts = _check_summary(result.stdout, 12)
    # the orders are the same on every run: ORD-00003 is blocked (fraud), ORD-00006 rejected (refund)
    assert (counts["shipped"], counts["refunded"], counts.get("failed", 0)) == (10, 1, 1), result.stdout
    assert "progress: 12/12 finished" in result.stderr  # plain progress lines when not a terminal
    assert "\r" not in result.stderr
    assert "Traceback" not in result.stderr and "WARNING" not in result.stderr  # the log is tallied
    shown = call_cli("show", "1", "--json", "--db", db, cwd=tmp_path)
    assert '"fail_count": 2' in shown.stdout  # charge_payment failed twice, then succeeded
    refunded = json.loads(call_cli("show", "6", "--json", "--db", db, cwd=tmp_path).stdout)
    nodes = {t["task_type"]: t["status"] for t in refunded["task_instances"]}
    assert refunded["business_id"] == "ORD-00006" and refunded["status"] == "completed"
    assert (nodes["route_order"], nodes["refund"]) == ("completed", "completed")
    assert (nodes["ship_order"], nodes["notify_customer"]) == ("skipped", "skipped")  # the branch not taken
    blocked = json.loads(call_cli("show", "3", "--json", "--db", db, cwd=tmp_path).stdout)
    assert blocked["status"] == "failed"


@pytest.mark.postgres
def test_demo_on_postgres(tmp_path: pathlib.Path, postgres_url: str) -> None:
    with scratch_database(postgres_url, f"demo_{uuid.uuid4().hex[:12]}") as url:
        result = run_cli("demo", "-n", "10", "--no-progress", "--db", url, cwd=tmp_path, timeout=110)
    assert result.returncode == 0, result.stderr
    counts = _check_summary(result.stdout, 10)
    assert (counts["shipped"], counts["refunded"], counts.get("failed", 0)) == (8, 1, 1), result.stdout
    assert "progress:" not in result.stderr


def test_demo_draws_a_status_line_on_a_terminal(tmp_path: pathlib.Path) -> None:
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "asyncflow",
                "demo",
                "-n",
                "3",
                "--db",
                f"sqlite+aiosqlite:///{tmp_path}/t.db",
            ],
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            timeout=110,
        )
        os.close(terminal)
        terminal = -1
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the pty is closed once the child is gone and the buffer is read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, screen
    assert "\r\x1b[K[" in screen and "3/3 finished" in screen
    assert re.search(r"\[#{24}\] 3/3 finished", screen)
    _check_summary(proc.stdout, 3)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_demo_command_in_a_fresh_virtualenv(tmp_path: pathlib.Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = cli_env()
    env.pop("PYTHONPATH")  # only what the venv installed
    env.pop("PYTHONHOME", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    command = f"{DEMO_COMMAND} -n 20 --db sqlite+aiosqlite:///{tmp_path}/fresh.db"
    result = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=560
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _check_summary(result.stdout, 20)
    located = subprocess.run(
        [
            str(venv / "bin" / "python3"),
            "-c",
            "import asyncflow, sqlalchemy; print(asyncflow.__file__, sqlalchemy.__file__)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    package, sqlalchemy = located.stdout.split()
    assert pathlib.Path(package).is_relative_to(ROOT)  # the editable install of this checkout
    assert pathlib.Path(sqlalchemy).is_relative_to(venv)  # dependencies came into the fresh venv
    console = subprocess.run(
        [
            str(venv / "bin" / "asyncflow"),
            "ls",
            "--limit",
            "1",
            "--db",
            f"sqlite+aiosqlite:///{tmp_path}/fresh.db",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert console.returncode == 0 and "1-1 of 20 instance(s)" in console.stdout, console.stderr
