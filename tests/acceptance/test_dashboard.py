"""The dashboard through HTTP (httpx on the ASGI app, mounted under a prefix): pages, filters, paging,
escaping, headers, the JSON API, read-only mode, and actions with authorize and CSRF."""

from __future__ import annotations

import contextlib
import html
import pathlib
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import asyncflow as af
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import ParamInvalidError
from asyncflow.records import QueryWorkflowInstanceParams, TaskFields, TaskWhere
from asyncflow.status import NODE_EVENT
from asyncflow.web import dashboard
from asyncflow.web._actions import MAX_FORM_BYTES

from ..conftest import isolated_pg_engine
from .dashboard_helpers import EVIL, Seeded, make_service, seed

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", "postgres"])
async def seeded(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> AsyncIterator[tuple[WorkflowService, Seeded]]:
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":
            target: Any = f"sqlite+aiosqlite:///{tmp_path}/board.db"
        else:
            target = await stack.enter_async_context(
                isolated_pg_engine(request.getfixturevalue("postgres_url"))
            )
        ids = await seed(target)
        svc = make_service(target)
        stack.push_async_callback(svc.repo.aclose)
        yield svc, ids


def client(app: Any, prefix: str = "/wf") -> httpx.AsyncClient:
    outer = Starlette(routes=[Mount(prefix, app)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://board.test")


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def row_ids(page: str) -> list[int]:
    return [int(x) for x in re.findall(r'<tr data-id="(\d+)">', page)]


async def test_list_newest_first_with_counts_filters_and_paging(
    seeded: tuple[WorkflowService, Seeded],
) -> None:
    svc, ids = seeded
    async with client(dashboard(svc)) as c:
        page = (await c.get("/wf/")).text
        assert row_ids(page) == sorted([ids.waiting, ids.failed, ids.evil, *ids.others], reverse=True)
        assert 'id="count-all">all 6</a>' in page
        assert re.search(r'id="count-failed">.*?</span> 1</a>', page)
        assert re.search(r'id="count-running">.*?</span> 5</a>', page)

        failed = (await c.get("/wf/", params={"status": "failed"})).text
        assert row_ids(failed) == [ids.failed]
        typed = (await c.get("/wf/", params={"type": "doomed, nothing"})).text
        assert row_ids(typed) == [ids.failed]
        assert 'id="count-all">all 1</a>' in typed  # counts follow the type filter
        business = (await c.get("/wf/", params={"business_id": "order-1"})).text
        assert row_ids(business) == [ids.waiting]

        first = (await c.get("/wf/", params={"size": 4})).text
        assert len(row_ids(first)) == 4 and "page 1 of 2 · 6 instances" in first
        older = re.search(r'rel="next" href="([^"]+)"', first)
        assert older
        second = (await c.get(html.unescape(older.group(1)))).text
        assert len(row_ids(second)) == 2 and set(row_ids(first)).isdisjoint(row_ids(second))

        bad = await c.get("/wf/", params={"status": "nope"})
        assert bad.status_code == 400 and "unknown status" in bad.text
        assert (await c.get("/wf/", params={"size": "0"})).status_code == 400


async def test_every_value_is_escaped_and_nothing_loads_from_outside(
    seeded: tuple[WorkflowService, Seeded],
) -> None:
    svc, ids = seeded
    async with client(dashboard(svc, read_only=False, authorize=lambda r, a: True)) as c:
        pages = [
            await c.get("/wf/"),
            await c.get(f"/wf/instances/{ids.evil}"),
            await c.get(f"/wf/instances/{ids.failed}"),
            await c.get(f"/wf/instances/{ids.evil}/cancel"),
            await c.get(f"/wf/instances/{ids.evil}/restart", params={"node": EVIL}),
            await c.get("/wf/schedules"),
            await c.get("/wf/no/such/page"),
        ]
    for response in pages:
        assert "content-security-policy" in response.headers, response.url
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'none'" in csp and "unsafe" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        text = response.text
        assert "<script" not in text and "onerror=alert" not in text.replace("onerror=alert(1)&gt;", "")
        assert not re.search(r"(src|href|action)\s*=\s*[\"']?(https?:)?//", text)
        assert " style=" not in text  # inline styles would break the CSP
    evil_page = pages[1].text
    assert html.escape(EVIL, quote=True) in evil_page  # shown, escaped (business id and context)
    failed_page = pages[2].text
    assert "last error: " in failed_page and "boom &lt;script&gt;" in failed_page


async def test_instance_page_refreshes_only_while_running(seeded: tuple[WorkflowService, Seeded]) -> None:
    svc, ids = seeded
    async with client(dashboard(svc, refresh_seconds=3)) as c:
        running = (await c.get(f"/wf/instances/{ids.waiting}")).text
        over = (await c.get(f"/wf/instances/{ids.failed}")).text
        missing = await c.get("/wf/instances/999999")
    assert '<meta http-equiv="refresh" content="3">' in running
    assert 'data-task-type="approve" data-status="pending"' in running  # the DAG, coloured by status
    assert 'id="instance-status" data-status="running"' in running
    assert "http-equiv" not in over and 'data-status="failed"' in over
    assert missing.status_code == 404 and "not found" in missing.text


async def test_progress_and_children_show_when_a_node_has_them(
    seeded: tuple[WorkflowService, Seeded],
) -> None:
    svc, ids = seeded
    context = {
        "system": {"progress": {"done": 7, "of": 10}},
        "children": {"a": {"instance_id": ids.failed, "status": "failed", "output": None}},
    }
    changed = await svc.repo.update_task_instances(
        TaskWhere(workflow_instance_id=ids.waiting, task_type_in=("approve",)),
        TaskFields(node_context=context),
    )
    assert changed == 1
    async with client(dashboard(svc)) as c:
        page = (await c.get(f"/wf/instances/{ids.waiting}")).text
        data = (await c.get(f"/wf/api/instances/{ids.waiting}")).json()
    assert '<pre class="progress">' in page and "&quot;done&quot;: 7" in page
    assert f'<a href="/wf/instances/{ids.failed}">#{ids.failed}</a>' in page
    approve = next(n for n in data["nodes"] if n["task_type"] == "approve")
    assert (
        approve["progress"] == {"done": 7, "of": 10} and approve["children"]["a"]["instance_id"] == ids.failed
    )
    # a node in flight: its age (from started_at) and progress in the nodes table and the API
    assert approve["status"] in ("running", "pending") and approve["in_flight_for"] >= 0
    assert approve["started_at"] is not None
    assert re.search(rf'<span class="in-flight">{approve["status"]} for \d+s, progress {{&quot;done', page)


async def test_json_api(seeded: tuple[WorkflowService, Seeded]) -> None:
    svc, ids = seeded
    async with client(dashboard(svc)) as c:
        listing = (await c.get("/wf/api/instances", params={"status": "running", "size": 2})).json()
        one = (await c.get(f"/wf/api/instances/{ids.failed}")).json()
        missing = await c.get("/wf/api/instances/424242")
        bad = await c.get("/wf/api/instances", params={"page": "x"})
        schedules = (await c.get("/wf/api/schedules")).json()
    assert listing["total"] == 5 and listing["pages"] == 3 and len(listing["instances"]) == 2
    assert listing["counts"] == {"init": 0, "running": 5, "completed": 0, "failed": 1, "canceled": 0}
    assert [i["id"] for i in listing["instances"]] == sorted([ids.evil, *ids.others], reverse=True)[:2]
    assert one["status"] == "failed" and one["nodes"][1]["task_type"] == "explode"
    assert "boom" in one["nodes"][1]["last_error"]
    assert all(n["in_flight_for"] is None for n in one["nodes"])  # nothing is in flight once it failed
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    assert bad.status_code == 400
    assert schedules == {"schedules": []}


async def test_schedules_page_says_there_are_none(seeded: tuple[WorkflowService, Seeded]) -> None:
    svc, _ = seeded
    async with client(dashboard(svc)) as c:
        page = (await c.get("/wf/schedules")).text
    assert 'id="no-schedules"' in page and "No schedules are registered" in page


async def test_schedules_page_lists_each_schedule_with_its_next_and_last_tick(tmp_path: Any) -> None:
    registry = af.Registry()
    registry.load_workflow_config({"id": "report", "nodes": [{"id": "build"}]})

    @registry.task("report", "build")
    async def build(ctx: af.JSONContext) -> None:
        ctx.set(["built"], True)

    registry.add_schedule(af.Schedule(id="nightly<b>", workflow_type="report", cron="0 2 * * *"))
    clock = af.FakeClock(datetime(2026, 12, 3, 12, 0, tzinfo=UTC).timestamp())
    async with af.SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/s.db") as repo:
        await repo.migrate()
        svc = af.WorkflowService(repo, af.LocalWorkflowLock(), registry, clock=clock)
        async with client(dashboard(svc)) as c:
            await af.WorkflowDriver(svc).run_until_idle()  # a driver sees the schedule first now
            before = (await c.get("/wf/api/schedules")).json()["schedules"]
            clock.advance(15 * 3600)  # past 02:00 UTC the next day: a driver fires that tick
            await af.WorkflowDriver(svc).run_until_idle()
            after = (await c.get("/wf/api/schedules")).json()["schedules"]
            page = (await c.get("/wf/schedules")).text
    assert [(s["id"], s["next_tick"], s["last_fired"]) for s in before] == [
        ("nightly<b>", "2026-12-04T02:00:00Z", None)
    ]
    assert [(s["next_tick"], s["last_fired"]) for s in after] == [
        ("2026-12-05T02:00:00Z", "2026-12-04T02:00:00Z")
    ]
    assert "nightly&lt;b&gt;" in page and "nightly<b>" not in page
    assert "2026-12-05T02:00:00Z" in page and "2026-12-04T02:00:00Z" in page


async def test_schedules_page_on_a_database_not_yet_migrated_names_migrate(
    seeded: tuple[WorkflowService, Seeded],
) -> None:
    # The page (and /api/schedules) failed with a 500: the raw store error of the fingerprint column.
    svc, ids = seeded
    assert isinstance(svc.repo, af.SQLAlchemyWorkflowRepo)
    async with svc.repo.engine.begin() as conn:
        await conn.exec_driver_sql("ALTER TABLE asyncflow_schedule DROP COLUMN fingerprint")
        await conn.exec_driver_sql("DELETE FROM asyncflow_schema WHERE version >= 14")
    svc.registry.add_schedule(af.Schedule(id="nightly", workflow_type="approval", cron="0 2 * * *"))
    async with client(dashboard(svc)) as c:
        page = await c.get("/wf/schedules")
        api = await c.get("/wf/api/schedules")
        listed = await c.get("/wf/")
    assert page.status_code == api.status_code == 409, (page.status_code, page.text)
    for text in (html.unescape(page.text), api.json()["error"]):
        assert "schema version 13" in text and "run `asyncflow migrate`" in text, text
        assert "fingerprint" not in text
    assert listed.status_code == 200 and f"/instances/{ids.waiting}" in listed.text


async def test_a_database_failure_is_a_503_naming_the_fix_not_a_500(
    seeded: tuple[WorkflowService, Seeded], caplog: pytest.LogCaptureFixture
) -> None:
    # Any store error but the schedules' older schema escaped the handlers: Starlette's bare 500.
    svc, ids = seeded
    assert isinstance(svc.repo, af.SQLAlchemyWorkflowRepo)
    async with svc.repo.engine.begin() as conn:  # a table gone
        await conn.exec_driver_sql("DROP TABLE task_instance")
    async with client(dashboard(svc)) as c:
        gone = await c.get(f"/wf/instances/{ids.waiting}")
    assert gone.status_code == 503 and "run `asyncflow init-db` first" in html.unescape(gone.text)
    async with svc.repo.engine.begin() as conn:  # a schema behind this asyncflow's
        await conn.exec_driver_sql("ALTER TABLE workflow_instance DROP COLUMN trace_context")
    caplog.clear()
    async with client(dashboard(svc)) as c:
        page = await c.get("/wf/")
        api = await c.get("/wf/api/instances")
        one = await c.get(f"/wf/api/instances/{ids.waiting}")
    assert page.status_code == api.status_code == one.status_code == 503, (page.status_code, page.text)
    shown = re.search(r'<p class="error" id="error">(.*?)</p>', page.text)
    assert shown, page.text
    for text in (html.unescape(shown.group(1)), api.json()["error"], one.json()["error"]):
        assert text == (
            "the database failed: the database's schema is older than this asyncflow's: run "
            "`asyncflow migrate` (the server's log has the error)"
        ), text
    logged = [r for r in caplog.records if r.name == "asyncflow.web" and r.levelname == "ERROR"]
    assert len(logged) == 3 and all(r.exc_info and "trace_context" in str(r.exc_info[1]) for r in logged)


async def test_read_only_has_no_action_endpoints(seeded: tuple[WorkflowService, Seeded]) -> None:
    svc, ids = seeded
    async with client(dashboard(svc)) as c:
        page = (await c.get(f"/wf/instances/{ids.waiting}")).text
        for path in ("cancel", "restart?node=approve", "event?node=approve"):
            assert (await c.get(f"/wf/instances/{ids.waiting}/{path}")).status_code == 404
            assert (await c.post(f"/wf/instances/{ids.waiting}/{path}")).status_code == 404
    assert "/cancel" not in page and "/restart" not in page and "/event" not in page
    assert (await svc.get_workflow_instance(ids.waiting)).status == "running"


async def _cancel(c: httpx.AsyncClient, instance_id: int, token: str | None) -> httpx.Response:
    data = {} if token is None else {"csrf_token": token}
    return await c.post(f"/wf/instances/{instance_id}/cancel", data=data)


@pytest.mark.parametrize("authorize", [None, lambda request, action: False], ids=["no-function", "refuses"])
async def test_actions_are_refused_without_authorization(
    seeded: tuple[WorkflowService, Seeded], authorize: Callable[..., bool] | None
) -> None:
    svc, ids = seeded
    async with client(dashboard(svc, read_only=False, authorize=authorize)) as c:
        page = (await c.get(f"/wf/instances/{ids.waiting}")).text
        assert ("/cancel" in page) == (authorize is not None)  # no function: no links that always refuse
        confirm = await c.get(f"/wf/instances/{ids.waiting}/cancel")
        assert confirm.status_code == 403 and "not allowed to cancel" in confirm.text
        assert (await _cancel(c, ids.waiting, "forged")).status_code == 403
    assert (await svc.get_workflow_instance(ids.waiting)).status == "running"


async def test_actions_need_the_csrf_token(seeded: tuple[WorkflowService, Seeded]) -> None:
    svc, ids = seeded
    asked: list[str] = []

    async def authorize(request: Any, action: str) -> bool:  # async is accepted too
        asked.append(action)
        return True

    async with client(dashboard(svc, read_only=False, authorize=authorize)) as c:
        page = (await c.get(f"/wf/instances/{ids.waiting}")).text
        assert ("/cancel" in page) == (authorize is not None)  # no function: no links that always refuse
        confirm = await c.get(f"/wf/instances/{ids.waiting}/cancel")
        assert (
            confirm.status_code == 200
            and 'id="confirm"' in confirm.text
            and "Cancel instance #" in confirm.text
        )
        token = csrf_of(confirm.text)
        assert (await _cancel(c, ids.waiting, None)).status_code == 403
        assert (await _cancel(c, ids.waiting, token + "x")).status_code == 403
        assert (await svc.get_workflow_instance(ids.waiting)).status == "running"
        c.cookies.clear()  # the field alone, without its cookie, is refused too
        assert (await _cancel(c, ids.waiting, token)).status_code == 403
        assert (await svc.get_workflow_instance(ids.waiting)).status == "running"
        token = csrf_of((await c.get(f"/wf/instances/{ids.waiting}/cancel")).text)
        done = await _cancel(c, ids.waiting, token)
        assert (
            done.status_code == 303 and done.headers["location"] == f"/wf/instances/{ids.waiting}?done=cancel"
        )
        after = (await c.get(done.headers["location"])).text
    assert 'id="done"' in after and "canceled" in after
    assert (await svc.get_workflow_instance(ids.waiting)).status == "canceled"
    assert asked == ["cancel", "cancel", "cancel"]  # two confirmation pages and the POST that ran


async def test_send_event_and_restart_node(seeded: tuple[WorkflowService, Seeded]) -> None:
    svc, ids = seeded
    async with client(dashboard(svc, read_only=False, authorize=lambda r, a: True)) as c:
        form = (await c.get(f"/wf/instances/{ids.waiting}/event", params={"node": "approve"})).text
        assert 'name="event_content"' in form
        data = {"csrf_token": csrf_of(form), "node": "approve", "event_content": '{"ok": true}'}
        bad = await c.post(f"/wf/instances/{ids.waiting}/event", data={**data, "event_content": "{nope"})
        assert bad.status_code == 400 and "not valid JSON" in bad.text
        sent = await c.post(f"/wf/instances/{ids.waiting}/event", data=data)
        assert sent.status_code == 303
        assert (await svc.run_workflow(ids.waiting)).status == "completed"

        form = (await c.get(f"/wf/instances/{ids.waiting}/restart", params={"node": "approve"})).text
        assert 'name="force"' in form
        data = {"csrf_token": csrf_of(form), "node": "approve"}
        refused = await c.post(f"/wf/instances/{ids.waiting}/restart", data=data)
        assert refused.status_code == 409 and "force" in refused.text  # completed: needs force
        restarted = await c.post(f"/wf/instances/{ids.waiting}/restart", data={**data, "force": "on"})
        assert restarted.status_code == 303
    record = await svc.get_workflow_instance(ids.waiting)
    rows = {r.task_type: r for r in await svc.repo.load_task_instances(ids.waiting)}
    assert record.status == "running" and rows["approve"].status == "restarting"
    assert rows["prepare"].status == "completed"


async def test_restart_node_with_clear_event_and_a_new_workflow_context(
    seeded: tuple[WorkflowService, Seeded],
) -> None:
    svc, ids = seeded
    async with client(dashboard(svc, read_only=False, authorize=lambda r, a: True)) as c:
        form = (await c.get(f"/wf/instances/{ids.waiting}/event", params={"node": "approve"})).text
        data = {"csrf_token": csrf_of(form), "node": "approve", "event_content": '{"ok": true}'}
        assert (await c.post(f"/wf/instances/{ids.waiting}/event", data=data)).status_code == 303
        assert (await svc.run_workflow(ids.waiting)).status == "completed"

        form = (await c.get(f"/wf/instances/{ids.waiting}/restart", params={"node": "approve"})).text
        assert 'name="clear_event"' in form and 'name="workflow_context"' in form
        data = {"csrf_token": csrf_of(form), "node": "approve", "force": "on", "clear_event": "on"}
        bad = await c.post(f"/wf/instances/{ids.waiting}/restart", data={**data, "workflow_context": "[1]"})
        assert bad.status_code == 400 and "JSON object" in bad.text
        assert (await svc.get_workflow_instance(ids.waiting)).status == "completed"  # nothing ran
        done = await c.post(
            f"/wf/instances/{ids.waiting}/restart", data={**data, "workflow_context": '{"amount": 7}'}
        )
        assert done.status_code == 303
    record = await svc.get_workflow_instance(ids.waiting)
    assert record.status == "running" and record.workflow_context == {"amount": 7}
    rows = {r.task_type: r for r in await svc.repo.load_task_instances(ids.waiting)}
    assert rows["approve"].status == "restarting" and NODE_EVENT not in rows["approve"].node_context
    await svc.run_workflow(ids.waiting)
    assert (await svc.get_workflow_instance(ids.waiting)).status == "running"  # waits for a new event


async def test_grouped_counts_are_used_when_the_repo_has_them(seeded: tuple[WorkflowService, Seeded]) -> None:
    svc, _ = seeded
    calls: list[QueryWorkflowInstanceParams] = []
    repo = svc.repo

    async def grouped(params: QueryWorkflowInstanceParams) -> dict[str, int]:
        calls.append(params)
        return {"running": 41, "failed": 1}

    repo.count_workflow_instances_by_status = grouped  # type: ignore[attr-defined]
    try:
        async with client(dashboard(svc)) as c:
            data = (await c.get("/wf/api/instances", params={"type": "approval", "status": "failed"})).json()
    finally:
        del repo.count_workflow_instances_by_status  # type: ignore[attr-defined]
    assert data["counts"] == {"init": 0, "running": 41, "completed": 0, "failed": 1, "canceled": 0}
    assert data["total"] == 1
    assert calls and calls[0].status_in == () and calls[0].workflow_type_in == ("approval",)


async def test_mounts_in_fastapi_and_at_the_root(seeded: tuple[WorkflowService, Seeded]) -> None:
    from fastapi import FastAPI

    svc, ids = seeded
    api = FastAPI()
    api.mount("/ops/workflows", dashboard(svc))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://x") as c:
        page = (await c.get("/ops/workflows/")).text
        assert f'href="/ops/workflows/instances/{ids.failed}"' in page
        assert 'href="/ops/workflows/static/dashboard.css"' in page
        css = await c.get("/ops/workflows/static/dashboard.css")
        assert css.headers["content-type"].startswith("text/css") and ".st-failed" in css.text
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=dashboard(svc)), base_url="http://x") as c:
        assert f'href="/instances/{ids.failed}"' in (await c.get("/")).text


async def test_served_by_aiohttp(seeded: tuple[WorkflowService, Seeded]) -> None:
    from aiohttp import ClientSession, CookieJar, web
    from aiohttp.test_utils import TestServer

    from asyncflow.web import mount_on_aiohttp

    svc, ids = seeded
    app = web.Application()
    mount_on_aiohttp(app, "/wf", dashboard(svc, read_only=False, authorize=lambda r, a: True))
    # unsafe=True: aiohttp's client keeps no cookies of an IP address (the server is 127.0.0.1) otherwise
    async with TestServer(app) as server, ClientSession(cookie_jar=CookieJar(unsafe=True)) as session:
        async with session.get(server.make_url("/wf/")) as response:
            page = await response.text()
            assert response.status == 200 and "content-security-policy" in response.headers
        assert f'href="/wf/instances/{ids.failed}"' in page
        async with session.get(server.make_url(f"/wf/instances/{ids.waiting}/cancel")) as response:
            token = csrf_of(await response.text())
        url = server.make_url(f"/wf/instances/{ids.waiting}/cancel")
        async with session.post(url, data={"csrf_token": token}, allow_redirects=False) as response:
            assert response.status == 303
    assert (await svc.get_workflow_instance(ids.waiting)).status == "canceled"
    with pytest.raises(ParamInvalidError):
        mount_on_aiohttp(web.Application(), "wf/", dashboard(svc))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ParamInvalidError):
        dashboard("not a service")  # type: ignore[arg-type]


async def test_json_nested_too_deep_for_the_decoder_is_a_bad_request(
    seeded: tuple[WorkflowService, Seeded],
) -> None:
    svc, ids = seeded
    deep = "[" * 5000 + "]" * 5000  # deeper than json.loads can recurse: RecursionError, not ValueError
    async with client(dashboard(svc, read_only=False, authorize=lambda r, a: True)) as c:
        form = (await c.get(f"/wf/instances/{ids.waiting}/event", params={"node": "approve"})).text
        data = {"csrf_token": csrf_of(form), "node": "approve"}
        sent = await c.post(f"/wf/instances/{ids.waiting}/event", data={**data, "event_content": deep})
        assert sent.status_code == 400 and "event content is nested more than 100 levels" in sent.text
        restart = await c.post(
            f"/wf/instances/{ids.waiting}/restart", data={**data, "workflow_context": "{" + deep[1:-1] + "}"}
        )
        assert restart.status_code == 400
        restart = await c.post(
            f"/wf/instances/{ids.waiting}/restart", data={**data, "workflow_context": '{"a":' + deep + "}"}
        )
        assert restart.status_code == 400 and "not valid JSON" not in restart.text
        assert "nested more than 100 levels" in restart.text
    rows = {r.task_type: r for r in await svc.repo.load_task_instances(ids.waiting)}
    assert NODE_EVENT not in rows["approve"].node_context and rows["approve"].status == "pending"


async def test_an_action_body_over_the_limit_is_refused_before_it_is_read_whole(
    seeded: tuple[WorkflowService, Seeded],
) -> None:
    """A POST larger than MAX_FORM_BYTES is a 413 (declared or streamed), before the CSRF check and
    authorize: the server never holds more than the limit of anyone's body."""
    svc, ids = seeded
    asked: list[str] = []

    def authorize(request: Any, action: str) -> bool:
        asked.append(action)
        return True

    async with client(dashboard(svc, read_only=False, authorize=authorize)) as c:
        form = (await c.get(f"/wf/instances/{ids.waiting}/event", params={"node": "approve"})).text
        asked.clear()
        big = '{"x": "' + "a" * MAX_FORM_BYTES + '"}'
        data = {"csrf_token": csrf_of(form), "node": "approve", "event_content": big}
        sent = await c.post(f"/wf/instances/{ids.waiting}/event", data=data)
        assert sent.status_code == 413 and "larger than 1,048,576 bytes" in sent.text

        async def chunks() -> Any:  # no Content-Length: the cap holds on what arrives
            body = urlencode(data).encode()
            for start in range(0, len(body), 65536):
                yield body[start : start + 65536]

        streamed = await c.post(
            f"/wf/instances/{ids.waiting}/event",
            content=chunks(),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert streamed.status_code == 413
        assert asked == []  # refused before authorize was asked
        small = {**data, "event_content": '{"approved": true}'}
        assert (await c.post(f"/wf/instances/{ids.waiting}/event", data=small)).status_code == 303
    rows = {r.task_type: r for r in await svc.repo.load_task_instances(ids.waiting)}
    assert rows["approve"].node_context[NODE_EVENT]["event_content"] == {"approved": True}


async def test_a_non_ascii_csrf_field_or_cookie_is_refused_not_a_server_error(
    seeded: tuple[WorkflowService, Seeded],
) -> None:
    svc, ids = seeded
    app = Starlette(routes=[Mount("/wf", dashboard(svc, read_only=False, authorize=lambda r, a: True))])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://board.test") as c:
        confirm = await c.get(f"/wf/instances/{ids.waiting}/cancel")
        forged = await _cancel(c, ids.waiting, "\u00e9" + csrf_of(confirm.text))
        assert forged.status_code == 403 and "CSRF" in forged.text
        # a cookie header is read as latin-1: a byte above 0x7f is a non-ASCII character
        headers = {"cookie": b"asyncflow_csrf=abc.\xe9"}
        again = await c.get(f"/wf/instances/{ids.waiting}/cancel", headers=headers)
        assert again.status_code == 200 and "set-cookie" in again.headers  # a fresh, genuine cookie
    assert (await svc.get_workflow_instance(ids.waiting)).status == "running"


async def _raw_get(app: Any, path: str, query: bytes) -> tuple[int, bytes]:
    """One GET straight through ASGI: a query string longer than httpx lets a client build (an
    HTTP server such as uvicorn with httptools passes it on)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"board.test")],
        "client": ("127.0.0.1", 1),
        "server": ("board.test", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_too_many_type_filters_are_a_bad_request(seeded: tuple[WorkflowService, Seeded]) -> None:
    svc, _ = seeded
    app = Starlette(routes=[Mount("/wf", dashboard(svc))])
    names = ",".join(f"t{i}" for i in range(40_000)).encode()  # PostgreSQL binds at most 32767
    for path in ("/wf/", "/wf/api/instances"):
        status, body = await _raw_get(app, path, b"type=" + names)
        assert status == 400 and b"at most 100 workflow types" in body, body[:300]
    hundred = "&".join(["type=doomed"] + [f"type=t{i}" for i in range(99)]).encode()
    status, body = await _raw_get(app, "/wf/api/instances", hundred)
    assert status == 200 and b'"total":1' in body  # 100 is still fine


async def test_an_instance_id_too_long_for_int_is_not_found_not_a_server_error(
    seeded: tuple[WorkflowService, Seeded],
) -> None:
    svc, _ = seeded
    app = Starlette(routes=[Mount("/wf", dashboard(svc, read_only=False, authorize=lambda r, a: True))])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    huge = "9" * 5000  # int() refuses more than 4300 digits (ValueError inside the route's convertor)
    async with httpx.AsyncClient(transport=transport, base_url="http://board.test") as c:
        for path in (f"/wf/instances/{huge}", f"/wf/api/instances/{huge}", f"/wf/instances/{huge}/cancel"):
            assert (await c.get(path)).status_code == 404, path[:40]
        out_of_range = await c.get("/wf/api/instances/99999999999999999999")
        assert out_of_range.status_code == 400 and "out of range" in out_of_range.json()["error"]
