"""The PostgreSQL functions of asyncflow's SQL repo, as ``CREATE OR REPLACE`` DDL.

Migration 2 installs them, and every ``repo.migrate()`` re-installs them (``CREATE OR REPLACE``) where
they are missing or an older release's, so a database whose functions were dropped gets them back, and
keeps a newer release's (:mod:`.definitions`; a change here bumps its ``REVISION``). The repo needs
them: a step without them raises ``StoreError`` naming ``migrate()``. The status lists in them come
from :mod:`asyncflow.status`.

* ``asyncflow_step_v1(jsonb)``: one step of the engine, all or nothing (SQLSTATE ``AF409`` when a
  condition fails, ``AF410`` when the step's lease epoch is no longer the instance's). Migration 3
  re-installs it with the lease check (a step without an epoch is checked as before).
* ``asyncflow_steps_v1(jsonb)``: several steps in one statement and one commit, each in a
  subtransaction of its own (group commit). The repo calls it only for a batch in which a step was
  refused: a batch goes first as one plain statement calling ``asyncflow_step_v1`` for each step.
* ``asyncflow_claim_v1(bigint, bigint, bigint, text[])``: the driver's claim (migration 13), with
  one plan per session for its two statements (``plan_cache_mode = force_generic_plan``), the index
  walk whatever the table's statistics (``enable_seqscan`` and ``enable_sort`` off in the function).
* ``asyncflow_claim_states_v1(bigint, bigint, bigint, text[])``: the same claim, returning with each
  instance nobody has run yet its row (definitions revision 2, installed by ``migrate()``; a database
  without it gets ``asyncflow_claim_v1`` and its passes read their instances).
"""

from __future__ import annotations

import json

from ...status import RUNNABLE_INSTANCE_STATUSES
from .._sql import RUNNABLE_SQL, TERMINAL_SQL

_RUNNABLE_JSON = json.dumps(list(RUNNABLE_INSTANCE_STATUSES))
"""The runnable instance statuses as a JSON array (the step function's containment test)."""

__all__ = ["ALL", "BATCH_FUNCTION", "CLAIM_FUNCTION", "CLAIM_STATES_FUNCTION", "STEP_FUNCTION"]

_INSTANCE_GUARD = """\
         WHERE id = v_instance
           AND (p_step->1 = '[]'::jsonb OR p_step->1 ? status)
           AND (p_step->>8 IS NULL OR lease_epoch = (p_step->>8)::bigint);
"""
"""The conditions of every form of the step function's ``UPDATE`` of the instance: the row, a status in
``instance_status_in`` (``[]``: any), and the pass's lease epoch when the step has one."""

STEP_FUNCTION = f"""
CREATE OR REPLACE FUNCTION asyncflow_step_v1(p_step jsonb) RETURNS bigint[] LANGUAGE plpgsql AS $asyncflow$
-- One step of asyncflow's engine (asyncflow.records.Step), all or nothing: any failed condition
-- raises SQLSTATE AF409, which rolls back everything this call wrote. p_step is the JSON array
-- [instance_id, [status_in...], status, next_run_at, now, cancel_other_tasks,
--  [[node_id, expected_version, status, context, fail_count, started_at], ...],
--  [[task_type, status, context, fail_count, started_at], ...], lease_epoch]
-- (null: leave the column as it is; a lease_epoch, when given, must still be the instance's, else
-- SQLSTATE AF410: a newer pass began, this one is stale).
DECLARE
    v_instance bigint := (p_step->>0)::bigint;
    v_now bigint := (p_step->>4)::bigint;
    v_touched bigint[] := '{{}}';
    v_ids bigint[] := '{{}}';
    v_count bigint;
    v_update jsonb;
BEGIN
    -- status is SET only when the step sets it, next_run_at only when the step sets it or may make the
    -- instance runnable (a status in {RUNNABLE_SQL} from one that may not be): the row triggers AFTER
    -- UPDATE OF those columns (migration 12's asyncflow_finished_notify, the driver's
    -- asyncflow_due_notify) are not even looked at by the other steps (PostgreSQL parses a trigger's
    -- WHEN clause again for every statement that names its column); an instance that becomes
    -- runnable with a past due time still has its due trigger look at it
    IF p_step->>2 IS NULL AND p_step->>3 IS NULL THEN
        UPDATE workflow_instance
           SET updated_at = v_now,
               version = version + 1
{_INSTANCE_GUARD}    ELSIF p_step->>3 IS NULL
          AND NOT (p_step->>2 IN ({RUNNABLE_SQL})
                   AND (p_step->1 = '[]'::jsonb OR NOT p_step->1 <@ '{_RUNNABLE_JSON}'::jsonb)) THEN
        UPDATE workflow_instance
           SET status = p_step->>2,
               updated_at = v_now,
               version = version + 1
{_INSTANCE_GUARD}    ELSIF p_step->>2 IS NULL THEN
        UPDATE workflow_instance
           SET next_run_at = (p_step->>3)::bigint,
               updated_at = v_now,
               version = version + 1
{_INSTANCE_GUARD}    ELSE
        UPDATE workflow_instance
           SET status = p_step->>2,
               next_run_at = coalesce((p_step->>3)::bigint, next_run_at),
               updated_at = v_now,
               version = version + 1
{_INSTANCE_GUARD}    END IF;
    IF NOT FOUND THEN
        IF p_step->>8 IS NOT NULL AND EXISTS (
            SELECT 1 FROM workflow_instance
             WHERE id = v_instance AND (p_step->1 = '[]'::jsonb OR p_step->1 ? status)) THEN
            RAISE EXCEPTION USING ERRCODE = 'AF410', MESSAGE = format(
                'asyncflow step: instance %s is no longer at lease epoch %s (a newer pass began)',
                v_instance, p_step->8);
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'AF409',
            MESSAGE = format('asyncflow step: instance %s is missing or not in %s', v_instance, p_step->1);
    END IF;
    IF jsonb_array_length(p_step->6) > 0 THEN  -- no query for a step without updates
        FOR v_update IN SELECT jsonb_array_elements(p_step->6) LOOP
            UPDATE task_instance
               SET status = coalesce(v_update->>2, status),
                   node_context = coalesce(nullif(v_update->3, 'null'::jsonb), node_context),
                   fail_count = coalesce((v_update->>4)::bigint, fail_count),
                   started_at = coalesce((v_update->>5)::bigint, started_at),
                   updated_at = v_now,
                   version = version + 1
             WHERE id = (v_update->>0)::bigint AND workflow_instance_id = v_instance
               AND version = (v_update->>1)::bigint;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'AF409', MESSAGE = format(
                    'asyncflow step: node row %s of instance %s is not at version %s',
                    v_update->0, v_instance, v_update->1);
            END IF;
            v_touched := v_touched || (v_update->>0)::bigint;
        END LOOP;
    END IF;
    IF jsonb_array_length(p_step->7) > 0 THEN
        WITH inserted AS (
            INSERT INTO task_instance (workflow_instance_id, task_type, status, node_context, fail_count,
                                       created_at, updated_at, started_at, version)
            SELECT v_instance, r.row->>0, r.row->>1, r.row->2, (r.row->>3)::bigint, v_now, v_now,
                   (r.row->>4)::bigint, 1
              FROM jsonb_array_elements(p_step->7) WITH ORDINALITY AS r(row, ord)
             ORDER BY r.ord
            ON CONFLICT (workflow_instance_id, task_type) DO NOTHING
            RETURNING id
        )
        -- ids come from one sequence in the order of the rows: sorted, they follow p_step->7
        SELECT count(*), array_agg(id ORDER BY id) INTO v_count, v_ids FROM inserted;
        IF v_count <> jsonb_array_length(p_step->7) THEN
            RAISE EXCEPTION USING ERRCODE = 'AF409',
                MESSAGE = format('asyncflow step: instance %s already has one of these node rows: %s',
                                 v_instance, p_step->7);
        END IF;
    END IF;
    IF (p_step->>5)::boolean THEN
        UPDATE task_instance
           SET status = 'canceled', updated_at = v_now, version = version + 1
         WHERE workflow_instance_id = v_instance
           AND status NOT IN ({TERMINAL_SQL})
           AND id <> ALL (v_touched || v_ids);
    END IF;
    RETURN v_ids;
END
$asyncflow$;
"""
"""The step function."""

BATCH_FUNCTION = """
CREATE OR REPLACE FUNCTION asyncflow_steps_v1(p_steps jsonb)
RETURNS TABLE (code text, ids bigint[]) LANGUAGE plpgsql AS $asyncflow$
-- Several asyncflow_step_v1() calls in one statement and one commit; each in a subtransaction, so a
-- failing step is rolled back alone. code: NULL (applied: ids), AF409 (conflict), AF410 (stale) or another
-- SQLSTATE.
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
"""The batch function (its steps run through the step function)."""

_CLAIM_PICK = f"""\
        SELECT array_agg(picked.id ORDER BY picked.next_run_at, picked.id) INTO v_ids
          FROM (SELECT w.id, w.next_run_at FROM workflow_instance w
                 WHERE w.status IN ({RUNNABLE_SQL}) AND w.next_run_at <= p_now{{typed}}
                 ORDER BY w.next_run_at, w.id LIMIT p_limit FOR UPDATE SKIP LOCKED) picked;
"""

CLAIM_FUNCTION = f"""
CREATE OR REPLACE FUNCTION asyncflow_claim_v1(p_now bigint, p_limit bigint, p_until bigint, p_types text[])
RETURNS bigint[] LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_sort = off AS $asyncflow$
-- The driver's claim: up to p_limit due init/running instances (of p_types, or of any type when it
-- is NULL), oldest due first, leased until p_until (next_run_at); their ids in that order. Rows
-- another transaction has locked are skipped, so concurrent claimers never get the same row.
-- A statement's plan is made once per session (generic): planned again for each call, as the
-- claim statement was, it cost about 140 us of server CPU per claim. Its shape depends neither on
-- the values nor on the statistics it was planned with (a plan made while the table was small is
-- kept until the next ANALYZE): without sequential scans and sorts, the pick walks
-- ix_workflow_instance_due over due rows only, in its order, and the update finds each picked row
-- by its primary key.
DECLARE
    v_ids bigint[];
BEGIN
    IF p_types IS NULL THEN
{_CLAIM_PICK.format(typed="")}    ELSE
{_CLAIM_PICK.format(typed=" AND array_position(p_types, w.workflow_type) IS NOT NULL")}    END IF;
    IF v_ids IS NULL THEN
        RETURN '{{}}';
    END IF;
    UPDATE workflow_instance SET next_run_at = p_until WHERE id = ANY (v_ids);
    RETURN v_ids;
END
$asyncflow$;
"""
"""The claim function (migration 13)."""

_CLAIM_STATES_PICK = f"""\
        SELECT array_agg(picked.id ORDER BY picked.next_run_at, picked.id),
               array_agg(picked.version = 1 AND picked.lease_epoch = 0
                         AND NOT EXISTS (SELECT 1 FROM task_instance t
                                          WHERE t.workflow_instance_id = picked.id)
                         ORDER BY picked.next_run_at, picked.id)
          INTO v_ids, v_new
          FROM (SELECT w.id, w.next_run_at, w.version, w.lease_epoch FROM workflow_instance w
                 WHERE w.status IN ({RUNNABLE_SQL}) AND w.next_run_at <= p_now{{typed}}
                 ORDER BY w.next_run_at, w.id LIMIT p_limit FOR UPDATE SKIP LOCKED) picked;
"""

CLAIM_STATES_FUNCTION = f"""
CREATE OR REPLACE FUNCTION asyncflow_claim_states_v1(
    p_now bigint, p_limit bigint, p_until bigint, p_types text[])
RETURNS TABLE (o_id bigint, o_workflow_type text, o_business_id text, o_status text, o_context text,
               o_task_id bigint, o_created_at bigint, o_updated_at bigint, o_next_run_at bigint,
               o_version bigint, o_lease_epoch bigint, o_trace_context text, o_parent_id bigint,
               o_parent_node text, o_child_key text, o_ord integer) LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET enable_sort = off AS $asyncflow$
-- asyncflow_claim_v1's claim (the same rows, leased the same way), returning a row per claimed instance
-- with its place in claim order (o_ord, from 1): where the instance is as it was created (never
-- written since, never leased, no node row) its columns, and it takes lease epoch 1 for the pass it is
-- handed to (no pass can hold epoch 0: create_workflow(run=True) creates at 1); else its id, with
-- o_workflow_type NULL. A driver's pass starts from such a row without reading the instance again,
-- where nobody else can have run it since the claim (asyncflow's in-process lock knows). The rows are
-- locked from the pick on: what it read of them holds.
DECLARE
    v_ids bigint[];
    v_new boolean[];  -- in v_ids's order: whether each instance is as it was created
BEGIN
    IF p_types IS NULL THEN
{_CLAIM_STATES_PICK.format(typed="")}    ELSE
{_CLAIM_STATES_PICK.format(typed=" AND array_position(p_types, w.workflow_type) IS NOT NULL")}    END IF;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE workflow_instance w
       SET next_run_at = p_until, lease_epoch = CASE WHEN c.new THEN 1 ELSE w.lease_epoch END
      FROM unnest(v_ids, v_new) WITH ORDINALITY AS c(id, new, ord)
     WHERE w.id = c.id
    RETURNING w.id,
              CASE WHEN c.new THEN w.workflow_type END,
              CASE WHEN c.new THEN w.business_id END,
              CASE WHEN c.new THEN w.status END,
              CASE WHEN c.new THEN w.workflow_context::text END,
              w.task_id, w.created_at, w.updated_at, w.next_run_at, w.version, w.lease_epoch,
              CASE WHEN c.new THEN w.trace_context END, w.parent_id,
              CASE WHEN c.new THEN w.parent_node END,
              CASE WHEN c.new THEN w.child_key END,
              c.ord::integer;
END
$asyncflow$;
"""
"""The claim that also hands over the rows of instances nobody has run yet (definitions revision 2)."""

ALL = (STEP_FUNCTION, BATCH_FUNCTION, CLAIM_FUNCTION, CLAIM_STATES_FUNCTION)
"""Every function, in the order to create them."""
