"""The acknowledgement behaviour iotmeter's delivery guarantee rests on, pinned against Mosquitto.

aiomqtt 2.x sends PUBACK as soon as a message reaches its queue; the collector therefore turns on
paho's manual acknowledgement underneath it. If an aiomqtt release changes either behaviour, one
of these tests fails, and the collector's acknowledgement must be revisited.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

import aiomqtt
import pytest

from iotmeter.ingest.collector import _enable_manual_ack
from tests.fixtures.services import Mosquitto, running_mosquitto

TOPIC = "iot/ack-test/telemetry"


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with running_mosquitto() as mosquitto:
        yield mosquitto


def subscriber(broker: Mosquitto, *, manual: bool) -> tuple[aiomqtt.Client, object]:
    client = aiomqtt.Client(
        "127.0.0.1", broker.port, identifier="ack-probe", clean_session=False, timeout=5
    )
    paho = _enable_manual_ack(client) if manual else None
    return client, paho


async def publish_one(broker: Mosquitto, payload: bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="ack-publisher") as client:
        await client.publish(TOPIC, payload, qos=1)


async def next_message(client: aiomqtt.Client, within: float) -> aiomqtt.Message | None:
    try:
        async with asyncio.timeout(within):
            async for message in client.messages:
                return message
    except TimeoutError:
        return None
    return None


async def subscribe_session(broker: Mosquitto) -> None:
    client, _ = subscriber(broker, manual=False)
    async with client:
        await client.subscribe(TOPIC, qos=1)


async def test_plain_aiomqtt_acknowledges_before_the_application_sees_the_message(
    broker: Mosquitto,
) -> None:
    await subscribe_session(broker)
    await publish_one(broker, b'{"n": 1}')
    client, _ = subscriber(broker, manual=False)
    async with client:
        received = await next_message(client, 5)
        assert received is not None
        # The application "crashes" before storing it: it never processes the message.
    client, _ = subscriber(broker, manual=False)
    async with client:
        # Already acknowledged by aiomqtt, so the broker does not send it again: it would be
        # lost. If this starts failing, aiomqtt changed when it acknowledges.
        assert await next_message(client, 1.0) is None


async def test_manual_ack_keeps_a_message_until_it_is_acknowledged(broker: Mosquitto) -> None:
    await subscribe_session(broker)
    await publish_one(broker, b'{"n": 2}')
    client, _paho = subscriber(broker, manual=True)
    async with client:
        first = await next_message(client, 5)
        assert first is not None
        assert first.payload == b'{"n": 2}'
        # Not acknowledged: the process goes away before the message is durable.
    client, paho = subscriber(broker, manual=True)
    async with client:
        again = await next_message(client, 5)
        assert again is not None, "an unacknowledged message must be redelivered"
        assert again.payload == b'{"n": 2}'
        paho.ack(again.mid, 1)  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)  # let the PUBACK leave before disconnecting
    client, _ = subscriber(broker, manual=True)
    async with client:
        assert await next_message(client, 1.0) is None, "an acknowledged message came back"


async def test_manual_ack_needs_the_paho_client_inside_aiomqtt() -> None:
    client = aiomqtt.Client("127.0.0.1", 1, identifier="probe")
    paho = _enable_manual_ack(client)
    assert paho._manual_ack is True
    assert "mid" in inspect.signature(aiomqtt.Message).parameters
