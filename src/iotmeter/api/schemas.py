"""Request and response models of the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from iotmeter.ids import DEVICE_ID_PATTERN, DEVICE_TYPE_PATTERN


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


class InputModel(BaseModel):
    """Base of request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class OutputModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class DeviceCreate(InputModel):
    id: DeviceId
    name: Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
    type: DeviceType
    location: Annotated[str, StringConstraints(max_length=200)] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: DeviceStatus = "active"


class DeviceUpdate(InputModel):
    """Partial update: only the fields given are changed (`null` clears `location`)."""

    name: (
        Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
        | None
    ) = None
    type: DeviceType | None = None
    location: Annotated[str, StringConstraints(max_length=200)] | None = None
    metadata: dict[str, Any] | None = None
    status: DeviceStatus | None = None

    @model_validator(mode="after")
    def _no_null_for_required(self) -> DeviceUpdate:
        nulled = sorted(
            name
            for name in self.model_fields_set
            if getattr(self, name) is None and name != "location"
        )
        if nulled:
            raise ValueError(f"{', '.join(nulled)} cannot be null (only location can be cleared)")
        return self


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


ItemT = TypeVar("ItemT")


class Page(BaseModel, Generic[ItemT]):
    items: list[ItemT]
    total: int = Field(description="Number of items matching the filters.")
    limit: int
    offset: int


class ConfigValue(InputModel):
    value: Any = Field(description="Any JSON value.")


class ConfigRead(OutputModel):
    key: str
    value: Any
    updated_at: datetime


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
    backends: dict[str, ReadinessItem]
    tasks: dict[str, ReadinessItem]
