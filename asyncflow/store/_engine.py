"""Engines the repo builds from a URL: the async driver of each backend, with a clear error when the
driver is missing; asyncpg gets a connect timeout so an unreachable server fails fast."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc, make_url
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from .._urls import redact_url
from ..errors import ParamInvalidError

__all__ = ["POSTGRES_CONNECT_TIMEOUT", "create_engine_from_url"]

POSTGRES_CONNECT_TIMEOUT = 5.0
"""Seconds asyncpg may take to connect (engines built from a URL; override with ``connect_args``)."""


def create_engine_from_url(url: str | URL, engine_kwargs: dict[str, Any]) -> AsyncEngine:
    """Build an engine the repo will own. ``sqlite://`` / ``postgresql://`` get the async driver."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError as error:
        # the parser's own message repeats the URL, password and all: neither it nor the raw text is shown
        shown = redact_url(url) if isinstance(url, str) else url.render_as_string(hide_password=True)
        raise ParamInvalidError(f"not a database URL: {shown!r} ({type(error).__name__})") from None
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    kwargs = dict(engine_kwargs)
    if backend == "postgresql":
        if "+" not in parsed.drivername:
            parsed = parsed.set(drivername="postgresql+asyncpg")
            driver = "asyncpg"
        if driver == "asyncpg":
            try:
                import asyncpg  # noqa: F401
            except ImportError as error:
                raise ImportError(
                    "postgresql+asyncpg URLs need the asyncpg driver: pip install 'asyncflow[postgres]'"
                ) from error
            connect_args = dict(kwargs.get("connect_args") or {})
            connect_args.setdefault("timeout", POSTGRES_CONNECT_TIMEOUT)
            kwargs["connect_args"] = connect_args
    elif backend == "sqlite":
        if "+" not in parsed.drivername:
            parsed = parsed.set(drivername="sqlite+aiosqlite")
        if parsed.database in (None, "", ":memory:") and "poolclass" not in kwargs:
            # one private in-memory database per connection: keep exactly one, never shared at once
            kwargs.update(poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0)
    else:
        raise ParamInvalidError(
            f"unsupported database {backend!r}: use sqlite+aiosqlite:// or postgresql+asyncpg://"
        )
    try:
        return create_async_engine(parsed, **kwargs)
    except exc.InvalidRequestError as error:
        raise ParamInvalidError(f"cannot use {parsed.drivername!r} with asyncio: {error}") from error
