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
    "WHERE c.oid = pg_catalog.to_regclass('workflow_instance')), pg_catalog.current_schema(), "
    "pg_catalog.current_database(), pg_catalog.pg_postmaster_start_time(), "
    "CASE WHEN pg_catalog.has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE') "
    "THEN (SELECT system_identifier FROM pg_catalog.pg_control_system()) END"
)
"""Where a connection's writes go, as the server tells it (one read-only statement that cannot fail
for lack of a privilege): the schema in which its ``search_path`` finds ``workflow_instance``
(``NULL``: none), its current schema, its database, and its server: the postmaster's start time and
the cluster's ``system_identifier`` (``NULL`` where the role may not call ``pg_control_system()``).

A URL does not tell it: the ``search_path`` (connect arguments, ``SET``, the role's default) picks the
schema, so one URL reaches as many asyncflow installs as the database has schemas; and one server has
many names (``localhost``, ``127.0.0.1``, a DNS name). The server's own address does not tell it
either (``inet_server_addr()``: ``NULL`` over a Unix socket, one per interface, the same private
address on two hosts). The identifier, set by ``initdb``, is shared by a physical standby and by
clusters copied from one backup; the start time, to the microsecond, is not: together they tell one
running server from another."""


def open_backend(engine: AsyncEngine) -> PostgresBackend:
    """The backend of ``engine`` (imports asyncpg)."""
    from .backend import PostgresBackend

    return PostgresBackend(engine)
