"""Checks on every request before a route sees it: the body's size and NUL characters in the
URL. Plain ASGI (no `BaseHTTPMiddleware`): it adds no task per request and can refuse a body
while it arrives, before it is held whole."""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    body = orjson.dumps({"error": {"code": code, "message": message, "details": None}})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


_COMMON_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
_API_HEADERS = [
    *_COMMON_HEADERS,
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
]
_DOCS_PATHS = ("/docs", "/redoc")
_DOCS_HEADERS = [
    *_COMMON_HEADERS,
    # Swagger UI and ReDoc, served by the app itself: their page scripts are inline.
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self' 'unsafe-inline'; "
        b"style-src 'self' 'unsafe-inline'; img-src 'self' data:; worker-src 'self' blob:; "
        b"frame-ancestors 'none'",
    ),
]

_DASHBOARD_PATH = "/"
_DASHBOARD_PREFIX = "/ui/"
_DASHBOARD_HEADERS = [
    *_COMMON_HEADERS,
    # The web dashboard (`iotmeter.web`): its own files only, no inline script or style.
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        b"connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
        b"form-action 'self'; frame-ancestors 'none'",
    ),
]


def _security_headers(path: str) -> list[tuple[bytes, bytes]]:
    if path == _DASHBOARD_PATH or path.startswith(_DASHBOARD_PREFIX):
        return _DASHBOARD_HEADERS
    return _DOCS_HEADERS if path.startswith(_DOCS_PATHS) else _API_HEADERS


class RequestGuard:
    """Refuses, with the project's error shape:
    - a body over `max_body_bytes` with 413, by its `Content-Length` before reading it, or once
      the bytes received pass the limit (chunked uploads);
    - a NUL character in the path or the query string with 422: no store can keep one
      (PostgreSQL refuses it in text), so it is a client's mistake, never an outage.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, downstream: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, downstream)
            return
        extra = _security_headers(scope["path"])

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await downstream(message)

        if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
            await _answer(
                send,
                422,
                "validation_failed",
                "the URL contains a NUL character (%00); remove it",
            )
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _answer(send, 413, "payload_too_large", _too_large(limit))
            return
        received = 0

        async def counting_receive() -> Message:
            # Raised into the route's body reading, which passes HTTP errors on: the error
            # handlers answer 413 and the rest of the body is never read.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> str:
    return f"request body over {limit} bytes (IOTMETER_HTTP_MAX_BODY_BYTES); send less per request"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
