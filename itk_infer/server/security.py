"""Who may talk to the server: a Host header allowlist and the bearer token.

One ASGI middleware in front of every route. The Host check stops DNS rebinding (a web page
whose name is made to resolve to 127.0.0.1 sends its own name as Host). The token is
compared in constant time; only the auth probe and the login are open without it. No CORS
headers are ever sent, so browsers keep other sites' scripts from reading any answer.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Open without a token: the probe says whether auth is on; the login checks the password.
OPEN_PATHS = frozenset({"/auth/", "/auth/token"})
# On every answer: results are patient images, not for caches or content sniffing.
EXTRA_HEADERS = ((b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"))


def token_matches(given: str, token: str) -> bool:
    """``given`` is the server token, compared in constant time."""
    return bool(token) and hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def bearer(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header (any case), else ``""``."""
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def host_name(header: str) -> str:
    """The name of a Host header without its port, lower case.

    Examples:
        >>> host_name("LocalHost:8000"), host_name("[::1]:8000"), host_name("10.0.0.2")
        ('localhost', '::1', '10.0.0.2')
    """
    value = header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class GuardMiddleware:
    """Refuse requests with a Host outside ``allowed_hosts`` (``None``: any) with 400, and,
    when ``token`` is set, requests without it (outside :data:`OPEN_PATHS`) with 401."""

    def __init__(self, app: ASGIApp, token: str, allowed_hosts: Iterable[str] | None) -> None:
        self.app = app
        self.token = token
        self.allowed = None if allowed_hosts is None else frozenset(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                   *EXTRA_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, path: str, headers: dict[str, str]) -> JSONResponse | None:
        if self.allowed is not None and host_name(headers.get("host", "")) not in self.allowed:
            return JSONResponse({"detail": "Host header not allowed"}, status_code=400,
                                headers=dict(EXTRA_HEADERS_TEXT))
        if self.token and path not in OPEN_PATHS:
            if not token_matches(bearer(headers.get("authorization", "")), self.token):
                return JSONResponse({"detail": "not authenticated"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer",
                                             **dict(EXTRA_HEADERS_TEXT)})
        return None


EXTRA_HEADERS_TEXT = tuple((k.decode(), v.decode()) for k, v in EXTRA_HEADERS)
