"""Request and response models of the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

import orjson
from fastapi import Query
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    computed_field,
    model_validator,
)

from iotmeter.ids import DEVICE_ID_PATTERN, DEVICE_TYPE_PATTERN

MAX_ID = 2**63 - 1
"""Largest id a row can have (a signed 64-bit integer on every database)."""
MAX_OFFSET = 2**31 - 1
Offset = Annotated[
    int, Query(ge=0, le=MAX_OFFSET, description=f"Items to skip (at most {MAX_OFFSET}).")
]
MAX_JSON_DEPTH = 16
"""Deepest nesting of a JSON value the API stores (device metadata, config values)."""
MAX_METADATA_BYTES = 64 * 1024
MAX_CONFIG_VALUE_BYTES = 64 * 1024
MAX_CONFIG_KEYS = 1000
"""Configuration keys one device may have."""


def _refuse_nul_and_depth(value: Any, depth: int = 0) -> None:
    """ValueError for a NUL character in any string or key, or nesting past `MAX_JSON_DEPTH`:
    PostgreSQL cannot store NUL in text or JSON, and deep values break readers later."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("contains a NUL character (\\u0000); remove it")
    elif isinstance(value, int) and not isinstance(value, bool):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"{value} is beyond a 64-bit integer; send it as a string or a float")
    elif isinstance(value, (dict, list)):
        if depth >= MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels; flatten it")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and "\x00" in key:
                raise ValueError("a key contains a NUL character (\\u0000); remove it")
            _refuse_nul_and_depth(item, depth + 1)


def _json_size_limit(limit: int, what: str) -> AfterValidator:
    def check(value: Any) -> Any:
        size = len(orjson.dumps(value))
        if size > limit:
            raise ValueError(f"{what} is {size} bytes as JSON, at most {limit} are kept")
        return value

    return AfterValidator(check)


Metadata = Annotated[
    dict[str, Any],
    _json_size_limit(MAX_METADATA_BYTES, "metadata"),
    Field(description=f"Any JSON object, at most {MAX_METADATA_BYTES} bytes."),
]
ConfigJson = Annotated[
    Any,
    AfterValidator(lambda value: _refuse_nul_and_depth(value) or value),
    _json_size_limit(MAX_CONFIG_VALUE_BYTES, "the value"),
    Field(description=f"Any JSON value, at most {MAX_CONFIG_VALUE_BYTES} bytes."),
]


def _not_dot_segment(value: str) -> str:
    if value in (".", ".."):
        raise ValueError("'.' and '..' are not device ids")
    return value


DeviceId = Annotated[
    str,
    StringConstraints(pattern=DEVICE_ID_PATTERN, min_length=1, max_length=64),
    AfterValidator(_not_dot_segment),
    Field(
        description="1-64 letters, digits, '-', '_' or '.'; the id used in MQTT topics.",
        examples=["sensor-01"],
    ),
]
DeviceType = Annotated[
    str,
    StringConstraints(pattern=DEVICE_TYPE_PATTERN, max_length=32),
    Field(
        description="`temperature`, `humidity`, `power_meter` or another lowercase word "
        "(letters, digits, '_').",
        examples=["temperature"],
    ),
]
DeviceStatus = Literal["active", "inactive", "maintenance"]
AlertSeverity = Literal["info", "warning", "critical"]
AlertStatus = Literal["active", "acknowledged", "resolved"]
ConfigKey = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,128}$"), Field(examples=["interval_s"])
]


def _finite(value: float | None) -> float | None:
    if value is not None and (value != value or value in (float("inf"), float("-inf"))):
        raise ValueError("must be a finite number")
    return value


FiniteFloat = Annotated[float | None, AfterValidator(_finite)]


NAME_PATTERN = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"
"""Something besides white space (which is stripped), and no NUL."""
DisplayName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, strip_whitespace=True, pattern=NAME_PATTERN),
]


class InputModel(BaseModel):
    """Base of request bodies: unknown fields are an error, not silently dropped; types are
    strict (`false` is not 0.0, `"1"` is not 1); no string holds NUL; no value nests past
    `MAX_JSON_DEPTH`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _plain_text(cls, data: Any) -> Any:
        _refuse_nul_and_depth(data)
        return data


class OutputModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class DeviceCreate(InputModel):
    id: DeviceId
    name: DisplayName
    type: DeviceType
    location: Annotated[str, StringConstraints(max_length=200)] | None = None
    metadata: Metadata = Field(default_factory=dict)
    status: DeviceStatus = "active"


_NOT_GIVEN: Any = None
"""The default of a field that may be left out but not set to null (`model_fields_set` tells
which were given)."""


class DeviceUpdate(InputModel):
    """Partial update: only the fields given are changed; `null` clears `location` (the other
    fields cannot be null, and the schema says so)."""

    name: DisplayName = _NOT_GIVEN
    type: DeviceType = _NOT_GIVEN
    location: Annotated[str, StringConstraints(max_length=200)] | None = None
    metadata: Metadata = _NOT_GIVEN
    status: DeviceStatus = _NOT_GIVEN


class DeviceRead(OutputModel):
    id: str
    name: str
    type: str
    location: str | None
    metadata: dict[str, Any] = Field(validation_alias="attributes")
    status: str
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    connected: bool | None = Field(
        None,
        description="What the device last said on `iot/{id}/status` (its last will says "
        "`offline`); null: it never said.",
    )
    last_connected_at: datetime | None = None
    last_disconnected_at: datetime | None = None
    config_version: int = Field(0, description="Version of the desired configuration.")
    reported_config_version: int | None = Field(
        None, description="Version of the configuration the device reported it applied."
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def config_in_sync(self) -> bool:
        """The device reported the version it was sent (or was never sent one)."""
        return self.config_version == 0 or self.reported_config_version == self.config_version


ItemT = TypeVar("ItemT")


class Page(BaseModel, Generic[ItemT]):
    items: list[ItemT]
    total: int = Field(description="Number of items matching the filters.")
    limit: int
    offset: int


class ConfigValue(InputModel):
    value: ConfigJson


class ConfigRead(OutputModel):
    key: str
    value: Any
    updated_at: datetime


class ConfigState(OutputModel):
    """A device's configuration: what it should have, what it says it has."""

    device_id: str
    desired: dict[str, Any] = Field(description="The configuration keys and their values.")
    desired_version: int = Field(description="Grows by one on every change of the keys.")
    published_version: int = Field(
        description="The version on the broker (`iot/{id}/config`, retained)."
    )
    reported: dict[str, Any] | None = Field(
        description="What the device last reported on `iot/{id}/config/reported`."
    )
    reported_version: int | None
    reported_at: datetime | None
    in_sync: bool = Field(description="The device reported the desired version.")
    items: list[ConfigRead] = Field(description="The keys with their times of change.")


class CredentialRead(OutputModel):
    """A device's MQTT credential; the password only in the answer that made it."""

    device_id: str
    username: str = Field(description="The MQTT username: the device id.")
    client_id: str = Field(description="The MQTT client id the device must use: its id.")
    created_at: datetime
    password: str | None = Field(
        None, description="Shown once, when made or rotated; the registry keeps a hash."
    )
    on_broker: bool | None = Field(
        None,
        description="Mosquitto (managed over its dynamic-security plugin) has this password "
        "(null: the embedded broker, which checks the registry itself).",
    )


class CertificateRequest(InputModel):
    csr: Annotated[str, StringConstraints(min_length=1, max_length=16384)] = Field(
        description="A PEM certificate signing request whose subject CN is the device id."
    )


class CertificateRead(OutputModel):
    serial: str
    device_id: str
    fingerprint_sha256: str
    issued_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


class CertificateIssued(CertificateRead):
    certificate: str = Field(description="The signed certificate (PEM).")
    ca_certificate: str = Field(description="The CA that signed it (PEM).")


class AlertCreate(InputModel):
    device_id: DeviceId
    severity: AlertSeverity
    message: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    field: Annotated[str, StringConstraints(max_length=64)] | None = None
    value: FiniteFloat = None
    threshold: FiniteFloat = None


class AlertRead(OutputModel):
    id: int
    device_id: str
    severity: str
    status: str
    message: str
    field: str | None
    value: float | None
    threshold: float | None
    rule_id: int | None
    created_at: datetime
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    first_breach_at: datetime | None = Field(
        None, description="Rule alerts: the device time the condition began to hold."
    )
    last_breach_at: datetime | None = None
    extreme_value: float | None = Field(
        None, description="Rule alerts: the furthest value past the limit while open."
    )
    breach_count: int = 0
    suppressed_count: int = Field(
        0,
        description="Times the rule fired again within its flap window after this alert "
        "resolved (suppressed: no new alert, no notification).",
    )


class ErrorBody(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str = Field(examples=["device 'sensor-01' not found"])
    details: Any = None


class ErrorResponse(BaseModel):
    """The shape of every 4xx and 5xx answer."""

    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"]


class ReadinessItem(BaseModel):
    status: Literal["up", "down", "disabled"]
    detail: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    backends: dict[str, ReadinessItem] | None = Field(
        None, description="Each backend's state: only for a caller with a key."
    )
    tasks: dict[str, ReadinessItem] | None = Field(
        None, description="Each background task's state: only for a caller with a key."
    )
