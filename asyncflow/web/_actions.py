"""The actions of a dashboard that is not read-only: cancel, restart node, send event.

Each is two requests: ``GET`` shows an "Are you sure?" form (with the action's options), ``POST`` runs
it. Both ask ``authorize(request, action)`` (sync or async; no function means refuse); the POST also
needs the CSRF double submit. A read-only dashboard never routes here.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from .._json_depth import loads_json_checked
from .._store_hints import store_error_hint
from ..engine.service import WorkflowService
from ..errors import (
    AsyncflowError,
    DefinitionNotFoundError,
    InstanceNotFoundError,
    InvalidStateError,
    LockFailedError,
    ParamInvalidError,
    StoreError,
    TaskInstanceNotFoundError,
)
from ..records import NodeExternalEvent
from ._html import confirm_page, error_page
from ._security import CSRF_COOKIE, CSRF_FIELD, CsrfSigner

__all__ = [
    "ACTIONS",
    "Authorize",
    "action_routes",
    "base_of",
    "error_message",
    "error_response",
    "error_status",
]

#: The ``action`` names ``authorize`` is asked about.
ACTIONS = ("cancel", "restart_node", "send_event")

Authorize = Callable[[Request, str], bool | Awaitable[bool]]

_EVENT_TIMEOUT = 5.0  # seconds an event waits for a busy instance


def base_of(request: Request) -> str:
    """The dashboard's prefix (``""`` at the root): links are built from it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


logger = logging.getLogger("asyncflow.web")


def error_status(error: AsyncflowError) -> int:
    """400 bad input, 404 missing, 409 refused by the current state, 503 the database failed;
    anything else is raised."""
    if isinstance(error, InstanceNotFoundError):
        return 404
    if isinstance(error, ParamInvalidError):
        return 400
    if isinstance(
        error, InvalidStateError | LockFailedError | TaskInstanceNotFoundError | DefinitionNotFoundError
    ):
        return 409
    if isinstance(error, StoreError):
        return 503
    raise error


def error_message(error: AsyncflowError) -> str:
    """What an error page (or the JSON API's ``error``) says. A database failure is logged (with its
    cause) and shown without its text, which can hold statements and values, but with the fix of
    the usual causes (tables missing, a schema older than this asyncflow's, the database down)."""
    if isinstance(error, StoreError):
        logger.error("dashboard: the database failed: %s", error, exc_info=error)
        hint = store_error_hint(error)
        return "the database failed" + (f": {hint}" if hint else "") + " (the server's log has the error)"
    message = str(error)
    if isinstance(error, DefinitionNotFoundError):
        message += " (run the dashboard with the app that loads it: --app module:attribute)"
    return message


def error_response(request: Request, error: AsyncflowError) -> Response:
    """The error page of an expected error (see :func:`error_status`)."""
    code = error_status(error)
    return HTMLResponse(error_page(base_of(request), code, error_message(error)), status_code=code)


def _instance_id(request: Request) -> int:
    return int(request.path_params["id"])


def _node(values: Any) -> str:
    node = values.get("node")
    if not isinstance(node, str) or not node:
        raise ParamInvalidError("the node (task type) is missing: ?node=TASK_TYPE")
    return node


def _restart_options(svc: WorkflowService) -> set[str]:
    """The restart options this service's ``restart_workflow_node`` takes (0.2 adds some)."""
    return set(inspect.signature(svc.restart_workflow_node).parameters)


class ActionHandlers:
    """The GET (confirm) and POST (run) handlers, sharing the guard and the CSRF cookie."""

    def __init__(self, svc: WorkflowService, authorize: Authorize | None, signer: CsrfSigner) -> None:
        self.svc = svc
        self.authorize = authorize
        self.signer = signer

    async def _allowed(self, request: Request, action: str) -> bool:
        if self.authorize is None:
            return False
        verdict = self.authorize(request, action)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return verdict is True

    def _refused(self, request: Request, action: str) -> Response:
        why = f"you are not allowed to {action.replace('_', ' ')}"
        if self.authorize is None:
            why += " (this dashboard was built without an authorize function: every action is refused)"
        return HTMLResponse(error_page(base_of(request), 403, why), status_code=403)

    def _confirm(
        self, request: Request, title: str, question: str, hidden: dict[str, str], extra: str
    ) -> Response:
        cookie = request.cookies.get(CSRF_COOKIE)
        token = self.signer.token_of(cookie)
        fresh = None
        if token is None:
            token, fresh = self.signer.new_cookie()
        page = confirm_page(base_of(request), title, question, request.url.path, token, hidden.items(), extra)
        response = HTMLResponse(page)
        if fresh is not None:
            response.set_cookie(
                CSRF_COOKIE,
                fresh,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path=base_of(request) or "/",
            )
        return response

    async def _run(self, request: Request, action: str, work: Callable[[Any], Awaitable[str]]) -> Response:
        """POST: CSRF, then authorize, then ``work(form)``; redirect to the instance page when done."""
        body = await _capped_body(request)
        if body is None:  # read no further than the limit, before any check: nobody's body is held whole
            message = f"the form is larger than {MAX_FORM_BYTES:,} bytes"
            return HTMLResponse(error_page(base_of(request), 413, message), status_code=413)
        request._body = body  # Starlette's form() parses the body already read
        try:
            form = await request.form(max_files=0, max_fields=20)
        except Exception as error:  # a malformed body: multipart's own errors
            return HTMLResponse(error_page(base_of(request), 400, f"bad form: {error}"), status_code=400)
        if not self.signer.check(request.cookies.get(CSRF_COOKIE), form.get(CSRF_FIELD)):
            message = "the form's CSRF token is missing or wrong: open the action again and confirm it"
            return HTMLResponse(error_page(base_of(request), 403, message), status_code=403)
        if not await self._allowed(request, action):
            return self._refused(request, action)
        try:
            done = await work(form)
        except AsyncflowError as error:
            return error_response(request, error)
        target = f"{base_of(request)}/instances/{_instance_id(request)}?done={done}"
        return RedirectResponse(target, status_code=303)

    async def _page(
        self, request: Request, action: str, build: Callable[[], Awaitable[Response]]
    ) -> Response:
        if not await self._allowed(request, action):
            return self._refused(request, action)
        try:
            return await build()
        except AsyncflowError as error:
            return error_response(request, error)

    # ------------------------------------------------------------------ cancel

    async def cancel(self, request: Request) -> Response:
        instance_id = _instance_id(request)
        if request.method == "POST":

            async def work(form: Any) -> str:
                await self.svc.cancel_workflow_instance(instance_id)
                return "cancel"

            return await self._run(request, "cancel", work)

        async def build() -> Response:
            inst = await self.svc.get_workflow_instance(instance_id)
            question = (
                f"Cancel instance #{inst.id} ({inst.workflow_type}, business id {inst.business_id!r}, "
                f"now {inst.status}) and every unfinished node?"
            )
            return self._confirm(request, "Cancel instance", question, {}, "")

        return await self._page(request, "cancel", build)

    # ------------------------------------------------------------------ restart node

    async def restart(self, request: Request) -> Response:
        instance_id = _instance_id(request)
        options = _restart_options(self.svc)
        if request.method == "POST":

            async def work(form: Any) -> str:
                kwargs: dict[str, Any] = {"force": form.get("force") == "on", "run": form.get("run") == "on"}
                if "clear_event" in options:
                    kwargs["clear_event"] = form.get("clear_event") == "on"
                text = form.get("workflow_context")
                if "workflow_context" in options and isinstance(text, str) and text.strip():
                    kwargs["workflow_context"] = _json(text, "workflow context", want_object=True)
                await self.svc.restart_workflow_node(instance_id, _node(form), **kwargs)
                return "restart"

            return await self._run(request, "restart_node", work)

        async def build() -> Response:
            node = _node(request.query_params)
            inst = await self.svc.get_workflow_instance(instance_id)
            extra = [
                '<p><label><input type="checkbox" name="force" id="force"> force (the instance is over: '
                "make it run again)</label></p>",
                '<p><label><input type="checkbox" name="run" id="run"> run a pass now, in the dashboard '
                "process (else a driver picks it up)</label></p>",
            ]
            if "clear_event" in options:
                extra.append(
                    '<p><label><input type="checkbox" name="clear_event"> clear the stored event</label></p>'
                )
            if "workflow_context" in options:
                extra.append(
                    "<p><label>new workflow context (JSON object, empty: keep it)<br>"
                    '<textarea name="workflow_context" rows="4" cols="60"></textarea></label></p>'
                )
            question = (
                f"Restart node {node!r} of instance #{inst.id} ({inst.workflow_type}, now {inst.status}) "
                "and every node after it?"
            )
            return self._confirm(request, "Restart node", question, {"node": node}, "".join(extra))

        return await self._page(request, "restart_node", build)

    # ------------------------------------------------------------------ send event

    async def event(self, request: Request) -> Response:
        instance_id = _instance_id(request)
        if request.method == "POST":

            async def work(form: Any) -> str:
                ts_text = str(form.get("event_ts") or "").strip()
                try:
                    event_ts = int(ts_text) if ts_text else int(time.time() * 1000)
                except ValueError:
                    raise ParamInvalidError(f"event_ts must be an integer, got {ts_text!r}") from None
                content = _json(str(form.get("event_content") or ""), "event content")
                event = NodeExternalEvent(event_ts=event_ts, event_content=content)
                await self.svc.add_node_external_event(
                    instance_id, _node(form), event, timeout=_EVENT_TIMEOUT
                )
                return "event"

            return await self._run(request, "send_event", work)

        async def build() -> Response:
            node = _node(request.query_params)
            inst = await self.svc.get_workflow_instance(instance_id)
            extra = (
                "<p><label>event_ts (version; empty: now in unix ms)<br>"
                '<input name="event_ts" id="event_ts" inputmode="numeric"></label></p>'
                "<p><label>event content (JSON; empty: null)<br>"
                '<textarea name="event_content" id="event_content" rows="4" cols="60"></textarea></label></p>'
            )
            question = f"Send an event to node {node!r} of instance #{inst.id} ({inst.workflow_type})?"
            return self._confirm(request, "Send event", question, {"node": node}, extra)

        return await self._page(request, "send_event", build)


def _json(text: str, what: str, *, want_object: bool = False) -> Any:
    if not text.strip():
        return None
    try:
        value = loads_json_checked(text, what)  # nested too deep, even for the decoder: ParamInvalidError
    except ParamInvalidError:
        raise
    except ValueError as error:
        raise ParamInvalidError(f"{what} is not valid JSON: {error}") from None
    if want_object and not isinstance(value, dict):
        raise ParamInvalidError(f"{what} must be a JSON object")
    return value


MAX_FORM_BYTES = 1 << 20
"""The largest body an action's POST may have (an event's content, a new context: 1 MiB); a larger
one is refused (413) after reading that much, before the CSRF check and ``authorize``."""


async def _capped_body(request: Request) -> bytes | None:
    """The request's body, or ``None`` once it is larger than :data:`MAX_FORM_BYTES` (a declared
    ``Content-Length`` or what the stream delivered so far)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def action_routes(svc: WorkflowService, authorize: Authorize | None, signer: CsrfSigner) -> list[Route]:
    """The action routes (GET confirms, POST runs)."""
    handlers = ActionHandlers(svc, authorize, signer)
    methods = ["GET", "POST"]
    return [
        Route("/instances/{id:asyncflow_id}/cancel", handlers.cancel, methods=methods),
        Route("/instances/{id:asyncflow_id}/restart", handlers.restart, methods=methods),
        Route("/instances/{id:asyncflow_id}/event", handlers.event, methods=methods),
    ]
