"""``dashboard(svc)``: the web UI as an ASGI (Starlette) app to mount under any prefix.

Routes (relative to the mount point):

* ``GET /``: instances, newest first; ``?type=&status=&business_id=&page=&size=`` filter and page.
* ``GET /instances/{id}``: one instance; reloads itself while it runs.
* ``GET /schedules``: the registry's schedules, their next tick and the last tick fired.
* ``GET /api/instances``, ``/api/instances/{id}``, ``/api/schedules``: the same data as JSON.
* ``GET|POST /instances/{id}/cancel|restart|event``: only when ``read_only=False``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .._schedule_states import stored_schedule_states
from .._text import shown
from ..engine.service import WorkflowService
from ..errors import AsyncflowError, ParamInvalidError
from ..schedules import tick_name
from ._actions import Authorize, action_routes, base_of, error_message, error_response, error_status
from ._data import ListFilters, instance_dict, load_children, load_detail, load_list, record_dict
from ._html import CSS, list_page, schedules_page
from ._instance import instance_page
from ._security import CsrfSigner, SecurityHeaders, register_id_convertor

__all__ = ["dashboard"]

register_id_convertor()  # {id:asyncflow_id}: at most 640 digits, so int() never refuses a path

_FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
    'fill="#2563eb"/><path d="M4 4h8M4 8h8M4 12h5" stroke="#fff" stroke-width="2"/></svg>'
)


async def _schedules(svc: WorkflowService) -> list[dict[str, Any]]:
    """The registry's schedules with their next tick (from the service's clock) and the last tick
    fired (from the repo, where it keeps schedule state), as the CLI's ``schedules`` shows them."""
    schedules = svc.registry.schedules
    if not schedules:
        return []
    states = await stored_schedule_states(svc.repo)  # an older schema: InvalidStateError (409)
    now = datetime.fromtimestamp(svc.clock.time(), UTC)
    rows = []
    for schedule in schedules:
        state = states.get(schedule.id)
        rows.append(
            {
                "id": schedule.id,
                "workflow_type": schedule.workflow_type,
                "cron": schedule.cron,
                "timezone": schedule.timezone,
                "catch_up": schedule.catch_up,
                "context": dict(schedule.context),
                "next_tick": tick_name(schedule.next_tick(now)),
                "last_fired": state.last_tick if state is not None else None,
            }
        )
    return rows


def dashboard(
    svc: WorkflowService,
    read_only: bool = True,
    authorize: Authorize | None = None,
    *,
    refresh_seconds: float = 2.0,
    csrf_secret: bytes | None = None,
) -> Starlette:
    """The dashboard of ``svc``'s database as an ASGI app (mount it, or serve it with uvicorn).

    ``read_only=False`` adds cancel, restart node and send event, each confirmed on a page, CSRF
    protected and allowed only when ``authorize(request, action)`` (sync or async) returns ``True``
    for ``action`` in ``"cancel"``, ``"restart_node"``, ``"send_event"``; without ``authorize``
    every action is refused. ``refresh_seconds``: how often a running instance's page reloads.
    ``csrf_secret`` signs the CSRF cookie (default: random per app; give one when several processes
    serve the same dashboard).
    """
    if not isinstance(svc, WorkflowService):
        raise ParamInvalidError(f"svc must be a WorkflowService, got {type(svc).__name__}")
    if authorize is not None and not callable(authorize):
        raise ParamInvalidError("authorize must be a function (request, action) -> bool, or None")
    if (
        isinstance(refresh_seconds, bool)
        or not isinstance(refresh_seconds, int | float)
        or refresh_seconds <= 0
    ):
        raise ParamInvalidError(f"refresh_seconds must be a positive number, got {shown(refresh_seconds)}")
    actions = not read_only
    links = actions and authorize is not None  # without authorize every action is refused: offer none

    def filters(request: Request) -> ListFilters:
        multi = {key: request.query_params.getlist(key) for key in request.query_params}
        return ListFilters.parse(multi)

    async def instances(request: Request) -> Response:
        try:
            view = await load_list(svc, filters(request))
        except AsyncflowError as error:
            return error_response(request, error)
        return HTMLResponse(list_page(base_of(request), view))

    async def instance(request: Request) -> Response:
        try:
            detail = await load_detail(svc, int(request.path_params["id"]))
            kids = await load_children(svc, detail.id)
        except AsyncflowError as error:
            return error_response(request, error)
        done = request.query_params.get("done")
        page = instance_page(
            base_of(request), detail, actions=links, refresh=refresh_seconds, done=done, children=kids
        )
        return HTMLResponse(page)

    async def schedules(request: Request) -> Response:
        try:
            rows = await _schedules(svc)
        except AsyncflowError as error:
            return error_response(request, error)
        return HTMLResponse(schedules_page(base_of(request), rows))

    async def api_instances(request: Request) -> Response:
        try:
            view = await load_list(svc, filters(request))
        except AsyncflowError as error:
            return _json_error(error)
        f = view.filters
        return JSONResponse(
            {
                "instances": [record_dict(r) for r in view.instances],
                "counts": view.counts,
                "total": view.total,
                "page": f.page,
                "size": f.size,
                "pages": view.pages,
            }
        )

    async def api_instance(request: Request) -> Response:
        try:
            detail = await load_detail(svc, int(request.path_params["id"]))
            kids = await load_children(svc, detail.id)
        except AsyncflowError as error:
            return _json_error(error)
        return JSONResponse(instance_dict(detail, kids))

    async def api_schedules(request: Request) -> Response:
        try:
            rows = await _schedules(svc)
        except AsyncflowError as error:
            return _json_error(error)
        return JSONResponse({"schedules": rows})

    async def css(request: Request) -> Response:
        return Response(CSS, media_type="text/css", headers={"cache-control": "max-age=300"})

    async def favicon(request: Request) -> Response:
        return Response(_FAVICON, media_type="image/svg+xml", headers={"cache-control": "max-age=3600"})

    routes = [
        Route("/", instances),
        Route("/instances/{id:asyncflow_id}", instance),
        Route("/schedules", schedules),
        Route("/api/instances", api_instances),
        Route("/api/instances/{id:asyncflow_id}", api_instance),
        Route("/api/schedules", api_schedules),
        Route("/static/dashboard.css", css),
        Route("/static/favicon.svg", favicon),
    ]
    if actions:
        routes += action_routes(svc, authorize, CsrfSigner(csrf_secret))
    return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])


def _json_error(error: AsyncflowError) -> Response:
    code = error_status(error)
    return JSONResponse({"error": error_message(error)}, status_code=code)
