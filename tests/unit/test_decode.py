"""Decoding telemetry messages: accepted forms, and one test per way a message is refused."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from iotmeter.config import Settings
from iotmeter.ingest.decode import Decoded, DecodeLimits, decode_message, device_id_from_topic
from iotmeter.readings import ReadingSet, Rejection, RejectReason

TOPIC = "iot/dev-1/telemetry"
DEVICE = "dev-1"
NOW_US = 1_714_564_800_000_000  # 2024-05-01T12:00:00Z
METRICS = {"temperature": 21.5}


def encode(document: Any) -> bytes:
    return orjson.dumps(document)


def decode(
    document: Any,
    *,
    topic: str = TOPIC,
    received_at_us: int = NOW_US,
    limits: DecodeLimits | None = None,
) -> Decoded:
    payload = document if isinstance(document, bytes) else encode(document)
    if limits is None:
        return decode_message(payload, topic, received_at_us)
    return decode_message(payload, topic, received_at_us, limits)


def accepted(document: Any, **kwargs: Any) -> ReadingSet:
    decoded = decode(document, **kwargs)
    assert decoded.rejections == ()
    [reading] = decoded.readings
    return reading


def refused(document: Any, **kwargs: Any) -> Rejection:
    decoded = decode(document, **kwargs)
    assert decoded.readings == ()
    [rejection] = decoded.rejections
    return rejection


# --- topics -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "device_id"),
    [
        ("iot/dev-1/telemetry", "dev-1"),
        ("iot/A.b_c-9/telemetry", "A.b_c-9"),
        ("iot/" + "x" * 64 + "/telemetry", "x" * 64),
        ("iot//telemetry", None),
        ("iot/telemetry", None),
        ("iot/" + "x" * 65 + "/telemetry", None),
        ("iot/a/b/telemetry", None),
        ("iot/dev 1/telemetry", None),
        ("iot/dev-1\n/telemetry", None),
        ("iot/+/telemetry", None),
        ("iot/dev-1/telemetry/", None),
        ("iot/dev-1/status", None),
        ("/iot/dev-1/telemetry", None),
        ("IOT/dev-1/telemetry", None),
        ("", None),
    ],
)
def test_device_id_from_topic(topic: str, device_id: str | None) -> None:
    assert device_id_from_topic(topic) == device_id


def test_bad_topic_rejects_whole_message_without_device() -> None:
    rejection = refused({"metrics": METRICS}, topic="iot/no such device/telemetry")
    assert rejection.reason is RejectReason.BAD_TOPIC
    assert rejection.device_id is None
    assert rejection.batch_index is None
    assert rejection.topic == "iot/no such device/telemetry"
    assert rejection.payload == encode({"metrics": METRICS})
    assert "iot/{device_id}/telemetry" in rejection.detail


# --- whole-payload checks ---------------------------------------------------------------------


def test_payload_over_the_size_limit_is_too_large_before_decoding() -> None:
    limits = DecodeLimits(max_payload_bytes=64)
    rejection = refused(b"\xff" * 65, limits=limits)
    assert rejection.reason is RejectReason.TOO_LARGE
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)
    assert "65 bytes" in rejection.detail


def test_payload_at_the_size_limit_is_accepted() -> None:
    payload = encode({"metrics": METRICS})
    limits = DecodeLimits(max_payload_bytes=len(payload))
    assert accepted(payload, limits=limits).values == METRICS


def test_payload_not_utf8() -> None:
    rejection = refused(b'{"metrics": {"temp\xff": 1}}')
    assert rejection.reason is RejectReason.NOT_UTF8
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)
    assert "offset 18" in rejection.detail


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"   ",
        b'{"metrics": {"t": 1}',
        b'{"metrics": {"t": 1}} {}',
        b"{'metrics': {'t': 1}}",
        b'{"metrics": {"t": 01}}',
        b'{"t": "\\ud800"}',  # a lone surrogate: JSON for the stdlib parser, not for orjson
        b"\xef\xbb\xbf" + b'{"t": 1}',  # UTF-8 byte order mark
        b'{"t": NaN',  # a NaN, but broken anyway: the fix is to send valid JSON
        b'{"t": nan}',
    ],
)
def test_payload_not_json(payload: bytes) -> None:
    rejection = refused(payload)
    assert rejection.reason is RejectReason.NOT_JSON
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)
    assert rejection.payload == payload
    assert rejection.detail.startswith("payload is not valid JSON")


@pytest.mark.parametrize(
    "payload",
    [
        b'{"metrics": {"t": NaN}}',
        b'{"metrics": {"t": Infinity}}',
        b'{"metrics": {"t": -Infinity}}',
        b'{"t": NaN}',
        b'{"metrics": {"t": 1e999}}',
        b'{"metrics": {"t": -1e999}}',
        b'{"metrics": {"t": 1.8e308}}',
        b'{"metrics": {"t": ' + b"9" * 400 + b"}}",
        b'{"metrics": {"t": ' + b"9" * 5000 + b"}}",  # past Python's int digit limit
        b'{"ts": 1e999, "metrics": {"t": 1}}',
    ],
)
def test_non_finite_numbers_are_not_finite_not_not_json(payload: bytes) -> None:
    rejection = refused(payload)
    assert rejection.reason is RejectReason.NOT_FINITE
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)
    assert "finite" in rejection.detail


def test_a_non_finite_batch_element_rejects_that_element_only() -> None:
    decoded = decode_message(
        b'[{"ts": 1, "metrics": {"t": 1}}, {"ts": 2, "metrics": {"t": NaN}}, '
        b'{"ts": Infinity, "t": 2}, {"ts": 4, "t": 3}]',
        TOPIC,
        NOW_US,
    )
    assert [reading.values for reading in decoded.readings] == [{"t": 1.0}, {"t": 3.0}]
    assert [(r.reason, r.batch_index) for r in decoded.rejections] == [
        (RejectReason.NOT_FINITE, 1),
        (RejectReason.NOT_FINITE, 2),
    ]


def test_integers_past_64_bits_that_fit_a_double_are_readings() -> None:
    assert accepted(b'{"metrics": {"t": 18446744073709551616}}').values == {"t": 2.0**64}
    assert accepted(b'{"metrics": {"t": -9223372036854775809}}').values == {"t": -(2.0**63)}


def nested(depth: int) -> Any:
    """A reading set whose ignored attribute `info` makes the document `depth` levels deep."""
    inner: Any = {}
    for _ in range(depth - 2):
        inner = [inner]
    return {"metrics": METRICS, "info": inner}


def test_nesting_at_the_depth_limit_is_accepted() -> None:
    assert accepted(nested(8), limits=DecodeLimits(max_depth=8)).values == METRICS


@pytest.mark.parametrize("depth", [9, 100, 1000])
def test_nesting_past_the_depth_limit_is_too_deep(depth: int) -> None:
    # Built as text (orjson.dumps refuses to nest this deep), with no bracket besides the nesting.
    info = b"[" * (depth - 2) + b"{}" + b"]" * (depth - 2)
    payload = b'{"t": 1, "info": ' + info + b"}"
    rejection = refused(payload, limits=DecodeLimits(max_depth=8))
    assert rejection.reason is RejectReason.TOO_DEEP
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)


@pytest.mark.parametrize("depth", [1025, 5000, 100_000])
def test_nesting_orjson_refuses_is_too_deep_not_not_json(depth: int) -> None:
    rejection = refused(b"[" * depth + b"]" * depth)
    assert rejection.reason is RejectReason.TOO_DEEP


def test_batch_depth_counts_the_array() -> None:
    assert decode([nested(3)], limits=DecodeLimits(max_depth=4)).readings
    rejection = refused([nested(4)], limits=DecodeLimits(max_depth=4))
    assert rejection.reason is RejectReason.TOO_DEEP


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    document = {"note": "[[[[{{{{[[[[{{{{", "metrics": METRICS}
    assert accepted(document, limits=DecodeLimits(max_depth=2)).values == METRICS


@pytest.mark.parametrize(
    ("document", "what"),
    [
        (42, "a number"),
        ("hello", "a string"),
        (True, "a boolean"),
        (None, "null"),
        ([1, 2], "an array without any object"),
        ([[{"metrics": METRICS}]], "an array without any object"),
    ],
)
def test_top_level_not_an_object(document: Any, what: str) -> None:
    rejection = refused(document)
    assert rejection.reason is RejectReason.NOT_OBJECT
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)
    assert f"payload is {what};" in rejection.detail


def test_empty_array_has_no_readings() -> None:
    rejection = refused([])
    assert rejection.reason is RejectReason.NO_READINGS
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)


# --- batches ----------------------------------------------------------------------------------


def test_batch_with_one_bad_element_keeps_the_good_ones() -> None:
    good_first = {"ts": 1_714_564_790_000, "metrics": {"t": 1}}
    bad = {"ts": 1_714_564_791_000, "metrics": {"t": "warm"}}
    good_last = {"ts": 1_714_564_792_000, "metrics": {"t": 3}}
    decoded = decode([good_first, bad, good_last])

    assert [reading.batch_index for reading in decoded.readings] == [0, 2]
    assert [reading.values for reading in decoded.readings] == [{"t": 1.0}, {"t": 3.0}]
    assert [reading.raw for reading in decoded.readings] == [encode(good_first), encode(good_last)]
    [rejection] = decoded.rejections
    assert rejection.reason is RejectReason.BAD_VALUE_TYPE
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, 1)
    assert rejection.payload == encode(bad)
    assert rejection.detail == "field 't' is a string; readings must be numbers or booleans"


def test_batch_element_that_is_not_an_object() -> None:
    decoded = decode([{"ts": 1, "metrics": METRICS}, 7, "x"])
    assert len(decoded.readings) == 1
    assert [(r.reason, r.batch_index, r.payload) for r in decoded.rejections] == [
        (RejectReason.NOT_OBJECT, 1, b"7"),
        (RejectReason.NOT_OBJECT, 2, b'"x"'),
    ]
    assert decoded.rejections[0].detail.startswith("batch element 1 is a number")


def test_batch_element_with_no_readings() -> None:
    decoded = decode([{"ts": 1, "metrics": METRICS}, {"ts": 2}])
    [rejection] = decoded.rejections
    assert (rejection.reason, rejection.batch_index) == (RejectReason.NO_READINGS, 1)


# --- readings ---------------------------------------------------------------------------------


def test_values_key_as_thingsboard_sends_it() -> None:
    reading = accepted({"ts": 1_714_564_800_000, "values": {"temperature": 21, "on": False}})
    assert reading.values == {"temperature": 21.0, "on": False}


def test_metrics_wins_over_values_when_both_are_sent() -> None:
    reading = accepted({"metrics": {"a": 1}, "values": {"b": 2}})
    assert reading.values == {"a": 1.0}


def test_top_level_readings_when_no_container() -> None:
    reading = accepted(
        {
            "ts": 1_714_564_800,
            "msg_id": "m1",
            "seq": 4,
            "type": "power_meter",
            "device_id": DEVICE,
            "power": 120,
            "on": True,
            "firmware": "1.2.3",
            "location": {"room": "lab"},
            "tags": ["a"],
            "note": None,
        }
    )
    assert reading.values == {"power": 120.0, "on": True}
    assert type(reading.values["power"]) is float


def test_top_level_mode_does_not_check_names_of_attributes() -> None:
    assert accepted({"bad name": "attribute", "t": 1}).values == {"t": 1.0}


def test_value_types_after_decoding() -> None:
    reading = accepted({"metrics": {"int": 3, "float": 2.5, "true": True, "false": False}})
    assert reading.values == {"int": 3.0, "float": 2.5, "true": True, "false": False}
    assert type(reading.values["int"]) is float
    assert reading.values["true"] is True
    assert reading.values["false"] is False


@pytest.mark.parametrize(
    ("value", "what"),
    [("warm", "a string"), ({"c": 1}, "an object"), ([1], "an array"), (None, "null")],
)
@pytest.mark.parametrize("container", ["metrics", "values"])
def test_reading_of_the_wrong_type(container: str, value: Any, what: str) -> None:
    rejection = refused({container: {"ok": 1, "temp": value}})
    assert rejection.reason is RejectReason.BAD_VALUE_TYPE
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)
    assert rejection.detail == f"field 'temp' is {what}; readings must be numbers or booleans"


@pytest.mark.parametrize("container_value", [[{"t": 1}], "t=1", 5, None])
def test_container_that_is_not_an_object(container_value: Any) -> None:
    rejection = refused({"metrics": container_value})
    assert rejection.reason is RejectReason.BAD_VALUE_TYPE
    assert "'metrics' is" in rejection.detail


@pytest.mark.parametrize("name", ["bad name", "", "x" * 65, "température", "a/b", "t\n"])
@pytest.mark.parametrize("top_level", [False, True])
def test_bad_field_name(name: str, top_level: bool) -> None:
    document = {name: 1} if top_level else {"metrics": {name: 1}}
    rejection = refused(document)
    assert rejection.reason is RejectReason.BAD_FIELD_NAME
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)
    assert "field name" in rejection.detail


def test_long_names_are_cut_short_in_the_detail() -> None:
    rejection = refused({"metrics": {"?" * 10_000: 1}})
    assert len(rejection.detail) < 200


@pytest.mark.parametrize(
    "document",
    [
        {"metrics": {}},
        {"values": {}},
        {},
        {"firmware": "1.2", "ts": 1_714_564_800, "seq": 1},
    ],
)
def test_no_readings(document: Any) -> None:
    rejection = refused(document)
    assert rejection.reason is RejectReason.NO_READINGS
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)


# --- timestamps -------------------------------------------------------------------------------

T_US = 1_714_564_800_123_456  # 2024-05-01T12:00:00.123456Z


@pytest.mark.parametrize(
    ("ts", "epoch_us"),
    [
        ("2024-05-01T12:00:00Z", 1_714_564_800_000_000),
        ("2024-05-01T12:00:00.123456Z", T_US),
        ("2024-05-01T12:00:00.123456789Z", T_US),  # nanoseconds: cut to microseconds
        ("2024-05-01T12:00:00.1234567Z", T_US),
        ("2024-05-01T12:00:00.5Z", 1_714_564_800_500_000),
        ("2024-05-01T14:00:00.123456+02:00", T_US),
        ("2024-05-01T07:30:00.123456-04:30", T_US),
        ("2024-05-01T12:00:00.123456+00:00", T_US),
        ("2024-05-01t12:00:00.123456z", T_US),
        ("2024-05-01 12:00:00.123456Z", T_US),
        ("2016-12-31T23:59:60Z", 1_483_228_800_000_000),  # leap second: the next minute
        ("1970-01-01T00:00:00Z", 0),
        (1_714_564_800, 1_714_564_800_000_000),  # seconds
        (1_714_564_800.123456, T_US),  # seconds with a fraction
        (1_714_564_800_123, 1_714_564_800_123_000),  # milliseconds
        (1_714_564_800_123.456, T_US),
        (1_714_564_800_123_456, T_US),  # microseconds
        (1_714_564_800_123_456.0, T_US),
        (1_714_564_800_123_456_789, T_US),  # nanoseconds
        (1_714_564_800_123_456_000.0, T_US),
        (0, 0),
    ],
)
def test_timestamp_forms(ts: Any, epoch_us: int) -> None:
    assert accepted({"ts": ts, "metrics": METRICS}).epoch_us == epoch_us


def test_epoch_units_are_told_apart_by_magnitude() -> None:
    forms = [1_714_564_800, 1_714_564_800_000, 1_714_564_800_000_000, 1_714_564_800_000_000_000]
    times = {accepted({"ts": ts, "metrics": METRICS}).epoch_us for ts in forms}
    assert times == {1_714_564_800_000_000}


@pytest.mark.parametrize(
    ("ts", "epoch_us"),
    [
        (99_999_999_999, 99_999_999_999_000_000),  # below 1e11: seconds
        (100_000_000_000, 100_000_000_000_000),  # milliseconds from 1e11
        (99_999_999_999_999, 99_999_999_999_999_000),
        (100_000_000_000_000, 100_000_000_000_000),  # microseconds from 1e14
        (99_999_999_999_999_999, 99_999_999_999_999_999),
        (100_000_000_000_000_000, 100_000_000_000_000),  # nanoseconds from 1e17
        (5e10, 5 * 10**16),
        (1e11, 10**14),
        (5e13, 5 * 10**16),
        (1e14, 10**14),
        (5e16, 5 * 10**16),
        (1e17, 10**14),
    ],
)
def test_epoch_unit_boundaries(ts: float, epoch_us: int) -> None:
    reading = accepted({"ts": ts, "metrics": METRICS}, received_at_us=10**18)
    assert reading.epoch_us == epoch_us


@pytest.mark.parametrize("key", ["ts", "timestamp", "time"])
def test_timestamp_keys(key: str) -> None:
    assert accepted({key: 1_714_564_790, "metrics": METRICS}).epoch_us == 1_714_564_790_000_000


def test_ts_wins_over_timestamp_and_time() -> None:
    document = {"time": 3, "timestamp": 2, "ts": 1, "metrics": METRICS}
    assert accepted(document).epoch_us == 1_000_000


def test_missing_timestamp_is_the_receive_time() -> None:
    assert accepted({"metrics": METRICS}, received_at_us=NOW_US + 17).epoch_us == NOW_US + 17


@pytest.mark.parametrize(
    ("ts", "hint"),
    [
        ("2024-05-01T12:00:00", "no time zone"),
        ("2024-05-01T12:00:00.123", "no time zone"),
        ("yesterday", "not an RFC 3339 time"),
        ("2024-05-01", "not an RFC 3339 time"),
        ("2024-W18-3T12:00:00Z", "not an RFC 3339 time"),
        ("20240501T120000Z", "not an RFC 3339 time"),
        ("2024-05-01T12:00:00ZZ", "not an RFC 3339 time"),
        ("2024-05-01T12:00:00+0200", "not an RFC 3339 time"),
        ("\uff12\uff10\uff12\uff14-05-01T12:00:00Z", "not an RFC 3339 time"),  # full-width digits
        ("1714564800", "not an RFC 3339 time"),
        ("2024-02-30T12:00:00Z", "not a calendar date"),
        ("0000-01-01T00:00:00Z", "not a calendar date"),
        ("2024-05-01T24:00:00Z", "out of range"),
        ("2024-05-01T12:60:00Z", "out of range"),
        ("2024-05-01T12:00:61Z", "out of range"),
        ("2024-05-01T12:00:00+24:00", "offset is out of range"),
        ("1969-12-31T23:59:59Z", "before 1970"),
        ("1970-01-01T01:00:00+02:00", "before 1970"),
        ("1969-12-31T23:59:59.999999Z", "before 1970"),
        (-1e-6, "before 1970"),
        (-1, "before 1970"),
        (-0.5, "before 1970"),
        (-1_714_564_800_000, "before 1970"),
        (True, "is a boolean"),
        (None, "is null"),
        ([1_714_564_800], "is an array"),
        ({"s": 1_714_564_800}, "is an object"),
    ],
)
def test_bad_timestamp(ts: Any, hint: str) -> None:
    rejection = refused({"ts": ts, "metrics": METRICS})
    assert rejection.reason is RejectReason.BAD_TIMESTAMP
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)
    assert rejection.detail.startswith("'ts' ")
    assert hint in rejection.detail


def test_bad_timestamp_names_the_key_used() -> None:
    rejection = refused({"time": "soon", "metrics": METRICS})
    assert rejection.detail.startswith("'time' is 'soon'")


def test_future_timestamp_past_the_allowed_skew() -> None:
    limits = DecodeLimits(max_future_skew_us=5_000_000)
    at_limit = {"ts": NOW_US + 5_000_000, "metrics": METRICS}
    assert accepted(at_limit, limits=limits).epoch_us == NOW_US + 5_000_000

    rejection = refused({"ts": NOW_US + 5_000_001, "metrics": METRICS}, limits=limits)
    assert rejection.reason is RejectReason.FUTURE_TIMESTAMP
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)
    assert "device clock" in rejection.detail


def test_far_future_numbers_are_future_not_errors() -> None:
    for ts in (1e300, 2**64 - 1, "9999-12-31T23:59:59Z"):
        assert refused({"ts": ts, "metrics": METRICS}).reason is RejectReason.FUTURE_TIMESTAMP


def test_past_timestamps_are_accepted() -> None:
    reading = accepted({"ts": "2001-09-09T01:46:40Z", "metrics": METRICS})
    assert reading.epoch_us == 1_000_000_000_000_000


# --- attributes -------------------------------------------------------------------------------


def test_attributes_are_kept() -> None:
    reading = accepted(
        {
            "msg_id": "abc-1",
            "seq": 0,
            "type": "power_meter",
            "device_id": DEVICE,
            "metrics": METRICS,
        },
        received_at_us=NOW_US,
    )
    assert (reading.msg_id, reading.seq, reading.device_type) == ("abc-1", 0, "power_meter")
    assert (reading.device_id, reading.topic, reading.received_at_us) == (DEVICE, TOPIC, NOW_US)
    assert reading.batch_index is None


def test_absent_attributes_are_none() -> None:
    reading = accepted({"metrics": METRICS})
    assert (reading.msg_id, reading.seq, reading.device_type) == (None, None, None)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("msg_id", ""),
        ("msg_id", "x" * 129),
        ("msg_id", 123),
        ("msg_id", None),
        ("seq", -1),
        ("seq", 1.5),
        ("seq", 1.0),
        ("seq", True),
        ("seq", "3"),
        ("seq", None),
        ("type", "Power"),
        ("type", "1meter"),
        ("type", "t" * 33),
        ("type", "power_meter\n"),
        ("type", 5),
        ("type", None),
    ],
)
def test_bad_attribute(key: str, value: Any) -> None:
    rejection = refused({key: value, "metrics": METRICS})
    assert rejection.reason is RejectReason.BAD_ATTRIBUTE
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)
    assert rejection.detail.startswith(f"'{key}' is ")


def test_msg_id_of_128_characters_is_accepted() -> None:
    assert accepted({"msg_id": "é" * 128, "metrics": METRICS}).msg_id == "é" * 128


@pytest.mark.parametrize("claimed", ["dev-2", "DEV-1", "", None, 1])
def test_device_id_must_match_the_topic(claimed: Any) -> None:
    rejection = refused({"device_id": claimed, "metrics": METRICS})
    assert rejection.reason is RejectReason.DEVICE_MISMATCH
    assert (rejection.device_id, rejection.batch_index) == (DEVICE, None)
    assert "dev-1" in rejection.detail


# --- raw bytes and archive keys ---------------------------------------------------------------


def test_raw_is_exactly_the_received_bytes_for_a_single_object() -> None:
    payload = b'  {"metrics" : {"temperature": 21.50, "n": 1e2}}\n'
    reading = accepted(payload)
    assert reading.raw == payload
    assert reading.values == {"temperature": 21.5, "n": 100.0}


def test_rejected_single_object_keeps_the_received_bytes() -> None:
    payload = b'{ "metrics": {"t": "hot"} }'
    assert refused(payload).payload == payload


def test_redelivery_maps_to_the_same_archive_key() -> None:
    payload = encode({"ts": 1_714_564_800_123, "msg_id": "m-1", "metrics": METRICS})
    first = accepted(payload, received_at_us=NOW_US)
    again = accepted(payload, received_at_us=NOW_US + 60_000_000)
    assert first.archive_key == again.archive_key == "dev-1/20240501T120000.123Z_m-m-1.json"


def test_redelivery_without_ids_maps_to_the_same_archive_key() -> None:
    payload = encode({"ts": 1_714_564_800_123, "metrics": METRICS})
    assert accepted(payload).archive_key == accepted(payload).archive_key


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({"msg_id": "a"}, {"msg_id": "b"}),
        ({"seq": 1}, {"seq": 2}),
        ({}, {"metrics": {"temperature": 22.0}}),
    ],
)
def test_different_messages_in_the_same_millisecond_get_different_keys(
    one: dict[str, Any], other: dict[str, Any]
) -> None:
    base = {"ts": 1_714_564_800_123, "metrics": METRICS}
    assert accepted(base | one).archive_key != accepted(base | other).archive_key


def test_batch_elements_get_their_own_archive_keys() -> None:
    element = {"ts": 1_714_564_800_123, "metrics": METRICS}
    decoded = decode([element, element | {"seq": 1}])
    keys = {reading.archive_key for reading in decoded.readings}
    assert len(keys) == 2


# --- limits -----------------------------------------------------------------------------------


def test_limits_from_settings() -> None:
    settings = Settings(max_payload_bytes=1000, max_json_depth=4, max_future_skew_s=1.5)
    assert DecodeLimits.from_settings(settings) == DecodeLimits(
        max_payload_bytes=1000, max_depth=4, max_future_skew_us=1_500_000
    )


def test_default_limits_match_default_settings() -> None:
    assert DecodeLimits.from_settings(Settings()) == DecodeLimits()


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_payload_bytes": 0},
        {"max_depth": 0},
        {"max_depth": 1000},
        {"max_future_skew_us": -1},
    ],
)
def test_limits_out_of_range_are_refused(overrides: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(overrides))):
        DecodeLimits(**overrides)


def test_deepest_supported_limit_still_keeps_batch_elements() -> None:
    limits = DecodeLimits(max_depth=200)
    decoded = decode([{**nested(198), "ts": 1}, 1], limits=limits)
    assert len(decoded.readings) == 1
    assert decoded.rejections[0].payload == b"1"


def test_detail_sentences_are_plain_json_for_values() -> None:
    rejection = refused({"seq": True, "metrics": METRICS})
    assert rejection.detail == "'seq' is true; it must be a non-negative integer"
