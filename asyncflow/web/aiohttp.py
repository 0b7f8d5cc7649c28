"""Serve the dashboard from an aiohttp application: a catch-all route that calls the ASGI app.

::

    app = web.Application()
    mount_on_aiohttp(app, "/workflows", dashboard(svc))

The bridge reads the whole request body and buffers the whole response (the dashboard's pages are
small and never stream). aiohttp is imported only when this is called.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from ..errors import ParamInvalidError
from ._security import ASGIApp

__all__ = ["mount_on_aiohttp"]

_MAX_BODY = 1 << 20  # the dashboard's forms are tiny


def mount_on_aiohttp(app: Any, prefix: str, asgi_app: ASGIApp) -> None:
    """Route every method under ``prefix`` (like ``"/workflows"``) of aiohttp ``app`` to ``asgi_app``."""
    from aiohttp import web
    from multidict import CIMultiDict

    if not isinstance(prefix, str) or not prefix.startswith("/") or prefix.endswith("/"):
        raise ParamInvalidError(f"prefix must start with '/' and not end with one, got {prefix!r}")

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > _MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=_MAX_BODY, actual_size=request.content_length)
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": f"{request.version.major}.{request.version.minor}",
            "method": request.method,
            "scheme": request.scheme,
            "path": request.path,
            "raw_path": request.raw_path.split("?", 1)[0].encode(),
            "root_path": prefix,
            "query_string": request.query_string.encode(),
            "headers": [(k.lower(), v) for k, v in request.raw_headers],
            "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
            "server": None,
        }
        received = False
        status = 500
        headers: CIMultiDict[str] = CIMultiDict()
        chunks: list[bytes] = []

        async def receive() -> MutableMapping[str, Any]:
            nonlocal received
            if received:
                return {"type": "http.disconnect"}
            received = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", []):
                    headers.add(name.decode("latin-1"), value.decode("latin-1"))
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        await asgi_app(scope, receive, send)
        headers.popall("content-length", None)
        return web.Response(status=status, headers=headers, body=b"".join(chunks))

    app.router.add_route("*", prefix, handler)
    app.router.add_route("*", prefix + "/{tail:.*}", handler)
