"""Connection URLs at the boundary: hide secrets in anything printed, and refuse a database URL the
driver would only reject (with an untyped error) on the first connect.

:func:`redact_url` works on the raw text and never falls back to it: it needs no parser, so a URL that
does not parse (a missing ``:``, a bad port, an unencoded ``@`` in the password) is still redacted.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import make_url
from sqlalchemy.engine import URL

from .errors import ParamInvalidError

__all__ = ["check_database_url", "redact_url", "scrub_secrets"]

MASK = "***"
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:password|passwd|pwd|secret|token|sslpassword)=)([^&#;]*)")

# asyncpg.connect() keywords a URL's query may carry as text (intersected with the installed version's)
_ASYNCPG_TEXT_OPTIONS = frozenset(
    {
        "ssl",
        "direct_tls",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "passfile",
        "service",
        "servicefile",
    }
)
_ASYNCPG_INT_OPTIONS = frozenset({"prepared_statement_cache_size"})
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SQLITE_NUMBER_OPTIONS = {"timeout": float, "detect_types": int, "cached_statements": int}


def _userinfo_span(text: str) -> tuple[int, int] | None:
    """Start and end of what may be a password in ``text``: from the first ``:`` after the scheme's
    ``//`` (or after the start when there is none) to the LAST ``@``. ``None`` without a password."""
    at = text.rfind("@")
    if at < 0:
        return None
    slashes = text.find("//")
    start = slashes + 2 if 0 <= slashes < at else 0
    colon = text.find(":", start, at)
    if colon < 0:
        return None  # ``user@host``: a user name, no password
    return colon + 1, at


def redact_url(text: str) -> str:
    """``text`` with a URL's password (and ``password=``-like query values) replaced by ``***``.

    Works on any text, parseable or not: everything between the user name's ``:`` and the LAST ``@``
    is hidden, so a password with an unencoded ``@`` or ``/`` is hidden whole.
    """
    span = _userinfo_span(text)
    if span is not None and span[1] > span[0]:
        text = text[: span[0]] + MASK + text[span[1] :]
    return _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, text)


def _secrets(url: str) -> list[str]:
    found = []
    span = _userinfo_span(url)
    if span is not None and span[1] > span[0]:
        secret = url[span[0] : span[1]]
        found.append(secret)
        parts = secret.replace("/", "@").split("@")  # a tail a parser may print as host or path
        found.extend(part for part in parts if len(part) >= 3)
    found.extend(m.group(2) for m in _SECRET_QUERY.finditer(url) if m.group(2))
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub_secrets(message: str, *urls: str | None) -> str:
    """``message`` with every secret of ``urls`` (as text, or as the whole URL) replaced by ``***``."""
    for url in urls:
        if not url:
            continue
        message = message.replace(url, redact_url(url))
        for secret in _secrets(url):
            message = message.replace(secret, MASK)
    return message


def _bad(url: str, detail: str) -> ParamInvalidError:
    return ParamInvalidError(scrub_secrets(f"bad database URL {redact_url(url)!r}: {detail}", url))


def _asyncpg_options() -> frozenset[str]:
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - depends on the installed extras
        return _ASYNCPG_TEXT_OPTIONS
    return _ASYNCPG_TEXT_OPTIONS & frozenset(inspect.signature(asyncpg.connect).parameters)


def _check_port(url: str, port: Any) -> None:
    if port is not None and not (isinstance(port, int) and 0 < port <= 65535):
        raise _bad(url, f"port must be a number from 1 to 65535, got {port!r}")


def _check_postgres_query(url: str, parsed: URL) -> None:
    allowed = _asyncpg_options()
    for key, value in parsed.query.items():
        if key == "host":  # asyncpg multi-host: host=name:port (repeatable)
            for host in (value,) if isinstance(value, str) else value:
                port = host.rpartition(":")[2] if ":" in host and not host.endswith("]") else ""
                if port and not port.isdigit():
                    raise _bad(url, f"host {host!r}: the port must be a number")
            continue
        if not isinstance(value, str):
            raise _bad(url, f"query option {key!r} is given more than once")
        if key in _ASYNCPG_INT_OPTIONS:
            if not value.isdigit():
                raise _bad(url, f"query option {key!r} must be a whole number, got {value!r}")
        elif key not in allowed:
            hint = " (asyncpg spells it ?ssl=require)" if key in ("sslmode", "sslrootcert") else ""
            raise _bad(
                url,
                f"query option {key!r} is not understood by asyncpg{hint}; "
                f"supported: {', '.join(sorted(allowed | _ASYNCPG_INT_OPTIONS | {'host'}))}",
            )
        elif key == "ssl" and value not in _SSL_MODES:
            raise _bad(url, f"ssl must be one of {', '.join(_SSL_MODES)}, got {value!r}")


def _check_sqlite_query(url: str, parsed: URL) -> None:
    for key, kind in _SQLITE_NUMBER_OPTIONS.items():
        value = parsed.query.get(key)
        if value is None:
            continue
        try:
            kind(value)
        except (TypeError, ValueError):
            raise _bad(url, f"query option {key!r} must be a number, got {value!r}") from None


def check_database_url(url: str) -> None:
    """Raise :class:`ParamInvalidError` (password hidden) for a database URL that cannot work: one that
    does not parse, a port that is not a number from 1 to 65535, or a query option the driver rejects.
    Backends other than SQLite and PostgreSQL are left to the repo (it names what it supports)."""
    try:
        parsed = make_url(url)
        port = parsed.port
    except (sa_exc.ArgumentError, ValueError, TypeError) as error:
        raise _bad(
            url,
            "it does not parse as dialect+driver://user:password@host:port/database "
            f"({type(error).__name__}: {error})",
        ) from None
    _check_port(url, port)
    backend = parsed.get_backend_name()
    if backend == "postgresql" and ("+" not in parsed.drivername or parsed.get_driver_name() == "asyncpg"):
        # a URL that names no driver gets asyncpg (SQLAlchemy's own default differs between releases)
        _check_postgres_query(url, parsed)
    elif backend == "sqlite":
        _check_sqlite_query(url, parsed)
