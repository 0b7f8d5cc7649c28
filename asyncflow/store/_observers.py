"""Observers of the statements the SQL repo runs on the driver connection, past SQLAlchemy's events.

The backends (:mod:`asyncflow.store.postgres`, :mod:`asyncflow.store.sqlite`) send their calls
outside ``transaction()`` through asyncpg or ``sqlite3`` directly, so SQLAlchemy's
``before/after_cursor_execute`` and ``commit`` events do not see them. Whoever counts commits
(:class:`~asyncflow.store.commit_counter.CommitCounter`, a benchmark) registers a callback here; it
is called once per such unit that ran as a transaction of its own, with ``wrote`` telling whether
that transaction wrote (and committed) anything.
"""

from __future__ import annotations

from collections.abc import Callable
from weakref import WeakKeyDictionary

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["RawUnitObserver", "add_observer", "notify", "remove_observer"]

RawUnitObserver = Callable[[bool], None]
"""``observer(wrote)``: one autocommit unit of the hot path finished."""

_observers: WeakKeyDictionary[Engine, list[RawUnitObserver]] = WeakKeyDictionary()
_registered = [0]
"""Observers added and not removed (one of an engine that is gone still counts): 0 lets :func:`notify`
return at once, without ``WeakKeyDictionary.__len__`` (a Python call) for every unit of the hot path."""


def add_observer(engine: AsyncEngine | Engine, observer: RawUnitObserver) -> None:
    """Call ``observer`` for every hot-path unit a repo runs on ``engine``."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    _observers.setdefault(sync_engine, []).append(observer)
    _registered[0] += 1


def remove_observer(engine: AsyncEngine | Engine, observer: RawUnitObserver) -> None:
    """Stop calling ``observer`` (a no-op if it was not registered)."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    observers = _observers.get(sync_engine)
    if observers is not None and observer in observers:
        observers.remove(observer)
        _registered[0] -= 1
        if not observers:
            del _observers[sync_engine]


def notify(engine: Engine, wrote: bool) -> None:
    """Tell the observers of ``engine`` (the sync engine) that a unit finished."""
    if not _registered[0]:
        return
    for observer in tuple(_observers.get(engine, ())):
        observer(wrote)
