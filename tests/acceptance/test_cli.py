"""Every ``asyncflow`` subcommand against SQLite and PostgreSQL, error cases included.

The detailed checks call the CLI's ``main`` in this process (fast); ``init-db`` and ``--app`` (which
imports user modules) run in a real subprocess, as do the error and worker tests of test_cli_errors.py and
test_cli_worker.py.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import time
import uuid
from collections.abc import Iterator

import pytest

import asyncflow as af

from .cli_helpers import Instances, assert_clean_error, call_cli, populate, run_cli, scratch_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    """An empty database of each kind (a scratch PostgreSQL database per test)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/cli.db"
        return
    postgres_url = request.getfixturevalue("postgres_url")
    with scratch_database(postgres_url, f"cli_{uuid.uuid4().hex[:12]}") as url:
        yield url


@pytest.fixture
def instances(db_url: str) -> Instances:
    return populate(db_url)


def test_init_db_is_idempotent(db_url: str, tmp_path: pathlib.Path) -> None:
    first = run_cli("init-db", "--db", db_url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "tables are ready" in first.stdout
    assert "secret" not in first.stdout
    again = run_cli("--db", db_url, "init-db", cwd=tmp_path)  # --db also works before the command
    assert again.returncode == 0, again.stderr
    listed = run_cli("ls", "--db", db_url, cwd=tmp_path)
    assert listed.returncode == 0 and "no workflow instances match" in listed.stdout


def test_ls_filters_and_formats(db_url: str, instances: Instances, tmp_path: pathlib.Path) -> None:
    table = call_cli("ls", "--db", db_url, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "TYPE",
        "BUSINESS",
        "ID",
        "STATUS",
        "CREATED",
        "UPDATED",
        "IN",
        "FLIGHT",
    ]
    ids = [int(line.split()[0]) for line in lines[2:-1]]
    assert ids == sorted(
        [instances.fresh, instances.waiting, instances.completed, instances.failed], reverse=True
    )
    assert lines[-1] == "1-4 of 4 instance(s)"

    failed = call_cli("ls", "--db", db_url, "--status", "failed", "--json", cwd=tmp_path)
    assert [row["id"] for row in json.loads(failed.stdout)] == [instances.failed]
    both = call_cli("ls", "--db", db_url, "--status", "init", "--status", "running", "--json", cwd=tmp_path)
    assert sorted(row["id"] for row in json.loads(both.stdout)) == [instances.fresh, instances.waiting]
    flights = {row["id"]: row["in_flight"] for row in json.loads(both.stdout)}
    waiting = {f["task_type"]: f for f in flights[instances.waiting]}
    assert waiting["manager_approval"]["status"] == "pending" and waiting["manager_approval"]["age"] >= 0
    assert waiting["charge_payment"]["fail_count"] == 1 and flights[instances.fresh] == []
    assert "manager_approval pending" in table.stdout  # the table's IN FLIGHT column
    by_business = call_cli(
        "ls", "--db", db_url, "--business-id", "ORD-00003", "--type", "order_demo", "--json", cwd=tmp_path
    )
    assert [row["id"] for row in json.loads(by_business.stdout)] == [instances.completed]
    paged = call_cli("ls", "--db", db_url, "--limit", "3", "--oldest-first", cwd=tmp_path)
    assert paged.stdout.splitlines()[-1] == "1-3 of 4 instance(s); next page: --page 2"
    none = call_cli("ls", "--db", db_url, "--type", "no_such_type", cwd=tmp_path)
    assert none.returncode == 0 and "no workflow instances match" in none.stdout
    bad = call_cli("ls", "--db", db_url, "--status", "bogus", cwd=tmp_path)
    assert_clean_error(bad, 2, "invalid choice")


def test_show_lists_every_node(db_url: str, instances: Instances, tmp_path: pathlib.Path) -> None:
    shown = call_cli("show", str(instances.waiting), "--db", db_url, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"instance {instances.waiting}  type order_demo" in out
    assert "status running" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1]}
    for node in (
        "root",
        "validate_order",
        "reserve_stock",
        "charge_payment",
        "manager_approval",
        "ship_order",
        "end",
    ):
        assert node in rows
    assert "uncreated" in rows["ship_order"]
    assert "payment gateway timed out" in rows["charge_payment"]  # the last error
    assert " 1 " in rows["charge_payment"]  # its fail count
    assert "pending" in rows["manager_approval"]
    assert re.search(r"pending \d+s", rows["manager_approval"])  # IN FLIGHT: its age
    assert re.search(r"running \d+s \(retry 1\)", rows["charge_payment"])
    done = call_cli("show", str(instances.completed), "--db", db_url, cwd=tmp_path).stdout
    done_rows = {line.split()[0]: line for line in done.splitlines() if line.split()[:1]}
    assert "completed" in done_rows["charge_payment"] and " 2 " in done_rows["charge_payment"]
    assert "timed out" not in done_rows["charge_payment"]  # no stale LAST ERROR once it succeeded

    as_json = json.loads(
        call_cli("show", str(instances.failed), "--json", "--db", db_url, cwd=tmp_path).stdout
    )
    nodes = {t["task_type"]: t for t in as_json["task_instances"]}
    assert as_json["status"] == "failed"
    assert nodes["manager_approval"]["status"] == "failed"
    assert "too expensive" in nodes["manager_approval"]["node_context"]["system"]["last_error"]
    assert nodes["charge_payment"]["fail_count"] == 2

    with_context = call_cli("show", str(instances.completed), "--context", "--db", db_url, cwd=tmp_path)
    assert '"payment_id"' in with_context.stdout

    missing = call_cli("show", "999999", "--db", db_url, cwd=tmp_path)
    assert_clean_error(missing, 1, "workflow instance 999999 not found")
    bad_id = call_cli("show", "abc", "--db", db_url, cwd=tmp_path)
    assert_clean_error(bad_id, 2, "expected a positive integer")


def test_cancel(db_url: str, instances: Instances, tmp_path: pathlib.Path) -> None:
    done = call_cli("cancel", str(instances.waiting), "--db", db_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"instance {instances.waiting}: running -> canceled" in done.stdout
    again = call_cli("cancel", str(instances.waiting), "--db", db_url, cwd=tmp_path)
    assert again.returncode == 0 and "already canceled" in again.stdout
    shown = json.loads(
        call_cli("show", str(instances.waiting), "--json", "--db", db_url, cwd=tmp_path).stdout
    )
    assert {t["status"] for t in shown["task_instances"]} <= {"completed", "canceled", "uncreated"}
    assert_clean_error(call_cli("cancel", "424242", "--db", db_url, cwd=tmp_path), 1, "424242 not found")


def test_restart(db_url: str, instances: Instances, tmp_path: pathlib.Path) -> None:
    failed = call_cli("restart", str(instances.failed), "--db", db_url, cwd=tmp_path)
    assert failed.returncode == 0, failed.stderr
    assert f"instance {instances.failed}: failed -> running" in failed.stdout
    shown = json.loads(call_cli("show", str(instances.failed), "--json", "--db", db_url, cwd=tmp_path).stdout)
    nodes = {t["task_type"]: t for t in shown["task_instances"]}
    assert nodes["manager_approval"]["status"] == "restarting"
    assert nodes["manager_approval"]["fail_count"] == 0

    refused = call_cli("restart", str(instances.completed), "--db", db_url, cwd=tmp_path)
    assert_clean_error(refused, 1, "completed")
    node_refused = call_cli(
        "restart", str(instances.completed), "--node", "notify_customer", "--db", db_url, cwd=tmp_path
    )
    assert_clean_error(node_refused, 1, "is completed", "add --force")
    assert "force=True" not in node_refused.stderr  # the CLI's words, not the library's
    forced = call_cli(
        "restart",
        str(instances.completed),
        "--node",
        "notify_customer",
        "--force",
        "--db",
        db_url,
        cwd=tmp_path,
    )
    assert forced.returncode == 0, forced.stderr
    assert "completed -> running" in forced.stdout
    assert_clean_error(
        call_cli("restart", str(instances.waiting), "--force", "--db", db_url, cwd=tmp_path), 2, "--node"
    )
    assert_clean_error(
        call_cli("restart", str(instances.waiting), "--node", "nope", "--db", db_url, cwd=tmp_path),
        2,
        "'nope'",
    )
    assert_clean_error(
        call_cli("restart", str(instances.failed), "--context", "{bad", "--db", db_url, cwd=tmp_path),
        2,
        "JSON",
    )
    assert_clean_error(call_cli("restart", "777777", "--db", db_url, cwd=tmp_path), 1, "777777 not found")


def test_restart_node_with_context_and_clear_event(
    db_url: str, instances: Instances, tmp_path: pathlib.Path
) -> None:
    def show(instance_id: int) -> dict[str, object]:
        out = call_cli("show", str(instance_id), "--json", "--db", db_url, cwd=tmp_path)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    approval = {t["task_type"]: t for t in show(instances.failed)["task_instances"]}["manager_approval"]
    assert "node_event" in approval["node_context"]  # the rejection
    restarted = call_cli(
        "restart",
        str(instances.failed),
        "--node",
        "manager_approval",
        "--force",
        "--clear-event",
        "--context",
        '{"order_id": "o-2", "amount": 12}',
        "--timeout",
        "2",
        "--db",
        db_url,
        cwd=tmp_path,
    )
    assert restarted.returncode == 0, restarted.stderr
    assert "failed -> running" in restarted.stdout
    shown = show(instances.failed)
    assert shown["workflow_context"] == {"order_id": "o-2", "amount": 12}
    nodes = {t["task_type"]: t for t in shown["task_instances"]}  # type: ignore[attr-defined]
    assert nodes["manager_approval"]["status"] == "restarting"
    assert "node_event" not in (nodes["manager_approval"]["node_context"] or {})
    for flag in (["--clear-event"], ["--timeout", "1"]):
        assert_clean_error(
            call_cli("restart", str(instances.failed), *flag, "--db", db_url, cwd=tmp_path), 2, "--node"
        )
    assert_clean_error(
        call_cli(
            "restart",
            str(instances.waiting),
            "--node",
            "manager_approval",
            "--context",
            "[1]",
            "--db",
            db_url,
            cwd=tmp_path,
        ),
        2,
        "JSON object",
    )


def test_event(db_url: str, instances: Instances, tmp_path: pathlib.Path) -> None:
    content = '{"approved": true, "by": "cli"}'
    sent = call_cli(
        "event",
        str(instances.waiting),
        "manager_approval",
        "--ts",
        "5",
        "--content",
        content,
        "--db",
        db_url,
        cwd=tmp_path,
    )
    assert sent.returncode == 0, sent.stderr
    assert "event_ts 5" in sent.stdout
    shown = json.loads(
        call_cli("show", str(instances.waiting), "--json", "--db", db_url, cwd=tmp_path).stdout
    )
    node = {t["task_type"]: t for t in shown["task_instances"]}["manager_approval"]
    assert node["node_context"]["node_event"] == {
        "event_ts": 5,
        "event_content": {"approved": True, "by": "cli"},
    }
    assert node["status"] == "pending"  # an event never changes the status

    older = call_cli(
        "event", str(instances.waiting), "manager_approval", "--ts", "4", "--db", db_url, cwd=tmp_path
    )
    assert_clean_error(older, 1, "older")
    uncreated = call_cli("event", str(instances.waiting), "ship_order", "--db", db_url, cwd=tmp_path)
    assert_clean_error(uncreated, 1, "ship_order")
    over = call_cli("event", str(instances.completed), "manager_approval", "--db", db_url, cwd=tmp_path)
    assert_clean_error(over, 1, "completed")
    bad_json = call_cli(
        "event", str(instances.waiting), "manager_approval", "--content", "{x", "--db", db_url, cwd=tmp_path
    )
    assert_clean_error(bad_json, 2, "--content is not valid JSON")
    assert_clean_error(call_cli("event", "5555555", "x", "--db", db_url, cwd=tmp_path), 1, "not found")


def test_graph(db_url: str, instances: Instances, tmp_path: pathlib.Path) -> None:
    mermaid = call_cli("graph", "order_demo", cwd=tmp_path)  # a definition needs no database
    assert mermaid.returncode == 0, mermaid.stderr
    assert mermaid.stdout.startswith("flowchart TD")
    assert "Manager approval" in mermaid.stdout and mermaid.stdout.count("-->") == 12
    dot = call_cli("graph", "order_demo", "--format", "dot", cwd=tmp_path)
    assert (
        dot.stdout.startswith('digraph "order_demo"') and '"ship_order" -> "notify_customer";' in dot.stdout
    )
    text = call_cli("graph", "order_demo", "--format", "text", cwd=tmp_path)
    assert "manager_approval" in text.stdout and "RANK" in text.stdout

    colored = call_cli("graph", "--instance", str(instances.failed), "--db", db_url, cwd=tmp_path)
    assert colored.returncode == 0, colored.stderr
    assert "classDef failed fill:#fca5a5" in colored.stdout
    assert "Manager approval<br/>failed" in colored.stdout
    colored_dot = call_cli(
        "graph", "--instance", str(instances.waiting), "--format", "dot", "--db", db_url, cwd=tmp_path
    )
    assert (
        '"manager_approval" [label="Manager approval\\npending", fillcolor="#fde68a"];' in colored_dot.stdout
    )

    config = tmp_path / "flow.json"
    config.write_text(json.dumps({"id": "flow", "nodes": [{"id": "a", "next_nodes": ["b"]}, {"id": "b"}]}))
    from_file = call_cli("graph", "--config", str(config), "--format", "dot", cwd=tmp_path)
    assert from_file.returncode == 0 and '"a" -> "b";' in from_file.stdout

    assert_clean_error(call_cli("graph", "no_such_flow", cwd=tmp_path), 1, "--app")
    assert_clean_error(call_cli("graph", cwd=tmp_path), 2, "TYPE")
    config.write_text('{"id": "flow", "nodes": [{"id": "a", "next_nodes": ["a"]}]}')
    assert_clean_error(call_cli("graph", "--config", str(config), cwd=tmp_path), 2, "self-loop")
    assert_clean_error(
        call_cli("graph", "--instance", "919191", "--db", db_url, cwd=tmp_path), 1, "not found"
    )


async def _a_waiting_family(db_url: str) -> int:
    """A parent whose node waits for two children, one of them completed: that child's id."""
    registry = af.Registry()
    registry.load_workflow_config({"id": "parent", "nodes": [{"id": "fan"}]})
    registry.load_workflow_config({"id": "kid", "nodes": [{"id": "work"}]})

    async def fan(ctx: af.JSONContext) -> None:
        for key in ("a", "b"):
            await af.start_child_workflow("kid", key)

    registry.register_workflow_task("parent", "fan", af.NormalTaskWorker(run=fan))
    registry.register_workflow_task("kid", "work", af.NormalTaskWorker(run=lambda ctx: None))
    async with af.SQLAlchemyWorkflowRepo(db_url) as repo:
        await repo.create_schema()
        svc = af.WorkflowService(repo, af.LocalWorkflowLock(), registry)
        parent = await svc.create_workflow("parent", "family-1", run=True)
        first, _ = await svc.get_child_workflows(parent.id)
        assert (await svc.run_workflow(first.id)).status == "completed"
        assert (await svc.get_workflow_instance(parent.id)).status == "running"
        return first.id


def test_purge_keeps_the_finished_children_of_an_active_parent(db_url: str, tmp_path: pathlib.Path) -> None:
    """The parent's node reads its children once the last one ends: a finished child stays while its
    parent is active, and the dry run counts what the purge deletes."""
    child_id = asyncio.run(_a_waiting_family(db_url))
    time.sleep(1.1)  # updated_at is in whole seconds
    dry = call_cli("purge", "--older-than", "0", "--dry-run", "--db", db_url, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "would purge 0 instance(s)" in dry.stdout
    purged = call_cli("purge", "--older-than", "0", "--db", db_url, cwd=tmp_path)
    assert purged.returncode == 0, purged.stderr
    assert "purged 0 instance(s)" in purged.stdout
    assert call_cli("show", str(child_id), "--db", db_url, cwd=tmp_path).returncode == 0


def test_app_option_loads_other_workflows(tmp_path: pathlib.Path) -> None:
    (tmp_path / "shipping.py").write_text(
        "import asyncflow as af\n"
        "registry = af.Registry()\n"
        "registry.load_workflow_config({'id': 'ship', 'nodes': [{'id': 'pack', 'next_nodes': ['send']},"
        " {'id': 'send'}]})\n"
        "registry.register_workflow_task('ship', 'pack', af.NormalTaskWorker(run=lambda ctx: None))\n"
        "registry.register_workflow_task('ship', 'send', af.NormalTaskWorker(run=lambda ctx: None))\n"
    )
    drawn = run_cli("graph", "ship", "--app", "shipping:registry", cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    assert "pack" in drawn.stdout
    assert_clean_error(run_cli("graph", "ship", "--app", "shipping:nothing", cwd=tmp_path), 2, "no attribute")
    assert_clean_error(
        run_cli("graph", "ship", "--app", "nowhere:registry", cwd=tmp_path), 2, "no such module"
    )
    assert_clean_error(run_cli("graph", "ship", "--app", "shipping", cwd=tmp_path), 2, "module:attribute")
    assert_clean_error(run_cli("graph", "ship", "--app", "shipping:af", cwd=tmp_path), 2, "Registry")


def test_purge(db_url: str, instances: Instances, tmp_path: pathlib.Path) -> None:
    kept = call_cli("purge", "--older-than", "1d", "--db", db_url, cwd=tmp_path)
    assert kept.returncode == 0, kept.stderr
    assert "purged 0 instance(s)" in kept.stdout
    time.sleep(1.1)  # updated_at is in whole seconds
    dry = call_cli("purge", "--older-than", "0", "--dry-run", "--db", db_url, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "would purge 2 instance(s)" in dry.stdout  # the completed and the failed one
    capped = call_cli("purge", "--older-than", "0", "--dry-run", "--limit", "1", "--db", db_url, cwd=tmp_path)
    assert "would purge 1 instance(s)" in capped.stdout
    gone = call_cli("purge", "--older-than", "0s", "--status", "failed", "--db", db_url, cwd=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert "purged 1 instance(s)" in gone.stdout
    assert_clean_error(call_cli("show", str(instances.failed), "--db", db_url, cwd=tmp_path), 1, "not found")
    assert call_cli("show", str(instances.completed), "--db", db_url, cwd=tmp_path).returncode == 0
    assert_clean_error(
        call_cli("purge", "--older-than", "0", "--limit", "0", "--db", db_url, cwd=tmp_path), 2, "--limit"
    )
    assert_clean_error(
        call_cli("purge", "--older-than", "0", "--status", "running", "--db", db_url, cwd=tmp_path),
        2,
        "running",
    )
    assert_clean_error(call_cli("purge", "--older-than", "30x", "--db", db_url, cwd=tmp_path), 2, "30d")


def test_purge_older_than_before_the_epoch_purges_nothing(
    db_url: str, instances: Instances, tmp_path: pathlib.Path
) -> None:
    ages = "99999999999999999999d"  # the cut-off would be ~2.7e17 years before 1970: no int64 holds it
    for extra in ((), ("--dry-run",)):
        result = call_cli("purge", "--older-than", ages, *extra, "--db", db_url, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert " 0 instance(s)" in result.stdout
    assert call_cli("show", str(instances.failed), "--db", db_url, cwd=tmp_path).returncode == 0
