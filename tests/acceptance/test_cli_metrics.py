"""``asyncflow worker --metrics-port`` serves Prometheus metrics while it works; ``--log-format json``
writes one JSON object per log line."""

from __future__ import annotations

import asyncio
import json
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from .cli_helpers import call_cli, cli_env, run_cli
from .test_cli_worker import APP, _completed, _create

pytest.importorskip("prometheus_client")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _value(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    samples = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels == labels
    ]
    assert len(samples) == 1, (name, labels, samples)
    return float(samples[0])


def test_worker_serves_metrics_and_logs_json(tmp_path: pathlib.Path) -> None:
    (tmp_path / "helpdesk.py").write_text(APP)
    url = f"sqlite+aiosqlite:///{tmp_path}/metrics.db"
    assert call_cli("init-db", "--db", url, cwd=tmp_path).returncode == 0
    asyncio.run(_create(url, 5))
    port = _free_port()
    args = ["worker", "helpdesk:registry", "--db", url, "--poll-interval", "0.2"]
    args += ["--metrics-port", f"127.0.0.1:{port}", "--log-format", "json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncflow", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while asyncio.run(_completed(url)) < 5:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the worker did not complete the instances"
            time.sleep(0.2)
        text = _scrape(port)
        while _value(text, "asyncflow_driver_due_backlog_seconds") > 0:  # refreshed every 2 s
            assert time.monotonic() < deadline, "the backlog gauge never went back to 0"
            time.sleep(0.2)
            text = _scrape(port)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    attempts = "asyncflow_node_attempts_total"
    for task_type in ("triage", "answer"):
        assert _value(text, attempts, workflow_type="ticket", task_type=task_type, outcome="completed") == 5
    assert _value(text, "asyncflow_instances_finished_total", workflow_type="ticket", status="completed") == 5
    assert _value(text, "asyncflow_driver_passes_in_flight") == 0
    assert _value(text, "asyncflow_driver_claims_total") >= 1
    assert "asyncflow_node_duration_seconds_bucket" in text
    assert "process_cpu_seconds_total" in text
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any("asyncflow worker started" in entry["message"] for entry in lines)
    completed = [
        e for e in lines if e["message"].startswith("workflow instance") and "completed" in e["message"]
    ]
    assert len(completed) == 5
    assert all(e["level"] == "INFO" and e["logger"] == "asyncflow.engine" for e in completed)
    assert sorted(e["instance_id"] for e in completed) == [1, 2, 3, 4, 5]  # the structured fields
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in lines)
    assert "asyncflow worker stopped:" in stderr  # the summary stays a plain line


def test_bad_metrics_port_is_a_usage_error(tmp_path: pathlib.Path) -> None:
    result = run_cli("worker", "helpdesk:registry", "--metrics-port", "http", cwd=tmp_path)
    assert result.returncode == 2
    assert "expected PORT or HOST:PORT" in result.stderr
    assert run_cli("worker", "x:y", "--metrics-port", "70000", cwd=tmp_path).returncode == 2
