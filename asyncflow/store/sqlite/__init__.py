"""The SQLite backend (``sqlite+aiosqlite://``): :class:`~asyncflow.store.sqlite.backend.SqliteBackend`.

``schema`` (migrations), ``engine`` (connection settings, engines built from a URL), ``sql`` (every
per-instance statement), ``lane`` (the write gate and the backend's own connection), ``backend`` (the
calls). The picker (:mod:`asyncflow.store._backend`) calls :func:`engine_url`, :func:`open_backend` and
:func:`database_key` (:data:`PLACE_SQL` is ``None``: the file decides).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .backend import SqliteBackend


def engine_url(url: URL, kwargs: dict[str, Any]) -> URL:
    """See :func:`.engine.engine_url`."""
    from .engine import engine_url

    return engine_url(url, kwargs)


def database_key(url: URL) -> tuple[object, ...] | None:
    """The file ``url`` names, made absolute (one file, named relative to the working directory or
    not); ``None`` for an in-memory database, which is private to its engine."""
    if url.database in (None, "", ":memory:"):
        return None
    return (os.path.abspath(url.database),)


PLACE_SQL = None
"""No statement tells where a connection writes (see the PostgreSQL package's): a SQLite database is
its file, which :func:`database_key` names, and has no schemas to choose among."""


def open_backend(engine: AsyncEngine) -> SqliteBackend:
    """The backend of ``engine``."""
    from .backend import SqliteBackend

    return SqliteBackend(engine)
