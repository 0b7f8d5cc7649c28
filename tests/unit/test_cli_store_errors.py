"""The CLI's one-line hint for a database failure names the likely fix."""

from __future__ import annotations

import pytest

from asyncflow.cli.backend import describe_store_error
from asyncflow.errors import StoreError

URL = "postgresql+asyncpg://app:hunter2@db/app"


def _failure(driver_text: str) -> StoreError:
    try:
        try:
            raise RuntimeError(driver_text)
        except RuntimeError as cause:
            raise StoreError(f"schedule_states failed: {driver_text}") from cause
    except StoreError as error:
        return error


HINTS = {
    "migrate": "run `asyncflow migrate`",
    "init-db": "run `asyncflow init-db` first",
    "running": "is the database running and the URL right?",
}


@pytest.mark.parametrize(
    ("driver_text", "expected"),
    [
        ('UndefinedColumnError: column "fingerprint" does not exist', "migrate"),
        ("OperationalError: no such column: fingerprint", "migrate"),
        ("UndefinedFunctionError: function asyncflow_claim_v1(bigint) does not exist", "migrate"),
        ('UndefinedTableError: relation "workflow_instance" does not exist', "init-db"),
        ("OperationalError: no such table: workflow_instance", "init-db"),
        ('InvalidCatalogNameError: database "nowhere" does not exist', "running"),
        ('InvalidAuthorizationSpecificationError: role "app" does not exist', "running"),
    ],
    ids=["pg-column", "sqlite-column", "pg-function", "pg-table", "sqlite-table", "database", "role"],
)
def test_the_hint_fits_the_failure(driver_text: str, expected: str) -> None:
    line = describe_store_error(_failure(driver_text), URL)
    found = [name for name, hint in HINTS.items() if hint in line]
    assert found == [expected], line  # one hint, the one that fits
    assert "hunter2" not in line
