"""create_workflow(session=)'s check on PostgreSQL compares what the server reports of the caller's
connection and of the repo's (the row of ``postgres.PLACE_SQL``): database, server, schema."""

from __future__ import annotations

from datetime import UTC, datetime

from asyncflow.store._session import _mismatch

STARTED = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
OURS = ("app", "app", "test", STARTED, 7715795854228687016)


def test_one_server_whatever_its_urls_say() -> None:
    assert _mismatch(OURS, OURS, same_urls=False) is None
    assert _mismatch(OURS, OURS, same_urls=True) is None


def test_another_database_or_server_is_refused_whatever_the_urls_say() -> None:
    for theirs in (
        ("app", "app", "other", STARTED, OURS[4]),  # another database of the server
        ("app", "app", "test", STARTED.replace(microsecond=1), OURS[4]),  # another server (or a restart)
        ("app", "app", "test", STARTED, OURS[4] + 1),  # another cluster started in the same microsecond
    ):
        assert _mismatch(theirs, OURS, same_urls=True) == "database"


def test_without_the_identifier_the_urls_decide() -> None:
    """A role that may not call pg_control_system() reads NULL: the same start time alone does not
    prove one server (two started in one microsecond), the URLs must agree too."""
    theirs = ("app", "app", "test", STARTED, None)
    assert _mismatch(theirs, OURS, same_urls=True) is None
    assert _mismatch(theirs, OURS, same_urls=False) == "database"
    assert _mismatch(OURS, theirs, same_urls=False) == "database"


def test_another_schema_is_refused() -> None:
    assert _mismatch(("other", "other", *OURS[2:]), OURS, same_urls=True) == "schema"
    assert _mismatch((None, "bare", *OURS[2:]), OURS, same_urls=True) == "schema"
    # the repo not migrated yet: both current schemas must agree (the insert then fails alike)
    unmigrated = (None, "app", *OURS[2:])
    assert _mismatch((None, "app", *OURS[2:]), unmigrated, same_urls=True) is None
    assert _mismatch((None, "elsewhere", *OURS[2:]), unmigrated, same_urls=True) == "schema"
