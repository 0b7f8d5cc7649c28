"""``create_workflow(session=...)``: the caller's SQLAlchemy ``AsyncSession`` or ``AsyncConnection``,
checked to be in an open transaction on the repo's database, as the connection to insert on."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ..errors import ParamInvalidError
from ._backend import database_key_for

__all__ = ["caller_connection"]


def _same_database(theirs: AsyncEngine, ours: AsyncEngine) -> bool:
    if theirs.sync_engine is ours.sync_engine:
        return True
    a, b = theirs.url, ours.url
    if a.get_backend_name() != b.get_backend_name():
        return False
    key = database_key_for(a)
    return key is not None and key == database_key_for(b)


async def caller_connection(session: object, engine: AsyncEngine) -> AsyncConnection:
    """The connection of ``session``'s open transaction (``ParamInvalidError`` if it has none, or is
    on another database than ``engine``'s). Nothing is begun on the caller's behalf."""
    if isinstance(session, AsyncSession):
        if not session.in_transaction():
            raise ParamInvalidError("session has no open transaction: use `async with session.begin():`")
        conn = await session.connection()
    elif isinstance(session, AsyncConnection):
        if not session.in_transaction():
            raise ParamInvalidError("session (an AsyncConnection) has no open transaction: begin() one first")
        conn = session
    else:
        raise ParamInvalidError(
            f"session must be an SQLAlchemy AsyncSession or AsyncConnection, got {type(session).__name__}"
        )
    if not _same_database(conn.engine, engine):
        raise ParamInvalidError(
            f"session is on another database ({conn.engine.url.render_as_string()}) than the repo's "
            f"({engine.url.render_as_string()})"
        )
    return conn
