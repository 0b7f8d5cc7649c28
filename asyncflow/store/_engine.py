"""Engines the repo builds from a URL: the URL's backend package (through the picker,
:func:`asyncflow.store._backend.engine_url_for`) sets its async driver and options (a clear error when
the driver is missing; asyncpg gets a connect timeout so an unreachable server fails fast)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc, make_url
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .._urls import redact_url
from ..errors import ParamInvalidError
from ._backend import engine_url_for

__all__ = ["create_engine_from_url"]


def create_engine_from_url(url: str | URL, engine_kwargs: dict[str, Any]) -> AsyncEngine:
    """Build an engine the repo will own. ``sqlite://`` / ``postgresql://`` get the async driver."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError as error:
        # the parser's own message repeats the URL, password and all: neither it nor the raw text is shown
        shown = redact_url(url) if isinstance(url, str) else url.render_as_string(hide_password=True)
        raise ParamInvalidError(f"not a database URL: {shown!r} ({type(error).__name__})") from None
    kwargs = dict(engine_kwargs)
    parsed = engine_url_for(parsed, kwargs)  # the backend's driver and options (ParamInvalidError if none)
    try:
        return create_async_engine(parsed, **kwargs)
    except exc.InvalidRequestError as error:
        raise ParamInvalidError(f"cannot use {parsed.drivername!r} with asyncio: {error}") from error
