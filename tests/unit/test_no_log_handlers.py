"""The library installs no logging handlers: importing every module of it (the CLI and the demo aside,
which are programs) and building a service with observers leaves logging as the application set it.

Checked in a fresh interpreter: pytest's own logging plugin puts handlers on the root logger."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

PROGRAM = """
import importlib, json, logging, pkgutil
import asyncflow as af
skipped = []
for module in pkgutil.walk_packages(af.__path__, "asyncflow."):
    if module.name.startswith(("asyncflow.cli", "asyncflow.demo", "asyncflow.__main__")):
        continue
    try:
        importlib.import_module(module.name)
    except ImportError as error:  # an extra not installed here
        skipped.append(f"{module.name}: {error}")
from asyncflow.integrations.opentelemetry import OpenTelemetryObserver
from asyncflow.integrations.prometheus import PrometheusObserver
from prometheus_client import CollectorRegistry
af.WorkflowService(
    af.MemoryWorkflowRepo(), af.LocalWorkflowLock(), af.Registry(),
    observers=[OpenTelemetryObserver(), PrometheusObserver(CollectorRegistry())],
)
changed = {"": [repr(h) for h in logging.getLogger().handlers]} if logging.getLogger().handlers else {}
for name, logger in logging.Logger.manager.loggerDict.items():
    if isinstance(logger, logging.Logger) and name.startswith("asyncflow"):
        if logger.handlers or not logger.propagate or logger.level != logging.NOTSET:
            changed[name] = [repr(h) for h in logger.handlers] + [logger.propagate, logger.level]
print(json.dumps({"changed": changed, "skipped": skipped}))
"""


def test_importing_the_library_installs_no_handler() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["changed"] == {}
    assert report["skipped"] == []  # every extra is installed in the test environment
