"""One JSON error shape for every 4xx and 5xx: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from iotmeter.api.openapi import allowed_methods
from iotmeter.api.schemas import ErrorResponse
from iotmeter.errors import IotmeterError

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "too_many_requests",
}


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


API_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Malformed request (bad JSON, a value out of range); the message says what"),
    401: _error("No API key, or one that is unknown, revoked or expired"),
    403: _error("The key's role may not do this"),
    413: _error("The body is over IOTMETER_HTTP_MAX_BODY_BYTES"),
    422: _error("A value the API does not take; the message says what to fix"),
    429: _error("Too many requests; wait for Retry-After seconds"),
    503: _error("A backend (database, store) is unavailable; try again"),
}
"""What every `/api/v1` operation can answer besides its own answers (declared in OpenAPI)."""


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": jsonable_encoder(details)}}
    return JSONResponse(body, status_code=status_code, headers=headers)


def _describe(error: dict[str, Any]) -> dict[str, Any]:
    location = ".".join(str(part) for part in error.get("loc", ()))
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "unknown field; remove it (see the schema at /docs)"
    elif error.get("type") == "missing":
        message = "required field is missing"
    elif "input" in error and error["input"] is None and location.startswith("body."):
        message = "cannot be null; leave it out to keep its value"
    return {"location": location, "message": message}


async def _validation_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [_describe(error) for error in exc.errors()]
    summary = "; ".join(f"{item['location']}: {item['message']}" for item in details)
    return error_response(422, "validation_failed", f"invalid request: {summary}", details)


async def _iotmeter_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, IotmeterError)
    if exc.status_code >= 500:
        logger.error("request failed: %s", exc.message)
    return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers or None)


async def _http_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error" if exc.status_code < 500 else "server_error")
    message = str(exc.detail)
    headers = getattr(exc, "headers", None)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        allowed = allowed_methods(request.app, request.url.path)
        if request.method == "OPTIONS" and allowed:
            # What this resource takes (RFC 9110): the methods of every route on the path.
            return Response(status_code=204, headers={"Allow": ", ".join(allowed)})
        message = f"{request.method} is not allowed on {request.url.path}; see /docs"
        if allowed:
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
    return error_response(exc.status_code, code, message, headers=headers)


async def _unexpected_handler(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal server error; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(IotmeterError, _iotmeter_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
