"""Group commit on PostgreSQL (see :mod:`asyncflow.store._batcher`): a batch is one statement.

Steps, instance creations and pass reads each have their batches (:class:`PgStepBatches`,
:class:`PgCreateBatches`, :class:`PgStateReads`); the rest of this text is about steps.

A batch of several steps is first one statement that calls the step function for each step in
turn (:data:`FAST_BATCH_CALL`): when every step applies, which is the common case, the batch commits
once and begins no subtransaction. When any step's condition fails or it raises, that statement
fails whole and writes nothing, and the batch goes again as one call of ``asyncflow_steps_v1``
(:data:`asyncflow.store.postgres.functions.BATCH_FUNCTION`), which applies each step in a
subtransaction of its own (``BEGIN ... EXCEPTION``), so one step's failed condition or error rolls
back that step alone, and the batch commits once. (A subtransaction per step cost the server 6-10%
of its CPU per ``linear3`` workflow: an XID of its own for each step, and its start and end.)
Outcomes per step: the inserted ids, a conflict or a stale lease (``applied=False``; its SQLSTATE),
or "run it alone": the step raised another error inside the batch, or the batch statement itself
failed on the server (nothing was written either way), so the caller re-runs it as a single step and
gets its own result or error.
A batch that fails on the connection (lost, cancelled) raises its error in every caller, as a single
statement would.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

from .._prepare import InstanceRow
from .lanes import PgLanes
from .sql import (
    CONFLICT_SQLSTATE,
    STALE_SQLSTATE,
    STEP_CALL,
    UNDEFINED_FUNCTION_SQLSTATE,
    create_instances,
    load_states,
)

__all__ = ["BATCH_SLOTS", "MAX_BATCH", "RUN_ALONE", "PgCreateBatches", "PgStateReads", "PgStepBatches"]

logger = logging.getLogger(__name__)

BATCH_CALL = "SELECT code, ids FROM asyncflow_steps_v1($1::text::jsonb)"

FAST_BATCH_CALL = (
    "SELECT asyncflow_step_v1(s.step)"
    " FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS s(step, n) ORDER BY s.n"
)
"""Every step of a batch in one statement without subtransactions: all apply, or the statement fails
and nothing is written (then :data:`BATCH_CALL` sorts the steps out)."""

RUN_ALONE = object()
"""The outcome telling a caller to run its step as a single statement."""

BATCH_SLOTS = 4
"""Step statements a repo keeps in flight at most; steps beyond them wait and go together."""

_REFUSALS = (CONFLICT_SQLSTATE, STALE_SQLSTATE)

MAX_BATCH = 32
"""Steps per statement at most (in ``asyncflow_steps_v1`` each is a subtransaction; PostgreSQL caches 64
per transaction)."""


def _connection_failed(error: Exception) -> bool:
    """The batch failed on the connection (lost, cancelled), not refused by the server (no SQLSTATE
    or class 08): nothing is known of what it wrote."""
    code = getattr(error, "sqlstate", None)
    return code is None or code.startswith("08")


class PgStepBatches:
    """The :class:`~asyncflow.store._batcher.StepBatcher` runner of PostgreSQL: JSON steps in, outcomes out.

    Outcomes: the step applied: the ids of its inserted rows in order (a ``list``, or ``None`` when it
    inserted none); it was refused: the SQLSTATE (a ``str``) of the conflict or the stale lease; or
    :data:`RUN_ALONE`. (The function's value as it comes: no tuple or error object per step.) A batch
    of one is the plain step call, whose errors (conflicts too) reach the caller as raised.
    """

    def __init__(self, lanes: PgLanes) -> None:
        self._lanes = lanes
        self.enabled = True  # until the database says it has no batch function

    async def __call__(self, payloads: Sequence[str]) -> list[Any]:
        if len(payloads) == 1:
            async with self._lanes.lane() as conn:
                return [await conn.fetchval(STEP_CALL, payloads[0])]
        batch = "[" + ",".join(payloads) + "]"
        try:  # the common case first: every step applies, no subtransaction is begun
            async with self._lanes.lane() as conn:
                rows = await conn.fetch(FAST_BATCH_CALL, batch)
            return [row[0] for row in rows]
        except Exception as error:
            if _connection_failed(error):
                raise  # as a single statement would
        try:  # a step refused or failed (nothing was written): each step in a subtransaction of its own
            async with self._lanes.lane() as conn:
                rows = await conn.fetch(BATCH_CALL, batch)
        except Exception as error:
            if _connection_failed(error):
                raise  # as a single statement would
            code = getattr(error, "sqlstate", None)
            if code == UNDEFINED_FUNCTION_SQLSTATE and "asyncflow_steps_v1" in str(error):
                if self.enabled:
                    self.enabled = False
                    logger.warning(
                        "no asyncflow_steps_v1() function (run repo.migrate()): steps go one by one"
                    )
            else:
                logger.debug("a batch of %d steps failed (%s): each runs alone", len(payloads), error)
            return [RUN_ALONE] * len(payloads)  # the server refused the statement: nothing was written
        return [row[1] if row[0] is None else row[0] if row[0] in _REFUSALS else RUN_ALONE for row in rows]


class PgCreateBatches:
    """Instance inserts that wait at the same time, as one multi-row ``INSERT`` and one commit.

    Outcomes: the new id, :class:`~asyncflow.store._prepare.Refused` for a unique row refused because
    a unique instance of its key exists (its neighbours are inserted all the same: ``ON CONFLICT DO
    NOTHING``), or :data:`RUN_ALONE` when the server refused the statement (nothing was written), so
    each caller inserts its row alone and gets its own result or error.
    """

    def __init__(self, lanes: PgLanes) -> None:
        self._lanes = lanes

    async def __call__(self, rows: Sequence[tuple[InstanceRow, int]]) -> list[Any]:
        if len(rows) == 1:
            async with self._lanes.lane() as conn:
                return list(await create_instances(conn, rows))
        try:  # outside the lane: the lane sees the error and drops a connection that broke
            async with self._lanes.lane() as conn:
                return list(await create_instances(conn, rows))
        except Exception as error:
            if _connection_failed(error):
                raise  # as a single statement would
            logger.debug("a batch of %d inserts failed (%s): each runs alone", len(rows), error)
            return [RUN_ALONE] * len(rows)


class PgStateReads:
    """Pass reads (an instance and its node rows) that wait at the same time, as one statement.

    Outcomes: ``(instance, rows)`` or ``None`` for a missing instance. A failed read raises its
    error in every caller (nothing was written). With ``lease`` the statement also takes a new lease
    epoch of each instance (the reads that begin passes), so a second read of the same instance in
    the batch gets :data:`RUN_ALONE` (it takes an epoch of its own).
    """

    def __init__(self, lanes: PgLanes, *, lease: bool = False) -> None:
        self._lanes = lanes
        self._lease = lease

    async def __call__(self, instance_ids: Sequence[int]) -> list[Any]:
        async with self._lanes.lane() as conn:
            states = await load_states(conn, sorted(set(instance_ids)), self._lease)
        outcomes: list[Any] = []
        given: set[int] = set()
        for instance_id in instance_ids:  # callers own their records (the engine edits contexts)
            state = states.get(instance_id)
            if instance_id not in given:
                outcomes.append(state)
            elif self._lease:  # one epoch per read: a second pass of the instance takes its own
                outcomes.append(RUN_ALONE)
            else:
                outcomes.append(copy.deepcopy(state))
            given.add(instance_id)
        return outcomes
