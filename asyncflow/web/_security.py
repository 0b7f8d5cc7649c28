"""Response headers every page gets (a strict Content-Security-Policy) and the CSRF double submit.

CSRF: a random token lives in an HMAC-signed, ``HttpOnly``, ``SameSite=Strict`` cookie scoped to the
dashboard's prefix, and the same token in a hidden field of every action form. A POST runs only when
the cookie's signature is good and the field equals the cookie's token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.convertors import CONVERTOR_TYPES, IntegerConvertor, register_url_convertor

__all__ = ["CSP", "CSRF_COOKIE", "CSRF_FIELD", "CsrfSigner", "SecurityHeaders", "register_id_convertor"]

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'none'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
CSRF_COOKIE = "asyncflow_csrf"
CSRF_FIELD = "csrf_token"

_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SecurityHeaders:
    """ASGI middleware: the CSP and friends on every HTTP response (404s and errors included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _HEADERS if k not in names]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class CsrfSigner:
    """Makes and checks the signed cookie value ``token.signature`` (secret: given, or random)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)

    def _sign(self, token: str) -> str:
        return hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()

    def new_cookie(self) -> tuple[str, str]:
        """A fresh ``(token, cookie value)``."""
        token = secrets.token_urlsafe(24)
        return token, f"{token}.{self._sign(token)}"

    def token_of(self, cookie: str | None) -> str | None:
        """The token of a cookie value whose signature is good, else ``None``."""
        if not cookie or "." not in cookie:
            return None
        token, _, signature = cookie.rpartition(".")
        if not token or not cookie.isascii():  # compare_digest raises TypeError on non-ASCII str
            return None
        return token if hmac.compare_digest(signature, self._sign(token)) else None

    def check(self, cookie: str | None, field: object) -> bool:
        """True when the cookie is genuine and the form field carries its token."""
        token = self.token_of(cookie)
        if token is None or not isinstance(field, str) or not field.isascii():
            return False
        return hmac.compare_digest(field, token)


class _IdConvertor(IntegerConvertor):
    """An instance id in a path: 1 to 640 digits. Starlette's ``int`` takes any run of digits, and
    ``int()`` raises ``ValueError`` beyond ``sys.get_int_max_str_digits()`` (4300 by default, 640 at
    the least) of them, which escaped routing as a 500; a longer run now matches no route (404). Ids
    beyond 64 bits still reach the handlers, whose store refuses them (400)."""

    regex = "[0-9]{1,640}"


def register_id_convertor() -> None:
    """Register ``{name:asyncflow_id}`` with Starlette (once; the name is the dashboard's own)."""
    if "asyncflow_id" not in CONVERTOR_TYPES:
        register_url_convertor("asyncflow_id", _IdConvertor())
