"""The intake's MQTT 3.1.1 session, byte for byte: packets split anywhere, large packets,
malformed input, the broker's answers. (Against real brokers: tests/integration/
test_manual_ack.py, the e2e tests on Mosquitto and on the embedded amqtt broker.)"""

from __future__ import annotations

import asyncio
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotmeter.ingest.broker import BrokerAddress
from iotmeter.ingest.mqtt_session import (
    INVALID_TOPIC,
    MqttSession,
    SessionClosed,
    _packet,
    connect_packet,
    subscribe_packet,
)

Received = tuple[str, bytes, int, int, bool]


class RecordingTransport:
    """Stands in for the socket: records what the session writes."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.writes = 0
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written += data
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def publish(
    topic: bytes, payload: bytes, qos: int = 1, packet_id: int = 1, retain: bool = False
) -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", packet_id)
    return _packet((3 << 4) | (qos << 1) | int(retain), body + payload)


def session(received: list[Received]) -> tuple[MqttSession, RecordingTransport]:
    mqtt = MqttSession(
        BrokerAddress("127.0.0.1", 1883), "test", lambda *message: received.append(message)
    )
    transport = RecordingTransport()
    mqtt.connection_made(transport)  # type: ignore[arg-type]
    return mqtt, transport


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.tuples(
            st.text(min_size=1, max_size=40).filter(lambda t: "\x00" not in t),
            st.binary(max_size=600),
            st.integers(0, 1),
            st.booleans(),
        ),
        min_size=1,
        max_size=40,
    ),
    cuts=st.lists(st.integers(1, 900), min_size=1, max_size=200),
)
async def test_publishes_split_anywhere_are_each_handed_over_once_whole(
    messages: list[tuple[str, bytes, int, bool]], cuts: list[int]
) -> None:
    received: list[Received] = []
    mqtt, _ = session(received)
    stream = b"".join(
        publish(topic.encode(), payload, qos, index + 1, retain)
        for index, (topic, payload, qos, retain) in enumerate(messages)
    )
    position = 0
    for cut in cuts * (len(stream) // max(1, sum(cuts)) + 1):
        if position >= len(stream):
            break
        mqtt.data_received(stream[position : position + cut])
        position += cut
    if position < len(stream):
        mqtt.data_received(stream[position:])
    assert received == [
        (topic, payload, qos, (index + 1) if qos else 0, retain)
        for index, (topic, payload, qos, retain) in enumerate(messages)
    ]
    mqtt.close()


async def test_a_ten_megabyte_publish_in_small_reads_is_joined_once() -> None:
    received: list[Received] = []
    mqtt, _ = session(received)
    big = bytes(range(256)) * (10 * 4096)
    stream = publish(b"iot/big/telemetry", big) + publish(b"iot/after/telemetry", b"{}", 1, 2)
    for start in range(0, len(stream), 65536):
        mqtt.data_received(stream[start : start + 65536])
    assert [(topic, len(payload)) for topic, payload, *_ in received] == [
        ("iot/big/telemetry", len(big)),
        ("iot/after/telemetry", 2),
    ]
    assert received[0][1] == big
    mqtt.close()


async def test_a_topic_that_is_not_utf8_is_handed_over_marked() -> None:
    received: list[Received] = []
    mqtt, _ = session(received)
    mqtt.data_received(publish(b"iot/\xff\xfe/telemetry", b"{}"))
    assert received == [(INVALID_TOPIC, b"{}", 1, 1, False)]
    mqtt.close()


async def test_a_malformed_length_closes_the_connection() -> None:
    received: list[Received] = []
    mqtt, transport = session(received)
    mqtt.data_received(bytes([0x32, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))
    assert transport.aborted
    with pytest.raises(SessionClosed, match="malformed"):
        await mqtt.wait_closed()


async def test_an_unexpected_packet_type_closes_the_connection() -> None:
    mqtt, transport = session([])
    mqtt.data_received(bytes([0x80, 0x00]))  # SUBSCRIBE, from the broker
    assert transport.aborted
    with pytest.raises(SessionClosed, match="unexpected packet type 8"):
        await mqtt.wait_closed()


async def test_acks_of_one_turn_leave_in_one_write_in_order() -> None:
    mqtt, transport = session([])
    for packet_id in (7, 8, 65535):
        mqtt.ack(packet_id, 1)
    mqtt.ack(9, 2)
    assert transport.writes == 0
    await asyncio.sleep(0)
    assert transport.writes == 1
    assert bytes(transport.written) == (
        b"\x40\x02\x00\x07" + b"\x40\x02\x00\x08" + b"\x40\x02\xff\xff" + b"\x50\x02\x00\x09"
    )
    mqtt.close()


async def test_a_pubrel_is_answered_with_pubcomp() -> None:
    mqtt, transport = session([])
    mqtt.data_received(bytes([0x62, 0x02, 0x01, 0x02]))
    assert bytes(transport.written).endswith(b"\x70\x02\x01\x02")
    mqtt.close()


@pytest.mark.parametrize(
    ("code", "reason"),
    [(1, "unacceptable protocol version"), (4, "bad user name or password"), (5, "not authorized")],
)
async def test_a_refused_connection_says_why(code: int, reason: str) -> None:
    mqtt, _ = session([])
    mqtt.data_received(bytes([0x20, 0x02, 0x00, code]))
    with pytest.raises(SessionClosed, match=reason):
        await mqtt._connack
    mqtt.close()


async def test_a_refused_subscription_is_an_error() -> None:
    mqtt, _ = session([])
    mqtt.data_received(bytes([0x20, 0x02, 0x00, 0x00]))
    subscribing = asyncio.create_task(mqtt.subscribe("iot/+/telemetry", 1))
    await asyncio.sleep(0)
    mqtt.data_received(bytes([0x90, 0x03, 0x00, 0x01, 0x80]))
    with pytest.raises(SessionClosed, match="refused the subscription"):
        await subscribing
    mqtt.close()


def test_connect_asks_for_a_persistent_session_with_credentials() -> None:
    packet = connect_packet(
        BrokerAddress("h", 1883, username="user", password="secret"), "iotmeter-1", 10
    )
    assert packet[0] == 0x10
    body = packet[2:]
    assert body[:6] == b"\x00\x04MQTT"
    assert body[6] == 4  # MQTT 3.1.1
    assert body[7] == 0xC0  # user name and password, clean session off
    assert body[8:10] == b"\x00\x0a"
    assert body[10:] == b"\x00\x0aiotmeter-1\x00\x04user\x00\x06secret"


def test_subscribe_asks_for_qos_1() -> None:
    assert subscribe_packet(1, "iot/+/telemetry", 1) == (
        b"\x82\x14\x00\x01\x00\x0fiot/+/telemetry\x01"
    )


async def test_a_connection_whose_pings_go_unanswered_is_taken_for_dead() -> None:
    mqtt, transport = session([])
    mqtt.keepalive = 1
    mqtt.data_received(bytes([0x20, 0x02, 0x00, 0x00]))
    mqtt._last_sent -= 1
    mqtt._last_received -= 1
    mqtt._tick()  # nothing sent or heard for half the keepalive: PINGREQ
    assert bytes(transport.written).endswith(b"\xc0\x00")
    assert mqtt._ping_sent_at is not None
    mqtt._ping_sent_at -= 2  # two seconds without an answer
    mqtt._tick()
    assert transport.aborted
    with pytest.raises(SessionClosed, match="no answer to PINGREQ"):
        await mqtt.wait_closed()


async def test_a_paused_connection_is_not_taken_for_dead() -> None:
    mqtt, transport = session([])
    mqtt.keepalive = 1
    mqtt.data_received(bytes([0x20, 0x02, 0x00, 0x00]))
    mqtt.pause_reading()
    assert not transport.reading
    mqtt._last_sent -= 1
    mqtt._tick()
    assert mqtt._ping_sent_at is not None
    mqtt._ping_sent_at -= 10
    mqtt._tick()  # the answer is unread on purpose
    assert not transport.aborted
    mqtt.resume_reading()
    assert transport.reading
    mqtt.close()


async def test_random_bytes_never_raise_out_of_the_parser() -> None:
    generator = random.Random(7)
    for _ in range(300):
        mqtt, _ = session([])
        for _ in range(5):
            mqtt.data_received(generator.randbytes(generator.randint(1, 300)))
        mqtt.close()


async def test_a_pause_asked_for_by_the_handler_keeps_the_rest_of_the_read_for_later() -> None:
    received: list[Received] = []
    holder: list[MqttSession] = []

    def handler(*message: object) -> None:
        received.append(message)  # type: ignore[arg-type]
        if len(received) == 3:
            holder[0].pause_reading()

    mqtt = MqttSession(BrokerAddress("127.0.0.1", 1883), "test", handler)
    holder.append(mqtt)
    transport = RecordingTransport()
    mqtt.connection_made(transport)  # type: ignore[arg-type]
    mqtt.data_received(
        b"".join(publish(b"iot/d/telemetry", b"%d" % n, 1, n + 1) for n in range(10))
    )
    assert [payload for _topic, payload, *_ in received] == [b"0", b"1", b"2"]
    assert not transport.reading
    mqtt.resume_reading()
    assert len(received) == 3  # not inside the caller
    await asyncio.sleep(0)
    assert [payload for _topic, payload, *_ in received] == [b"%d" % n for n in range(10)]
    mqtt.close()
