"""A reading set's `identity` (the segment layout's redelivery check) must agree with its
archive key: equal identities exactly when the keys are equal."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from iotmeter.readings import ReadingSet

DEVICES = st.sampled_from(["d1", "d2"])
# Around a millisecond boundary, so equal and different milliseconds both come up.
TIMES = st.integers(min_value=1_764_000_000_000_000, max_value=1_764_000_000_003_000)
MESSAGE_IDS = st.one_of(st.none(), st.sampled_from(["a", "b", "x/y", "ü" * 3]))
SEQUENCES = st.one_of(st.none(), st.integers(0, 2))
RAWS = st.sampled_from([b'{"t":1}', b'{"t":2}'])


@st.composite
def reading_sets(draw: st.DrawFn) -> ReadingSet:
    return ReadingSet(
        device_id=draw(DEVICES),
        epoch_us=draw(TIMES),
        values={"t": 1.0},
        topic="iot/d/telemetry",
        received_at_us=0,
        raw=draw(RAWS),
        msg_id=draw(MESSAGE_IDS),
        seq=draw(SEQUENCES),
    )


@given(reading_sets(), reading_sets())
def test_identity_is_equal_exactly_when_archive_keys_are(a: ReadingSet, b: ReadingSet) -> None:
    assert (a.identity == b.identity) == (a.archive_key == b.archive_key)


def test_a_redelivery_in_the_same_millisecond_is_the_same_reading() -> None:
    first = ReadingSet("d1", 1_764_000_000_000_100, {"t": 1.0}, "t", 0, b"{}", msg_id="m1")
    again = ReadingSet("d1", 1_764_000_000_000_900, {"t": 1.0}, "t", 5, b"{}", msg_id="m1")
    other = ReadingSet("d1", 1_764_000_000_000_100, {"t": 1.0}, "t", 0, b"{}", msg_id="m2")
    assert first.identity == again.identity
    assert first.identity != other.identity
