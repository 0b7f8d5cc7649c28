"""The PostgreSQL backend (``postgresql+asyncpg://``): :class:`.backend.PostgresBackend`.

``schema`` (migrations), ``functions`` (the plpgsql step functions), ``sql`` (every per-instance
statement), ``lanes`` (kept asyncpg connections), ``batches`` (group commit), ``notify`` (wake-ups
for drivers), ``url`` (engines built from a URL), ``backend`` (the calls). The picker
(:mod:`asyncflow.store._backend`) calls :func:`engine_url`, :func:`open_backend` and
:func:`database_key`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .backend import PostgresBackend


def engine_url(url: URL, kwargs: dict[str, Any]) -> URL:
    """See :func:`.url.engine_url`."""
    from .url import engine_url

    return engine_url(url, kwargs)


def database_key(url: URL) -> tuple[object, ...] | None:
    """The server and the database ``url`` names (``None`` when it names no database)."""
    return (url.host, url.port, url.database) if url.database else None


def open_backend(engine: AsyncEngine) -> PostgresBackend:
    """The backend of ``engine`` (imports asyncpg)."""
    from .backend import PostgresBackend

    return PostgresBackend(engine)
