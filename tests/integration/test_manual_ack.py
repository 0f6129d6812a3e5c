"""The acknowledgement iotmeter's delivery guarantee rests on, pinned against Mosquitto.

A QoS 1 message may be acknowledged (PUBACK) only once the spool has it on disk. The intake's
MQTT session acknowledges only when told to; if it acked by itself, or the intake acked before
the spool's commit, one of these fails.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from iotmeter.ingest.broker import BrokerAddress
from iotmeter.ingest.intake import Intake
from iotmeter.ingest.mqtt_session import MqttSession
from iotmeter.ingest.spool import Spool
from iotmeter.ingest.stats import IngestStats
from tests.conftest import make_settings
from tests.fixtures.services import Mosquitto, running_mosquitto

TOPIC = "iot/ack-test/telemetry"


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with running_mosquitto() as mosquitto:
        yield mosquitto


def address(broker: Mosquitto) -> BrokerAddress:
    return BrokerAddress("127.0.0.1", broker.port)


class Publisher:
    """A device publishing QoS 1 from paho's own thread; records when each PUBACK came."""

    def __init__(self, broker: Mosquitto) -> None:
        self.acked: list[float] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ack-publisher")
        self.client.on_publish = lambda *_args: self.acked.append(time.monotonic())
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def publish(self, payload: bytes) -> None:
        self.client.publish(TOPIC, payload, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def receive(broker: Mosquitto, client_id: str, within: float, *, ack: bool) -> list[bytes]:
    """Connect with a persistent session, collect what comes for `within` s, ack if asked."""
    got: list[bytes] = []
    holder: list[MqttSession] = []

    def on_message(_topic: str, payload: bytes, qos: int, packet_id: int, _retained: bool) -> None:
        got.append(payload)
        if ack:
            holder[0].ack(packet_id, qos)

    session = MqttSession(address(broker), client_id, on_message)
    holder.append(session)
    await session.connect()
    await session.subscribe(TOPIC, 1)
    await asyncio.sleep(within)
    session.close()
    return got


async def test_a_message_not_acknowledged_is_delivered_again(broker: Mosquitto) -> None:
    await receive(broker, "ack-probe", 0.1, ack=False)  # creates the persistent session
    publisher = Publisher(broker)
    publisher.publish(b'{"n": 1}')
    try:
        assert await receive(broker, "ack-probe", 1.0, ack=False) == [b'{"n": 1}']
        # The process "went away" before the message was durable: the broker sends it again.
        assert await receive(broker, "ack-probe", 1.0, ack=True) == [b'{"n": 1}']
        # Acknowledged now: it never comes back.
        assert await receive(broker, "ack-probe", 1.0, ack=False) == []
    finally:
        publisher.close()


@pytest.fixture
async def intake(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[tuple[Intake, Spool]]:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/x.db", tmp_path)
    spool = Spool(tmp_path / "spool", ["only"])
    spool.open()

    class NeverBehind:
        progress = asyncio.Event()

        def behind(self, head: int, limit: int) -> bool:
            return False

    intake = Intake(
        settings,
        address(broker),
        spool,
        client_id="ack-intake",
        stats=IngestStats(),
        flow=NeverBehind(),
    )
    task = asyncio.create_task(intake.run())

    def close_for_test() -> None:
        task.cancel()

    intake.close_for_test = close_for_test  # type: ignore[attr-defined]
    try:
        for _ in range(100):
            if intake.connected:
                break
            await asyncio.sleep(0.05)
        assert intake.connected
        yield intake, spool
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        spool.close()


async def wait_for(condition: object, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_message_the_spool_has_not_committed_is_never_acknowledged(
    intake: tuple[Intake, Spool], broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, spool = intake
    release = threading.Event()
    real_write = spool.files.write

    def stuck_write(first_seq: int, last_seq: int, data: bytes) -> None:
        release.wait(10)  # the disk "hangs": the commit never completes
        real_write(first_seq, last_seq, data)

    monkeypatch.setattr(spool.files, "write", stuck_write)
    publisher = Publisher(broker)
    try:
        publisher.publish(b'{"n": 1}')
        await wait_for(lambda: running.stats.messages_received == 1)
        await asyncio.sleep(0.5)
        assert spool.committed_seq == -1
        running.close_for_test()  # the process goes away before the message is durable
    finally:
        release.set()
        publisher.close()
    # The broker still has it for the collector's session: it was never acknowledged.
    assert await receive(broker, "ack-intake", 1.0, ack=True) == [b'{"n": 1}']


async def test_a_committed_message_is_acknowledged_and_not_sent_again(
    intake: tuple[Intake, Spool], broker: Mosquitto
) -> None:
    running, spool = intake
    publisher = Publisher(broker)
    try:
        publisher.publish(b'{"n": 2}')
        await wait_for(lambda: spool.committed_seq == 0)
        await asyncio.sleep(0.3)  # the PUBACK leaves on the next write readiness
        running.close_for_test()
    finally:
        publisher.close()
    assert await receive(broker, "ack-intake", 1.0, ack=False) == []
