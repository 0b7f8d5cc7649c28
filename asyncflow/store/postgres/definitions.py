"""Which release's PostgreSQL functions win: the rule every installer of a function goes through.

A rolling deploy runs two releases against one database for a while, and either may (re)start at
any time: ``migrate()`` re-installs the step and claim functions (:data:`~.schema.REPAIR`), and each
driver installs its NOTIFY trigger functions (:mod:`.notify`) at start. Two releases at the same
schema version may hold different bodies of these functions; without a rule, each start of either
put its own back.

So each installed function carries a marker, its comment ``asyncflow definitions N``: :data:`REVISION`
of the release that installed it. :func:`install` compares it before it replaces anything:

* the function is missing, or its marker is older than :data:`REVISION` (a function of a release
  before this rule has none: 0): this release's is installed (``CREATE OR REPLACE``, only where the
  body or settings differ) and marked;
* the marker is :data:`REVISION` and the function differs from this release's (changed or reset by
  hand): it is put back, as ``migrate()`` always did;
* the marker is newer than :data:`REVISION`: a newer release installed it, and it is kept as it is
  (the caller warns). Within one schema version the functions keep their names and arguments, so an
  older process runs on the newer ones; a newer schema version is refused before (``migrate()``).

The comment lives with the function (dropped with it, kept by ``CREATE OR REPLACE`` and by
``pg_dump``). Releases from before this rule know no marker and still put their own functions back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["REVISION", "install", "revision_of"]

REVISION = 2
"""The revision of the function and trigger definitions of this release (the step and claim functions,
the driver's NOTIFY triggers and their functions). Bump it with any change of their text:
``tests/unit/test_pg_definitions.py`` pins the text's digest to it, so that two releases never mark
different bodies with the same revision."""

_MARK = "asyncflow definitions "
_MARKED = re.compile(r"asyncflow definitions (\d+)")
_NAME = re.compile(r"FUNCTION (\w+)\(")
_SETTING = re.compile(r"\bSET (\w+) = (\w+)")

_FOUND = text(
    "SELECT proname, prosrc, coalesce(proconfig, '{}'), obj_description(oid, 'pg_proc') FROM pg_proc "
    "WHERE proname IN :names "
    "AND pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
).bindparams(bindparam("names", expanding=True))


def installed_as(ddl: str) -> tuple[str, str, list[str]]:
    """What ``pg_proc`` holds for the function ``ddl`` makes: its name, body and ``SET`` settings."""
    head, body, _ = ddl.split("$asyncflow$")
    name = _NAME.search(head)
    assert name is not None, ddl
    return name[1], body, [f"{key}={value}" for key, value in _SETTING.findall(head)]


def revision_of(comment: str | None) -> int:
    """The revision a function's comment marks (0: no marker, a release from before the rule)."""
    marked = _MARKED.fullmatch(comment or "")
    return int(marked[1]) if marked else 0


async def install(conn: AsyncConnection, ddls: Iterable[str]) -> list[str]:
    """Install the functions ``ddls`` make in the current schema by the rule above (in the caller's
    transaction); the names of those kept because a newer release installed them. Nothing is written
    when every function is this release's already, so a role that may not create them can call it."""
    wanted = [(installed_as(ddl), ddl) for ddl in ddls]
    rows = await conn.execute(_FOUND, {"names": [name for (name, _, _), _ in wanted]})
    found = {row[0]: (row[1], list(row[2]), revision_of(row[3])) for row in rows}
    newer: list[str] = []
    for (name, body, settings), ddl in wanted:
        source, config, revision = found.get(name, (None, None, 0))
        if revision > REVISION:
            newer.append(name)
            continue
        if (source, config) != (body, settings):
            await conn.exec_driver_sql(ddl)
        elif revision == REVISION:
            continue
        await conn.exec_driver_sql(f"COMMENT ON FUNCTION {name} IS '{_MARK}{REVISION}'")
    return newer
