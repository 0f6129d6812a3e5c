"""Properties of the decoder over generated input: it never raises, and valid input round-trips."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from iotmeter.ids import FIELD_NAME_RE
from iotmeter.ingest.decode import Decoded, DecodeLimits, decode_message
from iotmeter.readings import ReadingSet, Rejection, RejectReason
from tests.fixtures.hostile import json_texts

TOPIC = "iot/dev-1/telemetry"
NOW_US = 1_714_564_800_000_000
RESERVED = ["ts", "timestamp", "time", "metrics", "values", "msg_id", "seq", "type", "device_id"]

examples = settings(max_examples=300, deadline=None)

field_names = st.from_regex(FIELD_NAME_RE, fullmatch=True)
topics = st.one_of(st.just(TOPIC), st.text(max_size=80))
received_times = st.integers(min_value=0, max_value=4_000_000_000_000_000)
limits = st.builds(
    DecodeLimits,
    max_payload_bytes=st.integers(1, 4096),
    max_depth=st.integers(1, 12),
    max_future_skew_us=st.integers(0, 10**12),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
keys = st.one_of(st.sampled_from([*RESERVED, "temperature", "bad name"]), st.text(max_size=10))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)


def assert_well_formed(decoded: Decoded, topic: str) -> None:
    assert isinstance(decoded, Decoded)
    for reading in decoded.readings:
        assert isinstance(reading, ReadingSet)
        assert reading.topic == topic
        assert reading.values
        for name, value in reading.values.items():
            assert FIELD_NAME_RE.fullmatch(name)
            assert type(value) is bool or (type(value) is float and math.isfinite(value))
        assert reading.epoch_us >= 0
    for rejection in decoded.rejections:
        assert isinstance(rejection, Rejection)
        assert isinstance(rejection.reason, RejectReason)
        assert rejection.topic == topic
        assert rejection.detail
    assert decoded.readings or decoded.rejections


@examples
@given(payload=st.binary(max_size=300), topic=topics, received_at_us=received_times)
def test_never_raises_on_any_bytes(payload: bytes, topic: str, received_at_us: int) -> None:
    assert_well_formed(decode_message(payload, topic, received_at_us), topic)


@examples
@given(document=json_values, received_at_us=received_times, limits=limits)
def test_never_raises_on_any_json(document: Any, received_at_us: int, limits: DecodeLimits) -> None:
    decoded = decode_message(orjson.dumps(document), TOPIC, received_at_us, limits)
    assert_well_formed(decoded, TOPIC)
    is_batch = type(document) is list and any(type(element) is dict for element in document)
    if not is_batch or any(r.batch_index is None for r in decoded.rejections):
        # One reading set, or a message refused as a whole: exactly one outcome.
        assert len(decoded.readings) + len(decoded.rejections) == 1
        assert all(reading.batch_index is None for reading in decoded.readings)
    else:
        # A batch: one outcome per element, readings in the order they were sent.
        accepted = [reading.batch_index for reading in decoded.readings]
        refused = [rejection.batch_index for rejection in decoded.rejections]
        assert accepted == sorted(index for index in accepted if index is not None)
        assert sorted(index for index in accepted + refused if index is not None) == list(
            range(len(document))
        )


@examples
@given(
    document=st.recursive(
        st.floats() | st.integers(min_value=-(2**63), max_value=2**63) | st.booleans(),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(alphabet="abc", max_size=5), children, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_nan_and_infinity_are_not_finite(document: Any) -> None:
    payload = json.dumps(document, allow_nan=True).encode()  # writes NaN, Infinity, -Infinity
    decoded = decode_message(payload, TOPIC, NOW_US, DecodeLimits(max_depth=200))
    has_non_finite = any(token in payload for token in (b"NaN", b"Infinity"))
    reasons = [r.reason for r in decoded.rejections]
    # A single document with NaN/Infinity anywhere is refused as such. In a batch only the
    # elements whose readings or time are non-finite are refused (a non-finite number inside
    # an ignored attribute is not a reading). Nothing non-finite ever reaches the stores.
    if not has_non_finite:
        assert RejectReason.NOT_FINITE not in reasons
    elif type(document) is not list:
        assert reasons == [RejectReason.NOT_FINITE]
    for reading in decoded.readings:
        assert all(math.isfinite(float(value)) for value in reading.values.values())


@examples
@given(
    values=st.dictionaries(
        field_names,
        st.floats(allow_nan=False, allow_infinity=False)
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1),
        min_size=1,
        max_size=30,
    ),
    container=st.sampled_from(["metrics", "values"]),
    msg_id=st.none() | st.text(min_size=1, max_size=128),
    seq=st.none() | st.integers(min_value=0, max_value=2**64 - 1),
)
def test_valid_readings_are_accepted_and_round_trip(
    values: dict[str, Any], container: str, msg_id: str | None, seq: int | None
) -> None:
    document: dict[str, Any] = {container: values}
    if msg_id is not None:
        document["msg_id"] = msg_id
    if seq is not None:
        document["seq"] = seq
    payload = orjson.dumps(document)
    decoded = decode_message(payload, TOPIC, NOW_US)
    assert decoded.rejections == ()
    [reading] = decoded.readings
    assert reading.values == {
        name: value if type(value) is bool else float(value) for name, value in values.items()
    }
    for name, value in reading.values.items():
        assert type(value) is (bool if type(values[name]) is bool else float)
    assert (reading.device_id, reading.epoch_us, reading.raw) == ("dev-1", NOW_US, payload)
    assert (reading.msg_id, reading.seq) == (msg_id, seq)


@examples
@given(
    epoch_us=st.integers(min_value=10**14, max_value=4 * 10**15),
    form=st.sampled_from(["s", "ms", "us", "ns", "rfc3339"]),
    offset_minutes=st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
)
def test_every_timestamp_form_gives_the_same_time(
    epoch_us: int, form: str, offset_minutes: int
) -> None:
    zone = timezone(timedelta(minutes=offset_minutes))
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=epoch_us)
    ts: object = {
        "s": epoch_us // 10**6,
        "ms": epoch_us // 1000,
        "us": epoch_us,
        "ns": epoch_us * 1000 + 999,
        "rfc3339": moment.astimezone(zone).isoformat().replace("+00:00", "Z"),
    }[form]
    expected = {"s": epoch_us // 10**6 * 10**6, "ms": epoch_us // 1000 * 1000}.get(form, epoch_us)
    document = {"ts": ts, "metrics": {"t": 1}}
    decoded = decode_message(orjson.dumps(document), TOPIC, 4 * 10**15)
    assert [reading.epoch_us for reading in decoded.readings] == [expected]


@examples
@given(name=st.text(max_size=70))
def test_field_names_follow_the_shared_rule(name: str) -> None:
    decoded = decode_message(orjson.dumps({"metrics": {name: 1}}), TOPIC, NOW_US)
    assert bool(decoded.readings) == bool(FIELD_NAME_RE.fullmatch(name))


# --- hostile input: what a buggy or malicious device can send ---------------------------------


@examples
@given(
    elements=st.lists(json_texts(), min_size=1, max_size=6),
    as_batch=st.booleans(),
    received_at=received_times,
)
def test_hostile_json_is_decoded_or_refused_never_an_internal_error(
    elements: list[str], as_batch: bool, received_at: int
) -> None:
    text = "[" + ",".join(elements) + "]" if as_batch else elements[0]
    decoded = decode_message(text.encode("utf-8", "surrogatepass"), TOPIC, received_at)
    assert_well_formed(decoded, TOPIC)
    assert RejectReason.INTERNAL_ERROR not in {r.reason for r in decoded.rejections}
    for rejection in decoded.rejections:
        assert rejection.received_at_us == received_at


def test_the_poison_batches_of_the_issue_are_refused_element_by_element() -> None:
    for payload in (
        b'[{"ts": 1, "x": NaN}, {"ts": 2, "x": 100000000000000000000000}]',
        b'[{"ts": 1, "x": NaN}, {"ts": 2, "\\ud800": 1}]',
        b'[{"ts": 1, "x": NaN}, {"ts": 2, "x": 1, "note": "\\ud800"}]',
        b'[{"x": NaN}, {"x": 100000000000000000000000}]',
    ):
        decoded = decode_message(payload, TOPIC, NOW_US)
        assert_well_formed(decoded, TOPIC)
        reasons = {rejection.reason for rejection in decoded.rejections}
        assert RejectReason.INTERNAL_ERROR not in reasons, payload
        assert reasons, payload
    big = decode_message(
        b'[{"ts": 1, "x": NaN}, {"ts": 2, "x": 1' + b"0" * 30 + b"}]", TOPIC, NOW_US
    )
    assert [reading.values for reading in big.readings] == [{"x": 1e30}]


def test_an_unforeseen_error_becomes_an_internal_error_dead_letter(
    monkeypatch: Any,
) -> None:
    from iotmeter.ingest import decode as decode_module

    def broken(*_args: Any) -> Any:
        raise KeyError("boom")

    monkeypatch.setattr(decode_module, "_decode_reading_set", broken)
    decoded = decode_message(b'{"t": 1}', TOPIC, NOW_US)
    [rejection] = decoded.rejections
    assert rejection.reason == RejectReason.INTERNAL_ERROR
    assert "KeyError" in rejection.detail
    assert rejection.payload == b'{"t": 1}'
    assert rejection.device_id == "dev-1"
    assert rejection.received_at_us == NOW_US


def test_batch_elements_without_a_time_are_refused_with_a_reason() -> None:
    decoded = decode_message(b'[{"t": 1}, {"ts": 5, "t": 2}, {"t": 3}]', TOPIC, NOW_US)
    assert [reading.values for reading in decoded.readings] == [{"t": 2.0}]
    assert [(r.reason, r.batch_index) for r in decoded.rejections] == [
        (RejectReason.MISSING_TIMESTAMP, 0),
        (RejectReason.MISSING_TIMESTAMP, 2),
    ]
    # One reading set alone (or a batch of one) still takes the arrival time.
    alone = decode_message(b'[{"t": 1}]', TOPIC, NOW_US)
    assert [reading.epoch_us for reading in alone.readings] == [NOW_US]


def test_field_names_influx_would_drop_are_refused_for_every_store() -> None:
    for document in ({"metrics": {"time": 1}}, {"values": {"_x": 1}}, {"_x": 1, "t": 2}):
        decoded = decode_message(orjson.dumps(document), TOPIC, NOW_US)
        [rejection] = decoded.rejections
        assert rejection.reason == RejectReason.BAD_FIELD_NAME
        assert "not 'time'" in rejection.detail
