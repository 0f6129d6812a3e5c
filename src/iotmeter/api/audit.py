"""The audit log: every write request to the API (any method but GET, HEAD and OPTIONS),
whether it was allowed or not, with who, as what role, the route, the target and the status.

Plain ASGI middleware: it sees the final status, also of requests refused before a route ran
(401, 403, 413), and writes the entry after the response has gone."""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from iotmeter.api.asgi import ResponseStatus, route_template
from iotmeter.api.auth import PRINCIPAL_SCOPE_KEY, SAFE_METHODS, Principal
from iotmeter.repositories.api_keys import AuditRepository
from iotmeter.state import AppState

logger = logging.getLogger(__name__)

_TARGET_PARAMS = ("device_id", "alert_id", "key_id", "letter_id", "key")


class AuditLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in SAFE_METHODS
            or not scope["path"].startswith("/api/")
        ):
            await self.app(scope, receive, send)
            return
        status = ResponseStatus(send)
        try:
            await self.app(scope, receive, status)
        finally:
            await _record(scope, status.code or 500)


def _target(scope: Scope) -> str | None:
    params: dict[str, Any] = scope.get("path_params") or {}
    parts = [f"{name}={params[name]}" for name in _TARGET_PARAMS if name in params]
    return _text(", ".join(parts), 200) or None


def _text(value: str, limit: int) -> str:
    """Text every database keeps (no NUL, no lone surrogate), at most `limit` characters."""
    cleaned = value[:limit].replace("\x00", "\ufffd")
    return cleaned.encode("utf-8", "replace").decode("utf-8")


async def _record(scope: Scope, status: int) -> None:
    request_state: dict[str, Any] = scope.get("state") or {}
    state: AppState | None = request_state.get("iotmeter")
    if state is None:
        return
    principal: Principal | None = scope.get(PRINCIPAL_SCOPE_KEY)
    route = route_template(scope) or str(scope["path"])
    client = scope.get("client")
    try:
        async with state.database.transaction() as session:
            await AuditRepository(session).add(
                actor=principal.actor if principal else "unauthenticated",
                role=principal.role.name if principal else None,
                method=scope["method"][:10],
                route=_text(str(route), 200),
                target=_target(scope),
                status=status,
                client=f"{client[0]}" if client else None,
            )
    except Exception:
        logger.exception("could not write the audit log entry of %s %s", scope["method"], route)
