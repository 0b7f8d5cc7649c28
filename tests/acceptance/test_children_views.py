"""Child workflows in ``asyncflow show`` (text and JSON) and on the dashboard's instance page and API:
the children listed with their node, key and live status, linked, and the parent named on a child."""

from __future__ import annotations

import asyncio
import json
import pathlib
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import InstanceFields, InstanceWhere, NewWorkflowInstance
from asyncflow.registry import Registry
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.web import dashboard

from .cli_helpers import call_cli, scratch_database

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/children.db"
        return
    postgres_url = request.getfixturevalue("postgres_url")
    with scratch_database(postgres_url, f"kids_{uuid.uuid4().hex[:12]}") as url:
        yield url


async def _family(url: str) -> tuple[int, int, int]:
    """A parent with two children of its node ``fan``: ``a`` completed, ``<b>`` still running."""
    repo = SQLAlchemyWorkflowRepo(url)
    try:
        await repo.migrate()
        parent = await repo.create_workflow_instance(
            NewWorkflowInstance(workflow_type="family", business_id="fam-1", workflow_context={})
        )
        ids = []
        for key in ("a", "<b>"):
            new = NewWorkflowInstance(
                workflow_type="kid", business_id=f"fam-1/fan/{key}", workflow_context={}
            )
            child, created = await repo.create_child_instance(
                new, parent_id=parent.id, parent_node="fan", child_key=key
            )
            assert created
            ids.append(child.id)
        await repo.update_workflow_instances(InstanceWhere(ids=(ids[0],)), InstanceFields(status="completed"))
        return parent.id, ids[0], ids[1]
    finally:
        await repo.aclose()


def test_show_lists_children_and_names_the_parent(db_url: str, tmp_path: pathlib.Path) -> None:
    parent, done, running = asyncio.run(_family(db_url))
    shown = call_cli("show", str(parent), "--db", db_url, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    at = lines.index("child workflows (2):")
    assert lines[at + 1].split() == ["ID", "TYPE", "BUSINESS", "ID", "NODE", "KEY", "STATUS"]
    assert lines[at + 3].split() == [str(done), "kid", "fam-1/fan/a", "fan", "a", "completed"]
    assert lines[at + 4].split() == [str(running), "kid", "fam-1/fan/<b>", "fan", "<b>", "init"]
    assert "child workflow of" not in shown.stdout

    child = call_cli("show", str(running), "--db", db_url, cwd=tmp_path)
    assert f"child workflow of instance {parent} (asyncflow show {parent})" in child.stdout
    assert "child workflows (" not in child.stdout

    as_json = json.loads(call_cli("show", str(parent), "--db", db_url, "--json", cwd=tmp_path).stdout)
    assert as_json["parent_id"] is None
    assert [(c["id"], c["parent_node"], c["child_key"], c["status"]) for c in as_json["children"]] == [
        (done, "fan", "a", "completed"),
        (running, "fan", "<b>", "init"),
    ]
    assert (
        json.loads(call_cli("show", str(done), "--db", db_url, "--json", cwd=tmp_path).stdout)["parent_id"]
        == parent
    )


async def test_the_instance_page_lists_children_with_links(tmp_path: pathlib.Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/board.db"
    parent, done, running = await _family(url)
    svc = WorkflowService(SQLAlchemyWorkflowRepo(url), LocalWorkflowLock(), Registry())
    outer = Starlette(routes=[Mount("/wf", dashboard(svc))])
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=outer), base_url="http://board.test"
        ) as c:
            page = (await c.get(f"/wf/instances/{parent}")).text
            child_page = (await c.get(f"/wf/instances/{running}")).text
            api: Any = (await c.get(f"/wf/api/instances/{parent}")).json()
    finally:
        await svc.repo.aclose()
    assert '<table id="children">' in page
    assert f'<tr data-child-id="{done}"><td><a href="/wf/instances/{done}">#{done}</a>' in page
    assert f'<a href="/wf/instances/{running}">#{running}</a>' in page
    assert "&lt;b&gt;" in page and "<b>" not in page.split('<table id="children">')[1].split("</table>")[0]
    assert 'data-status="completed"' in page
    assert f'<a id="parent" href="/wf/instances/{parent}">#{parent}</a>' in child_page
    assert '<table id="children">' not in child_page
    assert [(k["id"], k["child_key"]) for k in api["children"]] == [(done, "a"), (running, "<b>")]
    assert api["parent_id"] is None
