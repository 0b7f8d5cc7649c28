"""Measurement primitives: wall and CPU time, peak RSS, latency samples, spreads, commit counting.

Everything here is independent of asyncflow, so the reference rows (DBOS, the raw-driver floor) are
measured with exactly the same code as the asyncflow rows.
"""

from __future__ import annotations

import math
import os
import re
import resource
import statistics
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

__all__ = [
    "LatencySampler",
    "ResourceProbe",
    "RunMeasurement",
    "Spread",
    "SqlCommitCounter",
    "percentile",
    "summarize",
]

#: At most this many latency samples are kept per run, so the harness's own memory does not grow with N
#: (a stride sample: every k-th workflow, k = ceil(N / MAX_LATENCY_SAMPLES)).
MAX_LATENCY_SAMPLES = 10_000


@dataclass(frozen=True, slots=True)
class Spread:
    """Median, minimum and maximum of a few repeated measurements."""

    median: float
    min: float
    max: float

    def as_dict(self, digits: int = 3) -> dict[str, float]:
        return {
            "median": round(self.median, digits),
            "min": round(self.min, digits),
            "max": round(self.max, digits),
        }


def summarize(values: Sequence[float]) -> Spread:
    """The :class:`Spread` of ``values`` (at least one)."""
    if not values:
        raise ValueError("summarize() needs at least one value")
    return Spread(statistics.median(values), min(values), max(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile() needs at least one value")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class LatencySampler:
    """Create-to-completed latencies of a stride sample of at most :data:`MAX_LATENCY_SAMPLES` workflows.

    Workflows are identified by their position ``i`` (0..n-1) at creation, and by their instance id
    once it is known, so a completion hook that only knows the instance id can close the sample.
    """

    def __init__(self, n: int, max_samples: int = MAX_LATENCY_SAMPLES) -> None:
        self.stride = max(1, math.ceil(n / max_samples))
        self._started: dict[int, float] = {}  # instance id -> perf_counter at create
        self._latencies = array("d")

    def wants(self, index: int) -> bool:
        """Whether the ``index``-th workflow belongs to the sample."""
        return index % self.stride == 0

    def started(self, instance_id: int, at: float) -> None:
        """Record the creation time of a sampled instance."""
        self._started[instance_id] = at

    def completed(self, instance_id: int, at: float) -> None:
        """Record the completion of an instance (ignored unless it is sampled and still open)."""
        start = self._started.pop(instance_id, None)
        if start is not None:
            self._latencies.append(at - start)

    def add(self, latency_s: float) -> None:
        """Record a latency measured directly (direct mode: the duration of the call)."""
        self._latencies.append(latency_s)

    @property
    def open_count(self) -> int:
        """Sampled instances created but not seen completing."""
        return len(self._started)

    def latencies(self) -> list[float]:
        return list(self._latencies)


def _vm_bytes(field: str) -> int | None:
    """``VmHWM`` (the peak RSS) or ``VmRSS`` of this process from ``/proc/self/status``, in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _vm_hwm_bytes() -> int | None:
    return _vm_bytes("VmHWM:")


_RESET_SLACK = 4 * 2**20
"""How far above the current RSS the peak may read right after a reset that took (the kernel's RSS
counters are per-CPU and approximate)."""


def _peak_reset() -> bool:
    """Reset the peak-RSS mark and check that it took: right after a reset the peak is the current RSS.
    (A reset the kernel accepted and did not apply has been seen: a test process's two blocks then
    reported the same lifetime peak.)"""
    if not _reset_vm_hwm():
        return False
    hwm, rss = _vm_hwm_bytes(), _vm_bytes("VmRSS:")
    return hwm is not None and rss is not None and hwm <= rss + _RESET_SLACK


def _reset_vm_hwm() -> bool:
    """Reset the kernel's peak-RSS mark of this process to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class ResourceProbe:
    """Wall time, process CPU time and peak RSS of the block it wraps.

    Peak RSS is the kernel's high-water mark reset at entry (``/proc/self/clear_refs``), so it belongs
    to this block alone; where that is impossible (or the reset did not take) it is the process's
    lifetime peak and ``rss_scope`` says ``"process"``.
    """

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.peak_rss_bytes = 0
        self.rss_scope = "block"
        self._t0 = 0.0
        self._cpu0 = 0.0

    def __enter__(self) -> ResourceProbe:
        self.rss_scope = "block" if _peak_reset() else "process"
        self._cpu0 = time.process_time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = time.process_time() - self._cpu0
        hwm = _vm_hwm_bytes() if self.rss_scope == "block" else None
        self.peak_rss_bytes = hwm if hwm is not None else _ru_maxrss_bytes()


@dataclass(slots=True, kw_only=True)
class RunMeasurement:
    """One timed run of one row (asyncflow or a reference).

    ``elapsed_s`` is the time the throughput is computed from (for driver mode: the driving phase);
    ``commits`` counts every committed transaction in the run's database (``None`` if unknown) and
    ``write_commits`` those that wrote, where the backend lets us tell.
    """

    n: int
    elapsed_s: float
    cpu_s: float
    peak_rss_bytes: int
    latencies_s: list[float] = field(default_factory=list)
    commits: int | None = None
    write_commits: int | None = None
    setup_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def workflows_per_s(self) -> float:
        return self.n / self.elapsed_s if self.elapsed_s > 0 else float("inf")


_BEGIN = re.compile(r"^\s*(BEGIN|START\s+TRANSACTION)\b", re.IGNORECASE)
_END = re.compile(r"^\s*(COMMIT|END)\b", re.IGNORECASE)
_ROLLBACK = re.compile(r"^\s*ROLLBACK\b(?!\s+TO)", re.IGNORECASE)
_WRITE = re.compile(
    r"^\s*(WITH\b.*\b(INSERT|UPDATE|DELETE)\b|INSERT|UPDATE|DELETE|REPLACE|UPSERT)\b",
    re.IGNORECASE | re.DOTALL,
)


class SqlCommitCounter:
    """Counts committed transactions on a SQLAlchemy engine through its events.

    A transaction ends with a SQLAlchemy ``commit`` while one is open (including the end of an
    ``engine.begin()`` block and a ``BEGIN`` sent as SQL by a ``begin`` listener), with an explicit
    ``COMMIT`` statement, or is a single statement run outside any transaction (an autocommit
    connection, or a driver that reports ``in_transaction`` False after it), or a unit that asyncflow's
    SQL repo ran past SQLAlchemy on its hot path (reported through ``asyncflow.store._observers``).
    Hot-path units count as commits; on PostgreSQL several may share one transaction (group commit),
    which is why PostgreSQL rows take ``commits`` from the database instead. ``write_commits`` counts
    those that ran at least one INSERT/UPDATE/DELETE. Used for SQLite, where the database keeps no
    such counter (PostgreSQL rows use ``pg_stat_database.xact_commit`` instead).
    """

    def __init__(self) -> None:
        self.commits = 0
        self.write_commits = 0
        self._dirty: dict[int, bool] = {}  # id(dbapi connection) -> wrote in the open transaction
        self._explicit: set[int] = set()  # connections inside a BEGIN sent as SQL
        self._engine: Any = None

    def attach(self, engine: Any) -> None:
        """Listen on ``engine`` (an ``Engine`` or ``AsyncEngine``), and on asyncflow's hot path if any."""
        from sqlalchemy import event

        sync_engine = getattr(engine, "sync_engine", engine)
        event.listen(sync_engine, "after_cursor_execute", self._after_execute)
        event.listen(sync_engine, "commit", self._on_commit)
        event.listen(sync_engine, "rollback", self._on_rollback)
        observers = _hot_path_observers()
        if observers is not None:
            observers[0](sync_engine, self._on_hot_unit)
        self._engine = sync_engine

    @property
    def attached(self) -> bool:
        return self._engine is not None

    def detach(self) -> None:
        from sqlalchemy import event

        if self._engine is None:
            return
        event.remove(self._engine, "after_cursor_execute", self._after_execute)
        event.remove(self._engine, "commit", self._on_commit)
        event.remove(self._engine, "rollback", self._on_rollback)
        observers = _hot_path_observers()
        if observers is not None:
            observers[1](self._engine, self._on_hot_unit)
        self._engine = None

    def _on_hot_unit(self, wrote: bool) -> None:
        """A unit asyncflow's repo ran on the driver connection, past SQLAlchemy, as its own transaction."""
        self.commits += 1
        self.write_commits += int(wrote)

    @staticmethod
    def _key(conn: Any) -> int:
        return id(conn.connection.dbapi_connection)

    def _close(self, key: int) -> None:
        self.commits += 1
        if self._dirty.pop(key, False):
            self.write_commits += 1

    def _after_execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        key = self._key(conn)
        if _BEGIN.match(statement):
            self._explicit.add(key)
        elif _END.match(statement):
            if key in self._explicit:
                self._explicit.discard(key)
                self._close(key)
        elif _ROLLBACK.match(statement):
            self._explicit.discard(key)
            self._dirty.pop(key, None)
        elif key in self._explicit:
            if _WRITE.match(statement):
                self._dirty[key] = True
        elif _is_autocommit(conn) or _driver_in_transaction(conn) is False:
            # the statement was its own transaction
            self.commits += 1
            self.write_commits += int(bool(_WRITE.match(statement)))
        elif _WRITE.match(statement):
            self._dirty[key] = True

    def _on_commit(self, conn: Any) -> None:
        key = self._key(conn)
        if key in self._explicit:  # a BEGIN sent as SQL (e.g. from a "begin" listener) ends here
            self._explicit.discard(key)
            self._close(key)
        elif not _is_autocommit(conn) and _driver_in_transaction(conn) is not False:
            self._close(key)
        # else: no transaction is open; each statement was already counted as its own commit

    def _on_rollback(self, conn: Any) -> None:
        key = self._key(conn)
        self._explicit.discard(key)
        self._dirty.pop(key, None)


def _hot_path_observers() -> tuple[Any, Any] | None:
    """asyncflow's ``(add_observer, remove_observer)`` for statements its SQL repo sends past SQLAlchemy.

    The repo's hot path talks to asyncpg / ``sqlite3`` directly, so engine events miss it; it reports
    each unit (a transaction of its own) to these observers instead. ``None`` when asyncflow has none.
    """
    try:
        from asyncflow.store._observers import add_observer, remove_observer
    except ImportError:
        return None
    return add_observer, remove_observer


def _is_autocommit(conn: Any) -> bool:
    check = getattr(conn, "_is_autocommit_isolation", None)
    return bool(check()) if check is not None else False


def _driver_in_transaction(conn: Any) -> bool | None:
    """Whether the DBAPI connection has a transaction open, where the driver says so (sqlite3 does)."""
    dbapi = conn.connection.dbapi_connection
    for candidate in (dbapi, getattr(dbapi, "_connection", None)):
        value = getattr(candidate, "in_transaction", None)
        if isinstance(value, bool):
            return value
    return None


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
