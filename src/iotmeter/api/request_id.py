"""Request ids: every HTTP request has one, taken from its `X-Request-ID` header when that is a
sane value (else made up), sent back on every response (errors too) and put on every log line
written while the request is served, so a client's report and the server's log meet.

Plain ASGI middleware, the outermost one: it also marks what the inner middleware refuses
(401, 413) and the 500 of an unexpected error."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from iotmeter.api.errors import error_response
from iotmeter.logging import bind_request_id, current_request_id, unbind_request_id

__all__ = ["HEADER", "REQUEST_ID_SCOPE_KEY", "RequestId", "current_request_id"]

HEADER = "X-Request-ID"
REQUEST_ID_SCOPE_KEY = "iotmeter.request_id"
"""Where the request's id is in its scope (`request.scope[REQUEST_ID_SCOPE_KEY]`)."""

_HEADER_NAME = HEADER.lower().encode()
_ACCEPTED = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
"""A client's id is taken as it is only when it cannot forge a log line or a header."""


def request_id_of(scope: Scope) -> str:
    """The client's `X-Request-ID` when it is 1 to 128 of `A-Z a-z 0-9 . _ : -`, else a new one."""
    for name, value in scope["headers"]:
        if name == _HEADER_NAME:
            text: str = value.decode("latin-1")
            if _ACCEPTED.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        header = (_HEADER_NAME, request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [item for item in message.get("headers", ()) if item[0] != _HEADER_NAME]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        token = bind_request_id(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Starlette's outermost error middleware would answer this 500 itself, without the
            # header: answer it here (the same body), then let the error go on to be logged.
            # The id stays bound, so that log line carries it too.
            if not started:
                response = error_response(
                    500, "internal_error", "internal server error; see the server log"
                )
                await response(scope, receive, send_with_id)
            raise
        unbind_request_id(token)
