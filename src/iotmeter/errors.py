"""The project's error tree; the API turns each into one JSON error shape."""

from __future__ import annotations

from typing import Any


class IotmeterError(Exception):
    """Root of every error iotmeter raises on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class SettingsInvalid(IotmeterError):
    """The configuration is incomplete or contradictory; the app must not start."""

    code = "settings_invalid"


class NotFound(IotmeterError):
    status_code = 404
    code = "not_found"


class Conflict(IotmeterError):
    status_code = 409
    code = "conflict"


class ValidationFailed(IotmeterError):
    status_code = 400
    code = "invalid_request"


class BackendUnavailable(IotmeterError):
    """A service iotmeter depends on (database, broker, store) cannot be reached."""

    status_code = 503
    code = "backend_unavailable"
