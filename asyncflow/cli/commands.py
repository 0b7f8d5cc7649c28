"""The operator commands: ``init-db``, ``ls``, ``show``, ``cancel``, ``restart``, ``event``, ``graph``.

Each takes the parsed arguments and returns the exit code; expected failures raise
:class:`~asyncflow.cli.backend.CLIError` or an :class:`~asyncflow.errors.AsyncflowError` that
:mod:`asyncflow.cli.entry` turns into a one-line message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import time
from typing import Any

from .._json_depth import loads_json_checked
from .._text import inert, inert_lines
from ..config import WorkflowConfig
from ..definition import WorkflowDefinition, build_definition
from ..engine.service import WorkflowService
from ..errors import ConfigNotFoundError, InvalidStateError
from ..records import (
    NodeExternalEvent,
    Pager,
    QueryTaskInstanceParams,
    QueryWorkflowInstanceParams,
    TaskInstanceRecord,
    WorkflowInstance,
    WorkflowInstanceDetail,
)
from ..registry import Registry
from ..status import instance_status_text, is_over_instance_status
from ..store.tables import SCHEMA_VERSION
from ..worker import EmptyTaskWorker
from .app import load_app
from .backend import CLIError, open_service, redact, resolve_db_url
from .graph import dag_text, instance_dot, instance_mermaid, nodes_of_definition, nodes_of_detail
from .html import render_instance_html
from .table import (
    IN_FLIGHT_STATUSES,
    format_json,
    format_table,
    format_ts,
    in_flight_text,
    progress_of,
)

__all__ = ["COMMANDS"]


def _out(text: str = "") -> None:
    """Print a line (or lines): control and bidi characters from stored data are escaped."""
    sys.stdout.write(inert_lines(text) + "\n")


async def _registry(args: argparse.Namespace) -> Registry:
    """``--app``'s registry, else one that knows the demo's workflow (so the demo's instances show)."""
    if getattr(args, "app", None):
        app = await load_app(args.app)
        return app.registry if isinstance(app, WorkflowService) else app
    from ..demo.order import make_registry

    return make_registry()


def _not_loaded(workflow_type: str) -> CLIError:
    return CLIError(
        f"workflow type {workflow_type!r} is not known to this command: pass --app module:attribute "
        "(the registry or service that loads it)",
        1,
    )


def _parse_json(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return loads_json_checked(text, what)
    except json.JSONDecodeError as error:
        raise CLIError(f"{what} is not valid JSON: {error.msg} (at character {error.pos})", 2) from error


# ---------------------------------------------------------------------------- migrate / init-db


async def cmd_init_db(args: argparse.Namespace) -> int:
    """Create the tables or upgrade them to this version (``repo.migrate()``; idempotent)."""
    async with open_service(args.db, args.redis, Registry(), create_file=True) as svc:
        await svc.repo.migrate()
    _out(f"asyncflow tables are ready (schema version {SCHEMA_VERSION}) in {redact(resolve_db_url(args.db))}")
    return 0


# ------------------------------------------------------------------------------------ ls


def _record_dict(record: Any) -> dict[str, Any]:
    return {
        "id": record.id,
        "workflow_type": record.workflow_type,
        "business_id": record.business_id,
        "status": record.status,
        "task_id": record.task_id,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "workflow_context": record.workflow_context,
    }


async def cmd_ls(args: argparse.Namespace) -> int:
    """List instances, newest first, filtered by type, status and business id."""
    params = QueryWorkflowInstanceParams(
        workflow_type_in=tuple(args.type or ()),
        status_in=tuple(args.status or ()),
        business_id=args.business_id,
        order_by_id_asc=bool(args.oldest_first),
        page=Pager(page=args.page, size=args.limit),
    )
    async with open_service(args.db, args.redis, Registry()) as svc:
        rows = await svc.query_workflow_instances(params)
        total = await svc.count_workflow_instances(params)
        flights = await _in_flight(svc, [r.id for r in rows if r.status in ("init", "running")])
    now = time.time()
    if args.json:
        out = []
        for r in rows:
            item = _record_dict(r)
            item["in_flight"] = [_flight_dict(t, now) for t in flights.get(r.id, ())]
            out.append(item)
        _out(json.dumps(out, ensure_ascii=False, indent=2))
        return 0
    if not rows:
        _out("no workflow instances match" if total == 0 else f"page {args.page} is empty ({total} match)")
        return 0
    table = [
        [
            r.id,
            r.workflow_type,
            r.business_id,
            r.status,
            format_ts(r.created_at),
            format_ts(r.updated_at),
            "; ".join(
                f"{t.task_type} {in_flight_text(t.status, t.started_at, t.node_context, now, t.fail_count)}"
                for t in flights.get(r.id, ())
            )
            or "-",
        ]
        for r in rows
    ]
    headers = ["ID", "TYPE", "BUSINESS ID", "STATUS", "CREATED", "UPDATED", "IN FLIGHT"]
    _out(format_table(headers, table, right=(0,), max_width={6: 60}))
    first = (args.page - 1) * args.limit + 1
    footer = f"{first}-{first + len(rows) - 1} of {total} instance(s)"
    if first + len(rows) - 1 < total:
        footer += f"; next page: --page {args.page + 1}"
    _out(footer)
    return 0


async def _in_flight(svc: WorkflowService, instance_ids: list[int]) -> dict[int, list[TaskInstanceRecord]]:
    """The nodes in flight (``running``/``pending``) of each of these instances (one query each)."""
    flights: dict[int, list[TaskInstanceRecord]] = {}
    for instance_id in instance_ids:
        rows = await svc.repo.query_task_instances(
            QueryTaskInstanceParams(workflow_instance_id=instance_id, status_in=IN_FLIGHT_STATUSES)
        )
        if rows:
            flights[instance_id] = rows
    return flights


def _flight_dict(t: Any, now: float) -> dict[str, Any]:
    started = t.started_at or None
    return {
        "task_type": t.task_type,
        "status": t.status,
        "fail_count": t.fail_count,
        "started_at": started,
        "age": None if started is None else max(0, int(now - started)),
        "progress": progress_of(t.node_context),
    }


# ------------------------------------------------------------------------------------ show


async def _detail(svc: WorkflowService, instance_id: int) -> WorkflowInstanceDetail:
    found = await svc.query_workflow_instance_detail(
        QueryWorkflowInstanceParams(workflow_instance_id=instance_id)
    )
    if not found:
        raise CLIError(f"workflow instance {instance_id} not found", 1)
    return found[0]


def _last_error(context: dict[str, Any] | None) -> str:
    system = (context or {}).get("system")
    if isinstance(system, dict) and system.get("last_error"):
        return str(system["last_error"])
    return ""


def _detail_dict(detail: WorkflowInstanceDetail) -> dict[str, Any]:
    out = _record_dict(detail)
    out["task_instances"] = [
        {
            "task_type": t.task_type,
            "task_name": t.task_name,
            "status": t.status,
            "fail_count": t.fail_count,
            "created_at": t.created_at,
            "updated_at": t.updated_at,
            "started_at": t.started_at,
            "progress": progress_of(t.node_context),
            "pre_nodes": list(t.pre_nodes_keys),
            "next_nodes": list(t.next_nodes_keys),
            "node_context": t.node_context,
        }
        for t in detail.task_instances
    ]
    return out


async def cmd_show(args: argparse.Namespace) -> int:
    """One instance and every node: status, fail count, timestamps, last error (or an HTML page)."""
    registry = await _registry(args)
    async with open_service(args.db, args.redis, registry) as svc:
        detail = await _detail(svc, args.id)
        children = await svc.get_child_workflows(detail.id)
    if args.html:
        path = pathlib.Path(args.html)
        page = render_instance_html(detail, generated_at=int(time.time()))
        try:
            await asyncio.to_thread(path.write_text, page, encoding="utf-8")
        except OSError as error:
            raise CLIError(f"cannot write {args.html!r}: {error.strerror or error}", 1) from error
        _out(f"wrote {path} (open it in a browser; it needs no network)")
        return 0
    if args.json:
        out = _detail_dict(detail)
        out["parent_id"] = detail.parent_id
        out["children"] = [
            {**_record_dict(c), "parent_node": c.parent_node, "child_key": c.child_key} for c in children
        ]
        _out(json.dumps(out, ensure_ascii=False, indent=2))
        return 0
    d = detail
    _out(f"instance {d.id}  type {inert(d.workflow_type)}  business id {inert(repr(d.business_id))}")
    _out(f"status {inert(d.status)} ({instance_status_text(d.status)})  task id {d.task_id}")
    _out(f"created {format_ts(d.created_at)}  updated {format_ts(d.updated_at)}")
    _out(f"workflow context {format_json(d.workflow_context, indent=None)}")
    if d.parent_id is not None:
        _out(f"child workflow of instance {d.parent_id} (asyncflow show {d.parent_id})")
    if not registry.has_workflow(d.workflow_type):
        _out(
            f"(workflow type {d.workflow_type!r} not loaded here: only created nodes are listed; pass --app)"
        )
    _out()
    now = time.time()
    table = [
        [
            t.task_type,
            t.task_name,
            t.status,
            t.fail_count,
            format_ts(t.created_at),
            format_ts(t.updated_at),
            (
                in_flight_text(t.status, t.started_at, t.node_context, now, t.fail_count)
                if _active(d.status)
                else "-"
            ),
            (_last_error(t.node_context) if t.status != "completed" else "") or "-",  # not stale ones
        ]
        for t in d.task_instances
    ]
    headers = ["NODE", "NAME", "STATUS", "FAILS", "CREATED", "UPDATED", "IN FLIGHT", "LAST ERROR"]
    _out(format_table(headers, table, right=(3,), max_width={1: 24, 6: 48, 7: 60}))
    if children:
        _out(f"\nchild workflows ({len(children)}):")
        rows = [
            [c.id, c.workflow_type, c.business_id, c.parent_node or "", c.child_key or "", c.status]
            for c in children
        ]
        _out(format_table(["ID", "TYPE", "BUSINESS ID", "NODE", "KEY", "STATUS"], rows, right=(0,)))
    if args.context:
        for t in d.task_instances:
            if t.node_context is not None:
                _out(f"\n[{inert(t.task_type)}] context:\n{format_json(t.node_context)}")
    return 0


def _active(status: str) -> bool:
    return status in ("init", "running")


# ------------------------------------------------------------------------------------ cancel


async def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel an instance and its unfinished nodes (a finished instance is left as it is)."""
    async with open_service(args.db, args.redis, Registry()) as svc:
        before = await svc.get_workflow_instance(args.id)
        if is_over_instance_status(before.status):
            _out(f"instance {args.id} is already {before.status}; nothing to cancel")
            return 0
        await svc.cancel_workflow_instance(args.id)
        after = await svc.get_workflow_instance(args.id)
    _out(f"instance {args.id}: {before.status} -> {after.status}")
    return 0


# ------------------------------------------------------------------------------------ restart


async def _restart_node(
    svc: WorkflowService, args: argparse.Namespace, context: dict[str, Any] | None
) -> WorkflowInstance:
    try:
        return await svc.restart_workflow_node(
            args.id,
            args.node,
            force=args.force,
            workflow_context=context,
            clear_event=args.clear_event,
            timeout=10.0 if args.timeout is None else args.timeout,
        )
    except InvalidStateError as error:
        if args.force or "force=True" not in str(error):
            raise
        status = (await svc.get_workflow_instance(args.id)).status
        raise CLIError(
            f"workflow instance {args.id} is {status}; add --force to restart node {args.node} anyway", 1
        ) from error


async def cmd_restart(args: argparse.Namespace) -> int:
    """Restart a node (and its descendants) or a failed/canceled instance."""
    if args.force and not args.node:
        raise CLIError("--force applies to a node restart: add --node TASK_TYPE", 2)
    for flag, given in (("--clear-event", args.clear_event), ("--timeout", args.timeout is not None)):
        if given and not args.node:
            raise CLIError(f"{flag} applies to a node restart: add --node TASK_TYPE", 2)
    context = _parse_json(args.context, "--context")
    if context is not None and not isinstance(context, dict):
        raise CLIError("--context must be a JSON object", 2)
    registry = await _registry(args)
    async with open_service(args.db, args.redis, registry) as svc:
        before = await svc.get_workflow_instance(args.id)
        if not registry.has_workflow(before.workflow_type):
            raise _not_loaded(before.workflow_type)
        if args.node:
            inst = await _restart_node(svc, args, context)
            what = f"node {args.node} and its descendants restarted"
        elif before.status == "completed":
            raise CLIError(
                f"workflow instance {args.id} is completed; to run part of it again restart a node: "
                "--node TASK_TYPE --force",
                1,
            )
        else:
            inst = await svc.restart_workflow_instance(args.id, context=context)
            what = "failed and canceled nodes restarted" if inst.status != before.status else "nothing to do"
    _out(f"instance {args.id}: {before.status} -> {inst.status}; {what}")
    if inst.status != before.status or args.node:
        _out("a running `asyncflow worker` (or any driver on this database) picks it up")
    return 0


# ------------------------------------------------------------------------------------ event


async def cmd_event(args: argparse.Namespace) -> int:
    """Store an external event on a node (Go's AddNodeExternalEvent)."""
    content = _parse_json(args.content, "--content")
    ts = args.ts if args.ts is not None else int(time.time() * 1000)
    async with open_service(args.db, args.redis, Registry()) as svc:
        await svc.add_node_external_event(
            args.id, args.node, NodeExternalEvent(event_ts=ts, event_content=content), timeout=args.timeout
        )
    _out(f"event stored on node {args.node} of instance {args.id} (event_ts {ts})")
    return 0


# ------------------------------------------------------------------------------------ graph


async def _definition_from_file(path: str) -> WorkflowDefinition:
    try:
        text = await asyncio.to_thread(pathlib.Path(path).read_bytes)
    except OSError as error:
        raise CLIError(f"cannot read {path!r}: {error.strerror or error}", 1) from error
    config = WorkflowConfig.from_json(text)
    # only the shape is drawn: every node gets a placeholder worker
    return build_definition(config, lambda _key: EmptyTaskWorker())


async def cmd_graph(args: argparse.Namespace) -> int:
    """The DAG of a workflow type or of an instance (nodes coloured by status)."""
    if args.instance is not None:
        if args.type or args.config:
            raise CLIError("give either TYPE/--config or --instance ID, not both", 2)
        registry = await _registry(args)
        async with open_service(args.db, args.redis, registry) as svc:
            detail = await _detail(svc, args.instance)
        if not registry.has_workflow(detail.workflow_type):
            raise _not_loaded(detail.workflow_type)
        nodes = nodes_of_detail(detail)
        name = f"{detail.workflow_type}_{detail.id}"
        if args.format == "dot":
            sys.stdout.write(instance_dot(nodes, name))
        elif args.format == "text":
            _out(dag_text(nodes))
        else:
            sys.stdout.write(instance_mermaid(nodes))
        return 0
    if args.config:
        definition = await _definition_from_file(args.config)
        if args.type and args.type != definition.id:
            raise CLIError(f"{args.config} defines {definition.id!r}, not {args.type!r}", 2)
    elif args.type:
        registry = await _registry(args)
        try:
            definition = registry.get_workflow_definition(args.type)
        except ConfigNotFoundError:
            raise _not_loaded(args.type) from None
    else:
        raise CLIError("graph needs a workflow TYPE, --config FILE or --instance ID", 2)
    if args.format == "dot":
        sys.stdout.write(definition.to_dot())
    elif args.format == "text":
        _out(dag_text(nodes_of_definition(definition)))
    else:
        sys.stdout.write(definition.to_mermaid())
    return 0


COMMANDS = {
    "init-db": cmd_init_db,
    "migrate": cmd_init_db,
    "ls": cmd_ls,
    "show": cmd_show,
    "cancel": cmd_cancel,
    "restart": cmd_restart,
    "event": cmd_event,
    "graph": cmd_graph,
}
"""Subcommand name -> implementation (``worker`` and ``demo`` live in their own modules)."""
