"""Developer entry points: ``nox -s lint typecheck tests`` before every commit; ``nox -s lowest`` (the
lowest allowed dependency versions); ``nox -s bench``."""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff: lint rules (incl. ASYNC and G) and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", "asyncflow")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite against real SQLite files, PostgreSQL and Redis (URLs from the environment)."""
    session.install("-e", ".[test]")
    env = {
        "ASYNCFLOW_TEST_POSTGRES_URL": os.environ.get("ASYNCFLOW_TEST_POSTGRES_URL", PG_URL),
        "ASYNCFLOW_TEST_REDIS_URL": os.environ.get("ASYNCFLOW_TEST_REDIS_URL", REDIS_URL),
    }
    session.run("pytest", *(session.posargs or XDIST), env=env)


@nox.session
def lowest(session: nox.Session) -> None:
    """The unit tests and the integration tests of what the pinned packages do (the store, locks,
    driver, schedules, starts, upgrades: :data:`LOWEST_INTEGRATION_GLOBS`) on the lowest core and
    driver versions pyproject.toml allows (pinned in .ci/lowest.txt); `.ci/run` runs it. Pass pytest
    arguments after ``--``."""
    session.install("-c", ".ci/lowest.txt", ".[test]")
    session.run("python", "-c", LOWEST_CHECK)  # the venv really holds the pinned versions
    session.run("python", "-m", "pytest", *(session.posargs or _subset_args()), env=_test_env())


NEWEST_PYTHONS = os.environ.get("ASYNCFLOW_NEWEST_PYTHON") or ["3.13", "3.12"]
"""Newer interpreters than the machine's own 3.11, or the one ``ASYNCFLOW_NEWEST_PYTHON`` names (a
path: `.ci/run` passes the newest it finds, the session is then plain ``newest``).
asyncio changed under the package between them: since 3.12 ``gather`` of done tasks returns without
yielding to the loop (a loop that waited for a done callback spun forever), an application can make
tasks start eagerly (a task that ran to its end inside ``create_task`` left stale state behind), and
since 3.13 a ``sqlite3`` connection that is never closed warns when it is collected."""


NEWEST_ENGINE_TESTS = (
    "tests/integration/test_engine_pass.py",
    "tests/integration/test_engine_ops.py",
    "tests/integration/test_engine_branches.py",
    "tests/integration/test_engine_tasks.py",
    "tests/reliability/test_cancellation.py",
)
"""The engine's own tests, which ``newest`` adds: under eager tasks the order in which a pass's
branches start, and a cancellation at each of a pass's awaits, are theirs to check."""


@nox.session(python=NEWEST_PYTHONS)
def newest(session: nox.Session) -> None:
    """The lowest-versions run's tests (the unit tests and each backend's own integration tests) and
    the engine's (:data:`NEWEST_ENGINE_TESTS`) on a newer Python, with the current dependency versions
    and every event loop starting its tasks eagerly (``asyncio.eager_task_factory``, as an application
    may set it: ``ASYNCFLOW_TEST_EAGER_TASKS=1``). Pass pytest arguments after ``--``."""
    session.install("-e", ".[test]")
    args = session.posargs or [*_subset_args(), *NEWEST_ENGINE_TESTS]
    session.run("python", "-m", "pytest", *args, env={**_test_env(), "ASYNCFLOW_TEST_EAGER_TASKS": "1"})


def _test_env() -> dict[str, str]:
    return {
        "ASYNCFLOW_TEST_POSTGRES_URL": os.environ.get("ASYNCFLOW_TEST_POSTGRES_URL", PG_URL),
        "ASYNCFLOW_TEST_REDIS_URL": os.environ.get("ASYNCFLOW_TEST_REDIS_URL", REDIS_URL),
    }


def _subset_args() -> list[str]:
    """pytest's arguments for ``lowest`` and ``newest``: the unit tests and
    :data:`LOWEST_INTEGRATION_GLOBS`."""
    return [
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "-n",
        os.environ.get("ASYNCFLOW_TEST_WORKERS", XDIST[1]),
        *XDIST[2:],
        "tests/unit",
        *_lowest_integration(),
        # property tests of pure-Python logic (contexts, graph building) use no dependency: the main
        # run covers them, and leaving them out here keeps .ci/run within CI's time budget
        "--ignore-glob=tests/unit/*_props.py",
        # so do the memory repo's variants (SQLite's in-memory databases stay: aiosqlite runs them)
        "-k",
        "not memory or in_memory",
    ]


XDIST = ("-n", "3", "--dist", "loadfile")
"""pytest-xdist's options in `.ci/run` and the README's test command: three processes (most tests wait
on a database, a subprocess or a timer, so three keep a 2-core machine busy; four overloaded it, and
timing-bound reliability tests failed), each running whole test files. Every test keeps to its own
schema, key prefix, port and files, so they run side by side. ``ASYNCFLOW_TEST_WORKERS`` sets another
number for ``nox -s lowest``."""


LOWEST_INTEGRATION_GLOBS = (
    # what the pinned packages do: each backend's own store tests (SQLAlchemy, asyncpg, aiosqlite,
    # orjson: hot paths, batches, fencing), the locks (redis), the driver's claims and LISTEN,
    # sessions, schedules (cronsim) and upgrades
    "test_repo_[!c]*.py",  # not test_repo_contract.py (below)
    "test_lock_*.py",
    "test_migrations.py",
    "test_upgrade_from_v010.py",
    "test_driver.py",
    "test_driver_listen_due.py",
    "test_create_in_session.py",
    "test_schedules.py",
)
"""The integration tests of the lowest-versions run (globs in ``tests/integration``). The repo
contract (every operation of the store, alike on every backend: half of this run's time, mostly
making a fresh schema for each of its 580 SQL cases), the engine's own semantics and the features
built on the store calls (unique and delayed starts, waiting, purge) run in the main run on the
current versions; each backend's own tests above reach the same driver calls. Leaving them out here
keeps .ci/run within CI's 15 minutes on a 2-core machine where the whole suite takes 10 minutes."""


def _lowest_integration() -> list[str]:
    """The files of :data:`LOWEST_INTEGRATION_GLOBS`; a glob that matches nothing is an error (a renamed
    file must not drop out of the run unnoticed)."""
    files: list[str] = []
    for pattern in LOWEST_INTEGRATION_GLOBS:
        found = sorted(str(path) for path in Path("tests/integration").glob(pattern))
        if not found:
            raise RuntimeError(f"noxfile: no tests/integration/{pattern}")
        files += found
    return files


LOWEST_CHECK = """
import importlib.metadata as m, pathlib
pins = [l.split("==") for l in pathlib.Path(".ci/lowest.txt").read_text().splitlines()
        if l.strip() and not l.startswith("#")]
wrong = [(n, v, m.version(n)) for n, v in pins if m.version(n) != v]
assert not wrong, f"not the lowest versions: {wrong}"
print("lowest versions:", ", ".join(f"{n} {v}" for n, v in pins))
"""


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark runner (pass runner arguments after --), e.g. ``nox -s bench -- run --scenario all``."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *(session.posargs or ["run", "--scenario", "all"]))
