"""Group commit for PostgreSQL steps: steps that wait at the same time go to the server as one statement.

A workflow pass needs each step durable before it goes on, but many passes run at once, and each
step costs a round trip, a commit and the driver's per-statement work. :class:`StepBatcher` keeps at
most ``slots`` step statements in flight; steps submitted meanwhile (and in the same event-loop turn)
queue up and leave together as one call of :data:`BATCH_FUNCTION`, which applies each step in a
subtransaction of its own (``BEGIN ... EXCEPTION``), so one step's failed condition or error rolls
back that step alone, and the batch commits once. Under light load a step goes alone, as before.

Outcomes per step: the inserted ids, a conflict (``applied=False``), or "run it alone": the step
raised another error inside the batch, or the batch statement itself failed on the server (nothing
was written either way), so the caller re-runs it as a single step and gets its own result or error.
A batch that fails on the connection (lost, cancelled) raises its error in every caller, as a single
statement would.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ._lanes import PgLanes
from ._pg_fast import CONFLICT_SQLSTATE, STEP_CALL, UNDEFINED_FUNCTION_SQLSTATE

__all__ = ["BATCH_FUNCTION", "BATCH_SLOTS", "RUN_ALONE", "StepBatcher"]

logger = logging.getLogger(__name__)

BATCH_FUNCTION = """
CREATE OR REPLACE FUNCTION asyncflow_steps_v1(p_steps jsonb)
RETURNS TABLE (code text, ids bigint[]) LANGUAGE plpgsql AS $asyncflow$
-- Several asyncflow_step_v1() calls in one statement and one commit; each in a subtransaction, so a
-- failing step is rolled back alone. code: NULL (applied: ids), AF409 (conflict) or another SQLSTATE.
DECLARE
    v_step jsonb;
BEGIN
    FOR v_step IN SELECT e.v FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS e(v, n) ORDER BY e.n LOOP
        BEGIN
            ids := asyncflow_step_v1(v_step);
            code := NULL;
        EXCEPTION WHEN OTHERS THEN
            ids := NULL;
            code := SQLSTATE;
        END;
        RETURN NEXT;
    END LOOP;
END
$asyncflow$;
"""
"""``CREATE OR REPLACE`` DDL of the batch function (``create_schema()`` runs it)."""

BATCH_CALL = "SELECT code, ids FROM asyncflow_steps_v1($1::text::jsonb)"

RUN_ALONE = object()
"""The outcome telling a caller to run its step as a single statement."""

BATCH_SLOTS = 4
"""Step statements a repo keeps in flight at most; steps beyond them wait and go together."""

MAX_BATCH = 32
"""Steps per statement at most (each is a subtransaction; PostgreSQL caches 64 per transaction)."""


class StepBatcher:
    """Submits steps (as the JSON of ``asyncflow_step_v1``) in batches; see the module doc."""

    def __init__(self, lanes: PgLanes, slots: int) -> None:
        self._lanes = lanes
        self._slots = max(1, slots)
        self._queue: list[tuple[int, str, asyncio.Future[Any]]] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.enabled = True  # until the database says it has no batch function

    async def submit(self, instance_id: int, payload: str) -> Any:
        """``(code, ids)`` of the step once its batch committed, or :data:`RUN_ALONE`.

        ``code`` is ``None`` (applied; ``ids`` of the inserted rows in order) or the conflict
        SQLSTATE. A step that went alone raises what the single statement raised.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((instance_id, payload, future))
        self._kick(loop)
        return await future  # if the caller is cancelled the batch still runs: the step lands or not

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._queue and not self._scheduled and self._inflight < self._slots:
            self._scheduled = True
            loop.call_soon(self._start)  # after this turn: steps submitted in it join the batch

    def _start(self) -> None:
        self._scheduled = False
        while self._queue and self._inflight < self._slots:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            batch.sort(key=lambda item: item[0])  # rows locked in one order: no deadlock between batches
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch), name="asyncflow-step-batch")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[int, str, asyncio.Future[Any]]]) -> None:
        try:
            outcomes = await (self._call(batch) if len(batch) > 1 else self._single(batch[0][1]))
            for (_, _, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
        except Exception as error:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
        except BaseException:
            for _, _, future in batch:
                future.cancel()
            raise
        finally:
            self._inflight -= 1
            self._kick(asyncio.get_running_loop())

    async def _single(self, payload: str) -> list[Any]:
        """A batch of one: the plain step call (its errors, conflicts too, go to the caller as raised)."""
        async with self._lanes.lane() as conn:
            return [(None, await conn.fetchval(STEP_CALL, payload))]

    async def _call(self, batch: list[tuple[int, str, asyncio.Future[Any]]]) -> list[Any]:
        payload = "[" + ",".join(item[1] for item in batch) + "]"
        try:
            async with self._lanes.lane() as conn:
                rows = await conn.fetch(BATCH_CALL, payload)
        except Exception as error:
            code = getattr(error, "sqlstate", None)
            if code is None or code.startswith("08"):
                raise  # the connection failed: as a single statement would
            if code == UNDEFINED_FUNCTION_SQLSTATE and "asyncflow_steps_v1" in str(error):
                if self.enabled:
                    self.enabled = False
                    logger.warning(
                        "no asyncflow_steps_v1() function (run create_schema()): steps go one by one"
                    )
            else:
                logger.debug("a batch of %d steps failed (%s): each runs alone", len(batch), error)
            return [RUN_ALONE] * len(batch)  # the server refused the statement: nothing was written
        return [(row[0], row[1]) if row[0] in (None, CONFLICT_SQLSTATE) else RUN_ALONE for row in rows]

    async def aclose(self) -> None:
        """Wait for the batches in flight."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
