r"""InfluxDB line protocol: reading sets to lines (microsecond timestamps), and a parser of lines.

One reading set is one line:
`iot_telemetry,device_id=<id>[,device_type=<type>] <field>=<value>,... <epoch_us>`, written with
`precision=us`. Numbers are always written as floats (`21.0`, never `21i`): a device that sends
21 and then 21.5 would otherwise hit a field type conflict. Booleans are `true`/`false`. Tags are
sorted by key, as InfluxDB recommends.

Escaping follows what InfluxDB 2.x's parser (`models/points.go`) does, which is narrower than the
prose of the spec: in the measurement a backslash escapes `,` and space; in tag keys, tag values
and field keys it escapes `,`, `=` and space. Any other backslash is an ordinary character, and
`\\` is *not* collapsed into one backslash (the server keeps both). What cannot be written is
refused with `ValueError` (the caller rejects that record): a newline or carriage return anywhere
in a name or tag value (a line break ends the line); a tag key or value ending with a backslash
(it would escape the separator after it); a backslash in a field key (the server scans the field
section in backslash pairs, so `a\\,b` would be cut there); an empty tag value; NaN or infinity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from iotmeter.readings import ReadingSet

MEASUREMENT = "iot_telemetry"
WRITE_PRECISION = "us"

FieldValue = float | int | bool | str

_MEASUREMENT_SPECIAL = frozenset(", ")
_KEY_SPECIAL = frozenset(",= ")
_LINE_BREAKS = ("\n", "\r")
_FLOAT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_INTEGER = re.compile(r"(?:-?[0-9]+i|[0-9]+u)\Z")


def _escape(text: str, special: frozenset[str]) -> str:
    return "".join("\\" + char if char in special else char for char in text)


def _check_name(kind: str, text: str) -> None:
    if not text:
        raise ValueError(f"{kind} must not be empty")
    if any(mark in text for mark in _LINE_BREAKS):
        raise ValueError(f"{kind} {text!r} contains a line break, which line protocol cannot carry")


def escape_measurement(name: str) -> str:
    _check_name("measurement", name)
    if name.startswith("#"):
        raise ValueError(f"measurement {name!r} starts with '#', which marks a comment line")
    if name.endswith("\\"):
        raise ValueError(f"measurement {name!r} ends with a backslash")
    return _escape(name, _MEASUREMENT_SPECIAL)


def escape_tag(kind: str, text: str) -> str:
    """A tag key or value; `kind` names it in the error."""
    _check_name(kind, text)
    if text.endswith("\\"):
        raise ValueError(f"{kind} {text!r} ends with a backslash, which line protocol cannot carry")
    return _escape(text, _KEY_SPECIAL)


def escape_field_key(name: str) -> str:
    _check_name("field name", name)
    if "\\" in name:
        raise ValueError(f"field name {name!r} contains a backslash")
    return _escape(name, _KEY_SPECIAL)


def format_field_value(name: str, value: float | bool) -> str:
    """`true`/`false` for booleans; every number as a float (`repr`, so `21.0`, `1e+16`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"field {name!r}: {value!r} is not a number or boolean") from None
    if not math.isfinite(number):
        raise ValueError(f"field {name!r}: {number!r} cannot be written (not finite)")
    return repr(number)


def reading_tags(reading: ReadingSet) -> dict[str, str]:
    tags = {"device_id": reading.device_id}
    if reading.device_type is not None:
        tags["device_type"] = reading.device_type
    return tags


def encode_line(reading: ReadingSet, measurement: str = MEASUREMENT) -> bytes:
    """One reading set as one line (without the newline); `ValueError` if it cannot be written."""
    if not reading.values:
        raise ValueError("a reading set without values cannot be written")
    tags = "".join(
        f",{escape_tag('tag key', key)}={escape_tag(f'tag {key}', value)}"
        for key, value in sorted(reading_tags(reading).items())
    )
    fields = ",".join(
        f"{escape_field_key(name)}={format_field_value(name, value)}"
        for name, value in reading.values.items()
    )
    if isinstance(reading.epoch_us, bool) or not isinstance(reading.epoch_us, int):
        raise ValueError(f"timestamp {reading.epoch_us!r} is not an integer")
    return f"{escape_measurement(measurement)}{tags} {fields} {reading.epoch_us}".encode()


def encode_points(readings: Sequence[ReadingSet], measurement: str = MEASUREMENT) -> bytes:
    """Every reading set as one newline-terminated line; `ValueError` names the first bad one."""
    lines = []
    for index, reading in enumerate(readings):
        try:
            lines.append(encode_line(reading, measurement) + b"\n")
        except ValueError as exc:
            raise ValueError(f"reading set {index} ({reading.device_id}): {exc}") from None
    return b"".join(lines)


# --- Parsing ---------------------------------------------------------------------------------


def _scan(text: str, start: int, stops: str, escapable: frozenset[str]) -> tuple[str, int]:
    """Read from `start` up to the first unescaped character of `stops`; unescape on the way."""
    out: list[str] = []
    index = start
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text) and text[index + 1] in escapable:
            out.append(text[index + 1])
            index += 2
            continue
        if char in stops:
            break
        out.append(char)
        index += 1
    return "".join(out), index


def _parse_value(raw: str) -> FieldValue:
    if raw in ("t", "T", "true", "True", "TRUE"):
        return True
    if raw in ("f", "F", "false", "False", "FALSE"):
        return False
    if _INTEGER.match(raw):
        return int(raw[:-1])
    if not _FLOAT.match(raw):
        raise ValueError(f"invalid number {raw!r}")
    return float(raw)


def _scan_string_value(text: str, start: int) -> tuple[str, int]:
    """A double-quoted field value starting at `start` (the quote); `\\"` and `\\\\` unescape."""
    out: list[str] = []
    index = start + 1
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text) and text[index + 1] in '"\\':
            out.append(text[index + 1])
            index += 2
            continue
        if char == '"':
            return "".join(out), index + 1
        out.append(char)
        index += 1
    raise ValueError("unterminated string field value")


def decode_line(
    line: bytes,
) -> tuple[str, dict[str, str], dict[str, FieldValue], int]:
    """(measurement, tags, fields, timestamp) of one line, undoing the escapes `encode_line` adds.

    Integers (`5i`, `5u`) and quoted strings are read too, so it can stand for a server.
    Raises `ValueError` on anything that is not one complete line with a timestamp.
    """
    text = line.decode("utf-8")
    if text.endswith("\n"):
        text = text[:-1]
    if any(mark in text for mark in _LINE_BREAKS):
        raise ValueError("more than one line")
    measurement, index = _scan(text, 0, ", ", _MEASUREMENT_SPECIAL)
    if not measurement:
        raise ValueError("missing measurement")
    tags, index = _decode_tags(text, index)
    if index >= len(text) or text[index] != " ":
        raise ValueError("missing fields")
    fields, index = _decode_fields(text, index + 1)
    if index >= len(text) or text[index] != " ":
        raise ValueError("missing timestamp")
    stamp = text[index + 1 :].rstrip(" ")
    if not stamp or not stamp.lstrip("-").isdigit() or not stamp.isascii():
        raise ValueError(f"invalid timestamp {stamp!r}")
    return measurement, tags, fields, int(stamp)


def _decode_tags(text: str, index: int) -> tuple[dict[str, str], int]:
    tags: dict[str, str] = {}
    while index < len(text) and text[index] == ",":
        key, index = _scan(text, index + 1, "=, ", _KEY_SPECIAL)
        if not key or index >= len(text) or text[index] != "=":
            raise ValueError("missing tag key or value")
        value, index = _scan(text, index + 1, "=, ", _KEY_SPECIAL)
        if not value or (index < len(text) and text[index] == "="):
            raise ValueError(f"invalid value of tag {key!r}")
        if key in tags:
            raise ValueError(f"duplicate tag {key!r}")
        tags[key] = value
    return tags, index


def _decode_fields(text: str, index: int) -> tuple[dict[str, FieldValue], int]:
    fields: dict[str, FieldValue] = {}
    while True:
        key, index = _scan(text, index, "=, ", _KEY_SPECIAL)
        if not key or index >= len(text) or text[index] != "=":
            raise ValueError("missing field key or value")
        index += 1
        if index < len(text) and text[index] == '"':
            value_text, index = _scan_string_value(text, index)
            fields[key] = value_text
        else:
            end = index
            while end < len(text) and text[end] not in ", ":
                end += 1
            raw = text[index:end]
            if not raw:
                raise ValueError(f"missing value of field {key!r}")
            try:
                fields[key] = _parse_value(raw)
            except ValueError:
                raise ValueError(f"invalid value of field {key!r}: {raw!r}") from None
            index = end
        if index < len(text) and text[index] == ",":
            index += 1
            continue
        return fields, index
