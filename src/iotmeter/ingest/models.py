"""Values that flow through ingestion: decoded reading sets and typed rejections."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

_SAFE_KEY_PART = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class RejectReason(StrEnum):
    """Why a message (or one element of a batch) was refused; the dead-letter reason code."""

    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    TOO_LARGE = "too_large"
    TOO_DEEP = "too_deep"
    NOT_OBJECT = "not_object"
    NO_READINGS = "no_readings"
    NOT_FINITE = "not_finite"
    BAD_VALUE_TYPE = "bad_value_type"
    BAD_FIELD_NAME = "bad_field_name"
    BAD_TIMESTAMP = "bad_timestamp"
    FUTURE_TIMESTAMP = "future_timestamp"
    DEVICE_MISMATCH = "device_mismatch"
    BAD_TOPIC = "bad_topic"
    BAD_ATTRIBUTE = "bad_attribute"
    UNKNOWN_DEVICE = "unknown_device"
    REFUSED_BY_STORE = "refused_by_store"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A refused message or batch element, with what to keep in the dead-letter store."""

    reason: RejectReason
    detail: str
    topic: str
    payload: bytes
    device_id: str | None = None
    batch_index: int | None = None


def format_key_time(epoch_us: int) -> str:
    """Sortable UTC time to the millisecond, as used in archive keys: 20261127T090511.123Z."""
    moment = datetime.fromtimestamp(epoch_us // 1000 / 1000, UTC)
    return moment.strftime("%Y%m%dT%H%M%S.") + f"{(epoch_us // 1000) % 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class ReadingSet:
    """One set of readings of one device at one time, as decoded from a message."""

    device_id: str
    epoch_us: int
    values: dict[str, float | bool]
    topic: str
    received_at_us: int
    raw: bytes = field(repr=False)
    """The JSON bytes received for this reading set (the element's JSON for a batch element)."""
    device_type: str | None = None
    msg_id: str | None = None
    seq: int | None = None
    batch_index: int | None = None

    @property
    def tie_breaker(self) -> str:
        """What tells apart two reading sets of a device in the same millisecond."""
        if self.msg_id is not None and _SAFE_KEY_PART.fullmatch(self.msg_id):
            return f"m-{self.msg_id}"
        if self.msg_id is not None:
            return "m-" + hashlib.sha256(self.msg_id.encode()).hexdigest()[:24]
        if self.seq is not None:
            return f"s-{self.seq}"
        return "h-" + hashlib.sha256(self.raw).hexdigest()[:24]

    @property
    def identity(self) -> tuple[str, int, str]:
        """Equal exactly when the archive keys are equal (a redelivery), without formatting."""
        return (self.device_id, self.epoch_us // 1000, self.tie_breaker)

    @property
    def archive_key(self) -> str:
        """`{device_id}/{timestamp}_{tie}.json`: a redelivery maps to the same key."""
        return f"{self.device_id}/{format_key_time(self.epoch_us)}_{self.tie_breaker}.json"
