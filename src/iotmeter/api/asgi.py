"""What the plain ASGI middleware (audit log, metrics, traces) share: the status the app
answered, the matched route's template, and the methods named as they are."""

from __future__ import annotations

from starlette.types import Message, Scope, Send

API_PREFIX = "/api/v1"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
"""Methods a label or a span name may carry; any other is one bucket, so a client cannot make
up series or span names."""


class ResponseStatus:
    """Wraps `send` and remembers the status of the response (None until it starts)."""

    __slots__ = ("_send", "code")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.code: int | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.code = message["status"]
        await self._send(message)


def route_template(scope: Scope) -> str | None:
    """The matched route's template (`/api/v1/devices/{device_id}`), or None when no route took
    the request (known once the app has run: the router puts the route in the scope)."""
    template = getattr(scope.get("route"), "path", None)
    if not isinstance(template, str):
        return None
    # A route of an included router knows its path below the prefix it was included with.
    if scope["path"].startswith(API_PREFIX + "/") and not template.startswith(API_PREFIX + "/"):
        template = API_PREFIX + template
    return template
