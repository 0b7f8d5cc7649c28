"""The PostgreSQL backend (``postgresql+asyncpg://``): :class:`.backend.PostgresBackend`.

``schema`` (migrations), ``functions`` (the plpgsql step functions), ``sql`` (every per-instance
statement), ``lanes`` (kept asyncpg connections), ``batches`` (group commit), ``notify`` (wake-ups
for drivers), ``url`` (engines built from a URL), ``backend`` (the calls). The picker
(:mod:`asyncflow.store._backend`) calls :func:`engine_url`, :func:`open_backend` and
:func:`database_key`, and runs :data:`PLACE_SQL`.
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


PLACE_SQL = (
    "SELECT (SELECT n.nspname FROM pg_catalog.pg_class c "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.oid = pg_catalog.to_regclass('workflow_instance')), pg_catalog.current_schema()"
)
"""Where a connection's writes go (one read-only statement): the schema in which its ``search_path``
finds ``workflow_instance`` (``NULL``: none) and its current schema. A URL does not tell it: the
``search_path`` (connect arguments, ``SET``, the role's default) picks the schema, so one URL reaches
as many asyncflow installs as the database has schemas."""


def open_backend(engine: AsyncEngine) -> PostgresBackend:
    """The backend of ``engine`` (imports asyncpg)."""
    from .backend import PostgresBackend

    return PostgresBackend(engine)
