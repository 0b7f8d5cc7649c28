"""Engines the repo builds from a ``postgresql://`` URL: asyncpg, with a connect timeout so an
unreachable server fails fast (imports nothing of asyncpg until it is asked for)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL

__all__ = ["POSTGRES_CONNECT_TIMEOUT", "engine_url"]

POSTGRES_CONNECT_TIMEOUT = 5.0
"""Seconds asyncpg may take to connect (engines built from a URL; override with ``connect_args``)."""


def engine_url(url: URL, kwargs: dict[str, Any]) -> URL:
    """``url`` with the asyncpg driver where it names none; ``kwargs`` (the engine's, changed in place)
    get the connect timeout. ``ImportError`` naming the extra when asyncpg is missing."""
    if "+" not in url.drivername:
        url = url.set(drivername="postgresql+asyncpg")
    if url.get_driver_name() == "asyncpg":
        try:
            import asyncpg  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "postgresql+asyncpg URLs need the asyncpg driver: pip install 'asyncflow[postgres]'"
            ) from error
        connect_args = dict(kwargs.get("connect_args") or {})
        connect_args.setdefault("timeout", POSTGRES_CONNECT_TIMEOUT)
        kwargs["connect_args"] = connect_args
    return url
