"""Redaction works on any text and never falls back to it; lock constructors' errors hold no password."""

from __future__ import annotations

import pytest

from asyncflow._urls import redact_url, scrub_secrets
from asyncflow.errors import ParamInvalidError
from asyncflow.lock.postgres import PostgresAdvisoryLock
from asyncflow.lock.redis import RedisWorkflowLock

SECRET = "Zq9s3cr3tPw"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"redis://:{SECRET}@127.0.0.1:63x79/7", "redis://:***@127.0.0.1:63x79/7"),
        (f"postgresql+asyncpg//postgres:{SECRET}@h/db", "postgresql+asyncpg//postgres:***@h/db"),
        (f"postgresql://u:{SECRET}@tail@h:5432/db", "postgresql://u:***@h:5432/db"),
        (f"postgresql://u:a/{SECRET}@h/db", "postgresql://u:***@h/db"),
        (f"postgresql://u@h/db?password={SECRET}&x=1", "postgresql://u@h/db?password=***&x=1"),
        (f"u:{SECRET}@h", "u:***@h"),
        ("postgresql://postgres@h:5432/db", "postgresql://postgres@h:5432/db"),  # no password: as given
        ("nonsense", "nonsense"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    if SECRET in url:
        assert SECRET not in scrub_secrets(f"failed: {url} ({SECRET[:5]}{SECRET[5:]} / tail)", url)


@pytest.mark.parametrize(
    "url", [f"redis://:{SECRET}@127.0.0.1:63x79/7", f"redis://:{SECRET}@[::1/0", f"http://:{SECRET}@h/0"]
)
def test_redis_lock_refuses_a_bad_url_without_its_password(url: str) -> None:
    with pytest.raises(ParamInvalidError) as caught:
        RedisWorkflowLock(url)
    assert SECRET not in str(caught.value) and "bad Redis URL" in str(caught.value)
    assert caught.value.__suppress_context__  # the parser's own error (it may quote the URL) is dropped


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+asyncpg//postgres:{SECRET}@127.0.0.1/test",
        f"postgresql+asyncpg://postgres:{SECRET}@127.0.0.1:54x2/test",
        f"postgresql+asyncpg://postgres:{SECRET}@127.0.0.1/test?sslmode=require",
        f"postgresql://postgres:{SECRET}@127.0.0.1/test?sslmode=require",  # no driver named: asyncpg's
    ],
)
def test_postgres_lock_refuses_a_bad_url_without_its_password(url: str) -> None:
    with pytest.raises(ParamInvalidError) as caught:
        PostgresAdvisoryLock(url)
    assert SECRET not in str(caught.value) and "bad database URL" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["postgresql+asyncpg//postgres:s3cr3t@127.0.0.1/test", "postgresql+asyncpg//u:s3@cr3t@h/db"],
)
def test_the_repo_never_shows_the_password_of_a_url_it_cannot_parse(url: str) -> None:
    from asyncflow.store._engine import create_engine_from_url

    with pytest.raises(ParamInvalidError) as caught:
        create_engine_from_url(url, {})
    shown = str(caught.value)
    assert "not a database URL" in shown
    assert "s3cr3t" not in shown and "cr3t" not in shown
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
