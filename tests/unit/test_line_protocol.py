"""Line protocol: what InfluxDB receives for a reading set, and our parser of it."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmeter.readings import ReadingSet
from iotmeter.storage.timeseries.line_protocol import decode_line, encode_line, encode_points


def reading(
    values: dict[str, float | bool] | None = None,
    *,
    device_id: str = "dev-1",
    device_type: str | None = None,
    epoch_us: int = 1_700_000_000_123_456,
) -> ReadingSet:
    return ReadingSet(
        device_id=device_id,
        epoch_us=epoch_us,
        values={"temp": 21.5} if values is None else values,
        topic=f"devices/{device_id}/telemetry",
        received_at_us=epoch_us,
        raw=b"{}",
        device_type=device_type,
    )


def test_a_reading_set_is_one_line_with_sorted_tags_and_microsecond_time() -> None:
    line = encode_line(
        reading({"temp": 21, "hum": 40.5, "on": True, "off": False}, device_type="temperature")
    )
    assert line == (
        b"iot_telemetry,device_id=dev-1,device_type=temperature "
        b"temp=21.0,hum=40.5,on=true,off=false 1700000000123456"
    )


def test_without_a_device_type_only_the_device_id_is_a_tag() -> None:
    assert encode_line(reading()) == b"iot_telemetry,device_id=dev-1 temp=21.5 1700000000123456"


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (21, "21.0"),
        (0, "0.0"),
        (-3, "-3.0"),
        (10**16, "1e+16"),
        (1e-7, "1e-07"),
        (-0.5, "-0.5"),
        (0.1, "0.1"),
    ],
)
def test_numbers_are_always_written_as_floats(value: float, written: str) -> None:
    line = encode_line(reading({"x": value}))
    assert line.split(b" ")[1] == f"x={written}".encode()
    assert not line.split(b" ")[1].endswith((b"i", b"u"))
    _, _, fields, _ = decode_line(line)
    assert isinstance(fields["x"], float)
    assert fields["x"] == float(value)


def test_an_integer_then_a_fraction_give_the_same_field_type() -> None:
    first = decode_line(encode_line(reading({"temp": 21})))[2]["temp"]
    second = decode_line(encode_line(reading({"temp": 21.5})))[2]["temp"]
    assert type(first) is type(second) is float


@pytest.mark.parametrize(
    ("device_type", "escaped"),
    [
        ("a,b", r"a\,b"),
        ("a b", r"a\ b"),
        ("a=b", r"a\=b"),
        (" lead", r"\ lead"),
        ("=", r"\="),
        (r"back\slash", r"back\slash"),
        ("back\\,comma", r"back\\,comma"),
        ("two\\\\ spaced", r"two\\\ spaced"),
        ('quote"d', 'quote"d'),
        ("ünïcode 🌡", r"ünïcode\ 🌡"),
    ],
)
def test_tag_values_are_escaped_as_influxdb_parses_them(device_type: str, escaped: str) -> None:
    line = encode_line(reading(device_type=device_type))
    assert f",device_type={escaped} temp=".encode() in line
    _, tags, _, _ = decode_line(line)
    assert tags == {"device_id": "dev-1", "device_type": device_type}


@pytest.mark.parametrize(
    ("field", "escaped"),
    [("a b", r"a\ b"), ("a,b", r"a\,b"), ("a=b", r"a\=b"), ("plain_name.x-1", "plain_name.x-1")],
)
def test_field_keys_are_escaped(field: str, escaped: str) -> None:
    line = encode_line(reading({field: 1.0}))
    assert f" {escaped}=1.0 ".encode() in line
    assert decode_line(line)[2] == {field: 1.0}


def test_the_measurement_escapes_commas_and_spaces_but_not_equals() -> None:
    line = encode_line(reading(), measurement="my meas,x=y")
    assert line.startswith(b"my\\ meas\\,x=y,device_id=dev-1 ")
    assert decode_line(line)[0] == "my meas,x=y"


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "trailing\n", "\r"])
def test_a_line_break_in_a_tag_value_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        encode_line(reading(device_type=bad))


def test_a_line_break_in_a_device_id_or_field_name_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        encode_line(reading(device_id="dev\n1"))
    with pytest.raises(ValueError, match="line break"):
        encode_line(reading({"te\nmp": 1.0}))


def test_a_tag_value_ending_with_a_backslash_is_refused() -> None:
    # It would escape the separator that follows it: InfluxDB would read another tag value.
    with pytest.raises(ValueError, match="backslash"):
        encode_line(reading(device_type="ends\\"))


def test_a_backslash_in_a_field_name_is_refused() -> None:
    with pytest.raises(ValueError, match="backslash"):
        encode_line(reading({"a\\b": 1.0}))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_values_that_are_not_finite_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match="not finite"):
        encode_line(reading({"temp": value}))


def test_a_reading_set_without_values_is_refused() -> None:
    with pytest.raises(ValueError, match="without values"):
        encode_line(reading({}))


def test_encode_points_writes_one_newline_terminated_line_per_reading_set() -> None:
    payload = encode_points(
        [reading(epoch_us=1), reading({"a": True, "b": 2.0}, epoch_us=2), reading(epoch_us=3)]
    )
    lines = payload.split(b"\n")
    assert lines[-1] == b""
    assert [decode_line(line)[3] for line in lines[:-1]] == [1, 2, 3]


def test_encode_points_names_the_reading_set_it_cannot_write() -> None:
    with pytest.raises(ValueError, match=r"reading set 1 \(dev-1\)"):
        encode_points([reading(), reading(device_type="x\ny")])


def test_negative_timestamps_round_trip() -> None:
    assert decode_line(encode_line(reading(epoch_us=-1_500_000)))[3] == -1_500_000


@pytest.mark.parametrize(
    "line",
    [
        b"m,tag=a field=1.0",  # no timestamp
        b"m field=1.0 12x",
        b"m,tag= field=1.0 1",
        b"m,tag=a=b field=1.0 1",  # unescaped '=' in a tag value
        b"m,tag=a",
        b"m field= 1",
        b"m field=1.0 1\nm field=2.0 2",
        b"m field=nan 1",
        b"m field=1_0 1",
        b",tag=a field=1.0 1",
    ],
)
def test_decode_line_refuses_malformed_lines(line: bytes) -> None:
    with pytest.raises(ValueError, match=r"missing|invalid|more than one line"):
        decode_line(line)


def test_decode_line_reads_other_value_types_like_a_server() -> None:
    assert decode_line(b'm a=5i,b=7u,c="x \\" y",d=T,e=false,f=-1.5e3 10') == (
        "m",
        {},
        {"a": 5, "b": 7, "c": 'x " y', "d": True, "e": False, "f": -1500.0},
        10,
    )


_FIELD_NAMES = st.from_regex(r"\A[A-Za-z0-9_.\-]{1,16}\Z")
_VALUES = st.one_of(
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**53), max_value=2**53),
)


# Any unicode text a device can send: UTF-8 has no lone surrogates (they are not text).
@given(
    tag_values=st.lists(
        st.text(
            st.characters(exclude_characters="\n\r", exclude_categories=("Cs",)),
            min_size=1,
            max_size=30,
        ),
        min_size=1,
        max_size=5,
    ),
    values=st.dictionaries(_FIELD_NAMES, _VALUES, min_size=1, max_size=4),
)
def test_any_tag_value_without_line_breaks_round_trips_one_line_per_point(
    tag_values: list[str], values: dict[str, float | bool]
) -> None:
    readings = [
        reading(values, device_type=value, epoch_us=index) for index, value in enumerate(tag_values)
    ]
    if any(value.endswith("\\") for value in tag_values):
        with pytest.raises(ValueError, match="backslash"):
            encode_points(readings)
        return
    lines = encode_points(readings).split(b"\n")
    assert lines.pop() == b""
    assert len(lines) == len(readings)
    for line, original in zip(lines, readings, strict=True):
        measurement, tags, fields, stamp = decode_line(line)
        assert measurement == "iot_telemetry"
        assert tags == {"device_id": original.device_id, "device_type": original.device_type}
        assert fields == {
            name: value if isinstance(value, bool) else float(value)
            for name, value in original.values.items()
        }
        assert all(isinstance(value, bool | float) for value in fields.values())
        assert stamp == original.epoch_us
