"""The project's error tree; the API turns each into one JSON error shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from iotmeter.readings import ReadingSet


class IotmeterError(Exception):
    """Root of every error iotmeter raises on purpose."""

    status_code = 500
    code = "internal_error"
    default_headers: ClassVar[Mapping[str, str]] = MappingProxyType({})
    """HTTP headers every answer of this error carries (e.g. `WWW-Authenticate`)."""

    def __init__(
        self, message: str, *, details: Any = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = {**self.default_headers, **(headers or {})}


class SettingsInvalid(IotmeterError):
    """The configuration is incomplete or contradictory; the app must not start."""

    code = "settings_invalid"


class NotFound(IotmeterError):
    status_code = 404
    code = "not_found"


class Conflict(IotmeterError):
    status_code = 409
    code = "conflict"


class LimitReached(Conflict):
    """A configured limit on what may be created (devices, configuration keys) is reached."""

    code = "limit_reached"


class ValidationFailed(IotmeterError):
    status_code = 400
    code = "invalid_request"


class Unprocessable(IotmeterError):
    """Well-formed input that makes no sense as a whole (a rule whose fields contradict)."""

    status_code = 422
    code = "unprocessable"


class BackendUnavailable(IotmeterError):
    """A service iotmeter depends on (database, broker, store) cannot be reached."""

    status_code = 503
    code = "backend_unavailable"

    def __init__(
        self, message: str, *, details: Any = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after
        """Seconds the service asked us to wait before trying again (`Retry-After`), if any."""


class StoreRejected(IotmeterError):
    """A store refused these reading sets for their content (trying again would not help);
    every other reading set of the write was stored."""

    status_code = 422
    code = "rejected_by_store"

    def __init__(
        self,
        message: str,
        rejected: Sequence[tuple[ReadingSet, str]],
        *,
        over_limit: Sequence[tuple[ReadingSet, str]] = (),
        details: Any = None,
    ) -> None:
        super().__init__(message, details=details)
        self.rejected = list(rejected)
        """(reading set, the store's reason) for each refused reading set."""
        self.over_limit = list(over_limit)
        """(reading set, why) for each one refused by the limit on new series."""
