"""The PostgreSQL functions of the SQL repo (the 0.1 module; see :mod:`asyncflow.store.postgres.functions`).

``repo.migrate()`` installs them (schema version 2). An application that runs its own migrations
calls ``repo.migrate()`` after them (see docs/storage.md).
"""

from __future__ import annotations

from .postgres.functions import ALL, BATCH_FUNCTION, CLAIM_FUNCTION, STEP_FUNCTION

__all__ = ["ALL", "BATCH_FUNCTION", "CLAIM_FUNCTION", "STEP_FUNCTION"]
