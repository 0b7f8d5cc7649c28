"""The schedules' stored state as the CLI's ``schedules`` and the dashboard read it.

Schema version 14 added the column the read selects (``asyncflow_schedule.fingerprint``): on a
database not migrated yet (this asyncflow deployed before ``asyncflow migrate``) the read failed with
the raw store error ("no such column: fingerprint"), which said neither what was wrong nor what to do.
After a failure (never before: one statement per read, as before) the recorded schema version is read,
as ``asyncflow worker`` reads it at start; an older one becomes ``InvalidStateError`` naming
``asyncflow migrate`` (CLI: exit 1; dashboard: 409 with that message). Any other failure, a database
without asyncflow tables included, is raised as it was.
"""

from __future__ import annotations

from .errors import InvalidStateError, StoreError
from .records import ScheduleState
from .store.protocol import StoresSchedules
from .store.sqlalchemy import SQLAlchemyWorkflowRepo
from .store.tables import SCHEMA_VERSION

__all__ = ["stored_schedule_states"]


async def stored_schedule_states(repo: object) -> dict[str, ScheduleState]:
    """Every schedule's stored state by id (``{}`` for a repo that keeps none); see the module doc."""
    if not isinstance(repo, StoresSchedules):
        return {}
    try:
        return await repo.schedule_states()
    except StoreError as error:
        failed = error
    if isinstance(repo, SQLAlchemyWorkflowRepo):
        try:
            recorded = await repo.schema_version()
        except StoreError:
            recorded = 0  # unreadable: say what failed first
        if 0 < recorded < SCHEMA_VERSION:
            raise InvalidStateError(
                f"the database has asyncflow schema version {recorded}, older than this asyncflow's "
                f"{SCHEMA_VERSION}: run `asyncflow migrate` (or `await repo.migrate()`) to read the "
                "schedules' state"
            ) from failed
    raise failed
