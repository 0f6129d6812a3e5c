"""Decode telemetry messages: payload bytes + topic -> reading sets and typed rejections.

Pure and total: `decode_message` never raises, whatever the bytes and the topic. Every problem
becomes a `Rejection` with a reason code and a sentence that tells the sender what to fix.

This is the ingestion hot path, so it parses each payload once with orjson and keeps the cost
per reading set to a few dictionary look-ups. The slow, careful work (telling NaN from broken
JSON, walking deep documents) happens only for payloads that need it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from datetime import date
from typing import TYPE_CHECKING, Any

import orjson

from iotmeter.config import env_name
from iotmeter.ids import DEVICE_ID_RE, DEVICE_TYPE_RE, FIELD_NAME_RE
from iotmeter.readings import Decoded, ReadingSet, Rejection, RejectReason

if TYPE_CHECKING:
    from collections.abc import Callable

    from iotmeter.config import Settings

__all__ = [
    "DecodeLimits",
    "Decoded",
    "decode_message",
    "device_id_from_topic",
    "refuse_oversized",
]

# orjson.dumps (used to keep a batch element's own JSON) refuses nesting past about 250 levels.
_MAX_SUPPORTED_DEPTH = 200


Refusal = tuple[RejectReason, str]
"""Why an object is refused: the reason code and the sentence for the sender."""


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """How much a message may ask of the decoder; see `Settings` for the meaning of each."""

    max_payload_bytes: int = 256 * 1024
    max_depth: int = 8
    max_future_skew_us: int = 300_000_000
    max_fields: int = 500

    def __post_init__(self) -> None:
        if self.max_payload_bytes < 1:
            raise ValueError("max_payload_bytes must be at least 1")
        if not 1 <= self.max_depth <= _MAX_SUPPORTED_DEPTH:
            raise ValueError(f"max_depth must be between 1 and {_MAX_SUPPORTED_DEPTH}")
        if self.max_future_skew_us < 0:
            raise ValueError("max_future_skew_us must not be negative")
        if self.max_fields < 1:
            raise ValueError("max_fields must be at least 1")

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeLimits:
        """The limits configured by `IOTMETER_MAX_PAYLOAD_BYTES` and friends."""
        return cls(
            max_payload_bytes=settings.max_payload_bytes,
            max_depth=settings.max_json_depth,
            max_future_skew_us=round(settings.max_future_skew_s * 1_000_000),
            max_fields=settings.max_fields_per_message,
        )


_TOPIC_PREFIX = "iot/"
_TOPIC_SUFFIX = "/telemetry"
_TIME_KEYS = ("ts", "timestamp", "time")
_RESERVED_KEYS = frozenset(
    {"ts", "timestamp", "time", "metrics", "values", "msg_id", "seq", "type", "device_id"}
)
_MAX_MSG_ID_CHARS = 128
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})?",
    re.ASCII,
)
_FIELD_NAME_RULE = (
    "use 1 to 64 ASCII letters, digits, '_', '.' or '-', not starting with '_' and not 'time'"
)

# The same few device ids and field names arrive in almost every message: remember the valid
# ones so the hot path is a set look-up, not a regular expression. Bounded, so a sender making
# up names cannot grow it without limit; past the bound names are simply checked every time.
_MEMO_CAPACITY = 8192
_valid_device_ids: dict[str, str] = {}
"""Each valid device id seen, to itself: every reading of a device shares one string."""
_valid_field_names: set[str] = set()


def _is_field_name(name: str) -> bool:
    """A name every time-series store keeps (`FIELD_NAME_RE`: InfluxDB reserves `time` and
    names starting with `_`, which it would drop or refuse while SQL kept them)."""
    return name in _valid_field_names or _remember_if_valid(name, FIELD_NAME_RE, _valid_field_names)


def _remember_if_valid(name: str, pattern: re.Pattern[str], memo: set[str]) -> bool:
    if pattern.fullmatch(name) is None:
        return False
    if len(memo) < _MEMO_CAPACITY:
        memo.add(name)
    return True


def device_id_from_topic(topic: str) -> str | None:
    """The device id of an `iot/{device_id}/telemetry` topic, or None if it is not one."""
    if not (topic.startswith(_TOPIC_PREFIX) and topic.endswith(_TOPIC_SUFFIX)):
        return None
    device_id = topic[len(_TOPIC_PREFIX) : -len(_TOPIC_SUFFIX)]
    known = _valid_device_ids.get(device_id)
    if known is not None:
        return known
    if DEVICE_ID_RE.fullmatch(device_id) is None:
        return None
    if len(_valid_device_ids) < _MEMO_CAPACITY:
        _valid_device_ids[device_id] = device_id
    return device_id


def decode_message(
    payload: bytes,
    topic: str,
    received_at_us: int,
    limits: DecodeLimits = DecodeLimits(),
) -> Decoded:
    """Turn one MQTT message into reading sets and rejections; never raises.

    Whatever the decoder did not foresee (a bug) refuses the message as `internal_error`,
    naming the exception, instead of stopping the pipeline behind it."""
    try:
        decoded = _decode(payload, topic, received_at_us, limits)
    except Exception as exc:
        device_id = None
        try:
            device_id = device_id_from_topic(topic)
        except Exception:  # the topic itself made it fail
            device_id = None
        decoded = _refuse_message(
            RejectReason.INTERNAL_ERROR,
            f"the decoder failed on this message ({type(exc).__name__}: {str(exc)[:200]}); "
            "this is a bug in iotmeter: please report it with this dead letter",
            topic,
            payload,
            device_id,
        )
    if decoded.rejections:
        stamped = [replace(r, received_at_us=received_at_us) for r in decoded.rejections]
        return Decoded(decoded.readings, tuple(stamped))
    return decoded


def refuse_oversized(
    head: bytes, topic: str, received_at_us: int, size: int, sha256: bytes, limit: int
) -> Decoded:
    """The rejection of a payload too large to keep: the dead letter holds its head, size and
    hash (the intake kept only those)."""
    device_id = device_id_from_topic(topic)
    return Decoded(
        (),
        (
            Rejection(
                RejectReason.TOO_LARGE,
                f"payload is {size} bytes; the limit is {limit}: split it into smaller batches "
                f"(the first {len(head)} bytes are kept here)",
                topic,
                head,
                device_id,
                received_at_us=received_at_us,
                payload_size=size,
                payload_sha256=sha256.hex(),
            ),
        ),
    )


def _decode(payload: bytes, topic: str, received_at_us: int, limits: DecodeLimits) -> Decoded:
    device_id = device_id_from_topic(topic)
    if device_id is None:
        return _refuse_message(
            RejectReason.BAD_TOPIC,
            f"topic {_shorten(topic)} is not of the form iot/{{device_id}}/telemetry with a "
            f"device id of 1 to 64 ASCII letters, digits, '_', '.' or '-'",
            topic,
            payload,
            None,
        )
    if len(payload) > limits.max_payload_bytes:
        return _refuse_message(
            RejectReason.TOO_LARGE,
            f"payload is {len(payload)} bytes; the limit is {limits.max_payload_bytes}: "
            f"split it into smaller batches",
            topic,
            payload,
            device_id,
        )
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        document = _lenient_batch(payload)
        if document is None:
            reason, detail = _why_unparseable(payload, error)
            return _refuse_message(reason, detail, topic, payload, device_id)

    # Nesting depth is at most the number of opening brackets (some may sit inside strings):
    # counting bytes is far cheaper than walking the document, which few payloads need.
    if payload.count(b"{") + payload.count(b"[") > limits.max_depth and _deeper_than(
        document, limits.max_depth
    ):
        return _refuse_message(
            RejectReason.TOO_DEEP,
            f"payload nests objects/arrays more than {limits.max_depth} levels deep; "
            f"send flat name -> number readings",
            topic,
            payload,
            device_id,
        )

    return _decode_document(document, device_id, topic, received_at_us, payload, limits)


def _decode_document(
    document: Any,
    device_id: str,
    topic: str,
    received_at_us: int,
    payload: bytes,
    limits: DecodeLimits,
) -> Decoded:
    """A parsed payload: one reading set, a batch of them, or why it is neither."""
    if type(document) is dict:
        result = _decode_reading_set(
            document, device_id, topic, received_at_us, payload, None, limits
        )
        if isinstance(result, ReadingSet):
            return Decoded((result,))
        return _refuse_message(*result, topic, payload, device_id)

    if type(document) is list and any(type(element) is dict for element in document):
        return _decode_batch(document, device_id, topic, received_at_us, limits)

    if type(document) is list and not document:
        return _refuse_message(
            RejectReason.NO_READINGS,
            "payload is an empty array; send an object or an array of objects with readings",
            topic,
            payload,
            device_id,
        )
    what = "an array without any object" if type(document) is list else _kind_of(document)
    return _refuse_message(
        RejectReason.NOT_OBJECT,
        f"payload is {what}; send a JSON object of readings or an array of such objects",
        topic,
        payload,
        device_id,
    )


def _decode_batch(
    elements: list[Any],
    device_id: str,
    topic: str,
    received_at_us: int,
    limits: DecodeLimits,
) -> Decoded:
    readings: list[ReadingSet] = []
    rejections: list[Rejection] = []
    several = len(elements) > 1
    for index, element in enumerate(elements):
        try:
            raw = orjson.dumps(element)
        except TypeError:
            # Only a batch parsed leniently gets here: a lone UTF-16 surrogate (orjson refuses
            # them, as any strict parser does). Its JSON is kept ASCII-escaped.
            raw = json.dumps(element).encode()
            refusal: Refusal | None = (
                RejectReason.NOT_JSON,
                f"batch element {index} contains a lone UTF-16 surrogate escape (like "
                "\\ud800), which is not valid Unicode text; send valid UTF-8",
            )
        else:
            refusal = _element_refused(element, index, several)
        if refusal is None:
            result = _decode_reading_set(
                element, device_id, topic, received_at_us, raw, index, limits
            )
            if isinstance(result, ReadingSet):
                readings.append(result)
                continue
            refusal = result
        rejections.append(Rejection(*refusal, topic, raw, device_id, index))
    return Decoded(tuple(readings), tuple(rejections))


def _element_refused(element: Any, index: int, several: bool) -> Refusal | None:
    """Why a batch element is not even a reading set, if it is not."""
    if type(element) is not dict:
        return (
            RejectReason.NOT_OBJECT,
            f"batch element {index} is {_kind_of(element)}; each element must be an object of "
            "readings",
        )
    if several and not any(key in element for key in _TIME_KEYS):
        return (
            RejectReason.MISSING_TIMESTAMP,
            f"batch element {index} has no 'ts'; in a batch of several reading sets each needs "
            "its own time (without one they would all take the arrival time and overwrite each "
            "other)",
        )
    return None


def _decode_reading_set(
    document: dict[str, Any],
    device_id: str,
    topic: str,
    received_at_us: int,
    raw: bytes,
    batch_index: int | None,
    limits: DecodeLimits,
) -> ReadingSet | Refusal:
    """A reading set, or why this object is refused (the caller knows what to keep of it)."""
    refusal = _attributes_refused(document, device_id)
    if refusal is not None:
        return refusal
    epoch_us = _reading_time(document, received_at_us, limits)
    if isinstance(epoch_us, tuple):
        return epoch_us
    container = "metrics" if "metrics" in document else "values" if "values" in document else None
    if container is None:
        values = _top_level_values(document)
    else:
        values = _container_values(container, document[container])
    if isinstance(values, tuple):
        return values
    if len(values) > limits.max_fields:
        return (
            RejectReason.TOO_MANY_FIELDS,
            f"{len(values)} readings in one reading set; at most {limits.max_fields} are "
            f"allowed ({env_name('max_fields_per_message')}): send them in several messages",
        )
    return ReadingSet(
        device_id=device_id,
        epoch_us=epoch_us,
        values=values,
        topic=topic,
        received_at_us=received_at_us,
        raw=raw,
        device_type=document.get("type"),
        msg_id=document.get("msg_id"),
        seq=document.get("seq"),
        batch_index=batch_index,
    )


def _attributes_refused(document: dict[str, Any], device_id: str) -> Refusal | None:
    """What is wrong with `device_id`, `msg_id`, `seq` or `type`, if anything."""
    claimed_id = document.get("device_id", device_id)
    if claimed_id != device_id:
        return (
            RejectReason.DEVICE_MISMATCH,
            f"'device_id' in the payload is {_shorten(claimed_id)} but the topic is for "
            f"{device_id!r}; drop the field or publish on that device's topic",
        )
    msg_id = document.get("msg_id")
    if (msg_id is not None or "msg_id" in document) and (
        type(msg_id) is not str or not 0 < len(msg_id) <= _MAX_MSG_ID_CHARS
    ):
        return (
            RejectReason.BAD_ATTRIBUTE,
            f"'msg_id' is {_shorten(msg_id)}; it must be a string of 1 to "
            f"{_MAX_MSG_ID_CHARS} characters",
        )
    seq = document.get("seq")
    if (seq is not None or "seq" in document) and (type(seq) is not int or seq < 0):
        return (
            RejectReason.BAD_ATTRIBUTE,
            f"'seq' is {_shorten(seq)}; it must be a non-negative integer",
        )
    device_type = document.get("type")
    if (device_type is not None or "type" in document) and (
        type(device_type) is not str or DEVICE_TYPE_RE.fullmatch(device_type) is None
    ):
        return (
            RejectReason.BAD_ATTRIBUTE,
            f"'type' is {_shorten(device_type)}; it must be a lowercase letter followed by up "
            f"to 31 lowercase letters, digits or '_' (like 'power_meter')",
        )
    return None


def _reading_time(
    document: dict[str, Any], received_at_us: int, limits: DecodeLimits
) -> int | Refusal:
    """The reading's time in epoch microseconds (the arrival time when it has none)."""
    for time_key in _TIME_KEYS:
        if time_key not in document:
            continue
        stamp = document[time_key]
        if type(stamp) is float and not math.isfinite(stamp):  # lenient batch path only
            return RejectReason.NOT_FINITE, f"'{time_key}' is not a finite number"
        parsed = _epoch_us(stamp)
        if isinstance(parsed, str):
            return RejectReason.BAD_TIMESTAMP, f"'{time_key}' {parsed}"
        if parsed - received_at_us > limits.max_future_skew_us:
            return (
                RejectReason.FUTURE_TIMESTAMP,
                f"'{time_key}' is {(parsed - received_at_us) / 1e6:.3f} s after the time "
                f"the message arrived (at most {limits.max_future_skew_us / 1e6:g} s "
                f"allowed); check the device clock",
            )
        return parsed
    return received_at_us


def _container_values(container: str, source: Any) -> dict[str, float | bool] | Refusal:
    """The readings under `metrics` (or `values`): every entry must be one."""
    if type(source) is not dict:
        return (
            RejectReason.BAD_VALUE_TYPE,
            f"'{container}' is {_kind_of(source)}; it must be an object of name -> number "
            f"or boolean",
        )
    values: dict[str, float | bool] = {}
    for name, value in source.items():
        if not _is_field_name(name):
            return (
                RejectReason.BAD_FIELD_NAME,
                f"field name {_shorten(name)} is not allowed; {_FIELD_NAME_RULE}",
            )
        kind = type(value)
        # orjson refuses NaN, Infinity and numbers that overflow a double; only a batch
        # parsed leniently (see _lenient_batch) brings them here.
        if kind is float and not math.isfinite(value):
            return _not_finite(name)
        if kind is float or kind is bool:
            values[name] = value
        elif kind is int:
            values[name] = float(value)
        else:
            return (
                RejectReason.BAD_VALUE_TYPE,
                f"field {_shorten(name)} is {_kind_of(value)}; readings must be numbers or "
                f"booleans",
            )
    if not values:
        return (
            RejectReason.NO_READINGS,
            f"'{container}' is empty; add at least one name -> number or boolean reading",
        )
    return values


def _top_level_values(document: dict[str, Any]) -> dict[str, float | bool] | Refusal:
    """No container: top-level numbers and booleans are the readings, and other top-level
    values (strings, objects...) are attributes, which the time-series store ignores."""
    values: dict[str, float | bool] = {}
    for name, value in document.items():
        kind = type(value)
        if (kind is float or kind is int or kind is bool) and name not in _RESERVED_KEYS:
            if kind is float and not math.isfinite(value):
                return _not_finite(name)
            if not _is_field_name(name):
                return (
                    RejectReason.BAD_FIELD_NAME,
                    f"field name {_shorten(name)} is not allowed; {_FIELD_NAME_RULE}",
                )
            values[name] = float(value) if kind is int else value
    if not values:
        return (
            RejectReason.NO_READINGS,
            "no readings found; put name -> number or boolean readings under 'metrics' "
            "(or 'values', or at the top level)",
        )
    return values


def _not_finite(name: str) -> Refusal:
    return (
        RejectReason.NOT_FINITE,
        f"field {_shorten(name)} is not a finite number; send finite numbers only "
        "(JSON has no NaN or Infinity)",
    )


def _epoch_us(value: object) -> int | str:
    """Epoch microseconds of a reading's time, or what is wrong with it (a sentence tail)."""
    epoch_us: int
    if type(value) is int:  # exact arithmetic; bool is its own type, so it is not taken here
        magnitude = abs(value)
        if magnitude < 100_000_000_000:  # seconds
            epoch_us = value * 1_000_000
        elif magnitude < 100_000_000_000_000:  # milliseconds
            epoch_us = value * 1_000
        elif magnitude < 100_000_000_000_000_000:  # microseconds
            epoch_us = value
        else:  # nanoseconds
            epoch_us = value // 1_000
    elif type(value) is float:
        size = abs(value)
        if size < 1e11:
            epoch_us = round(value * 1_000_000)
        elif size < 1e14:
            epoch_us = round(value * 1_000)
        elif size < 1e17:
            epoch_us = round(value)
        else:
            epoch_us = round(value / 1_000)
    elif type(value) is str:
        parsed = _parse_rfc3339(value)
        if isinstance(parsed, str):
            return parsed
        epoch_us = parsed
    else:
        return (
            f"is {_kind_of(value)}; send an RFC 3339 time with a zone (2024-05-01T12:00:00Z) "
            f"or epoch seconds, milliseconds, microseconds or nanoseconds"
        )
    if epoch_us < 0:
        return "is before 1970-01-01T00:00:00Z; check the device clock"
    return epoch_us


def _parse_rfc3339(text: str) -> int | str:
    match = _RFC3339.fullmatch(text)
    if match is None:
        return (
            f"is {_shorten(text)}, not an RFC 3339 time; send e.g. 2024-05-01T12:00:00.123Z "
            f"or an epoch number"
        )
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    if zone is None:
        return (
            f"is {_shorten(text)}, which has no time zone; add 'Z' (UTC) or an offset like '+02:00'"
        )
    try:
        days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return f"is {_shorten(text)}, which is not a calendar date"
    offset_s = 0
    if zone not in ("Z", "z"):
        offset_hours, offset_minutes = int(zone[1:3]), int(zone[4:6])
        if offset_hours > 23 or offset_minutes > 59:
            return f"is {_shorten(text)}, whose UTC offset is out of range"
        offset_s = offset_hours * 3600 + offset_minutes * 60
        if zone[0] == "-":
            offset_s = -offset_s
    hours, minutes, seconds = int(hour), int(minute), int(second)
    # Second 60 is a leap second (RFC 3339 allows it); it lands on the next minute, as in POSIX.
    if hours > 23 or minutes > 59 or seconds > 60:
        return f"is {_shorten(text)}, whose time of day is out of range"
    micros = int(fraction[:6].ljust(6, "0")) if fraction else 0
    total_s = days * 86_400 + hours * 3600 + minutes * 60 + seconds - offset_s
    return total_s * 1_000_000 + micros


def _why_unparseable(payload: bytes, error: orjson.JSONDecodeError) -> tuple[RejectReason, str]:
    """Tell apart the ways a payload orjson refused can be wrong (cold path)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as bad_text:
        return (
            RejectReason.NOT_UTF8,
            f"payload is not UTF-8 (invalid byte at offset {bad_text.start}); send JSON text "
            f"encoded as UTF-8",
        )
    too_deep = (
        RejectReason.TOO_DEEP,
        "payload nests objects/arrays too deeply to parse; send flat name -> number readings",
    )
    # orjson stops at 1024 levels. Asking the recursive stdlib parser to go there would only
    # spend stack, so this case is told by orjson's message (pinned by a test).
    if "depth" in str(error).lower():
        return too_deep
    # The stdlib parser accepts NaN, Infinity and numbers that overflow to infinity, which
    # orjson refuses: if it parses the text and met one of those, the fix is different.
    non_finite: list[str] = []
    try:
        json.loads(
            text,
            parse_constant=non_finite.append,
            parse_float=_finite_or_noted(non_finite),
            parse_int=_finite_or_noted(non_finite),
        )
    except RecursionError:
        return too_deep
    except ValueError:
        pass
    else:
        if non_finite:
            return (
                RejectReason.NOT_FINITE,
                f"payload contains the non-finite number {_shorten(non_finite[0])}; send "
                f"finite numbers only (JSON has no NaN or Infinity)",
            )
    return RejectReason.NOT_JSON, f"payload is not valid JSON ({error}); send one JSON document"


def _lenient_batch(payload: bytes) -> list[Any] | None:
    """A batch whose only fault is NaN/Infinity in some elements, parsed so that only those
    elements are refused (cold path; None for anything else)."""
    if not payload.lstrip().startswith(b"["):
        return None
    try:
        document = json.loads(payload.decode("utf-8"), parse_int=_int_as_orjson_reads_it)
    except (ValueError, RecursionError):
        return None
    if type(document) is list and any(type(element) is dict for element in document):
        return document
    return None


def _int_as_orjson_reads_it(token: str) -> int | float:
    """orjson reads an integer beyond 64 bits as a float; the lenient path must agree (and
    never build a 4,000-digit int, which Python refuses to)."""
    if len(token) <= 20:
        value = int(token)
        if -(2**63) <= value < 2**64:
            return value
    return float(token)


def _finite_or_noted(non_finite: list[str]) -> Callable[[str], float]:
    def parse(token: str) -> float:
        if math.isinf(float(token)):  # float() of a long digit string is inf, never an error
            non_finite.append(token)
        return 0.0

    return parse


def _deeper_than(document: object, max_depth: int) -> bool:
    """Whether objects/arrays nest more than `max_depth` levels; iterative, so any depth is safe."""
    if type(document) is not dict and type(document) is not list:
        return False
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        children = node.values() if type(node) is dict else node
        for child in children:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def _refuse_message(
    reason: RejectReason, detail: str, topic: str, payload: bytes, device_id: str | None
) -> Decoded:
    return Decoded((), (Rejection(reason, detail, topic, payload, device_id),))


_KINDS: dict[type, str] = {
    str: "a string",
    dict: "an object",
    list: "an array",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def _kind_of(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _shorten(value: object, limit: int = 64) -> str:
    """A value quoted for a detail sentence, cut short: names and ids come from the sender."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."
    if type(value) is dict or type(value) is list:
        return _kind_of(value)
    # Numbers, booleans and null as the sender wrote them in JSON.
    return orjson.dumps(value).decode()[:limit]
