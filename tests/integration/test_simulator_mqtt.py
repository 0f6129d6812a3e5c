"""The simulator against a real (private) Mosquitto: what a subscriber sees, outages, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import orjson
import psutil
import pytest

from iotmeter.config import Settings
from iotmeter.simulator.publisher import Simulator, run_simulator
from tests.fixtures.services import Mosquitto, free_port, running_mosquitto

LOGGER = "iotmeter.simulator"


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with running_mosquitto() as mosquitto:
        yield mosquitto


def simulator_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "simulator_devices": 6,
        "simulator_interval_s": 0.2,
        "simulator_devices_per_connection": 4,
        # Grouped connections (the device channel has its own tests: test_simulator_channel.py).
        "simulator_device_channel": False,
        "simulator_qos": 1,
        # Own prefix per test: device ids and client ids never meet another test's.
        "simulator_id_prefix": f"t{uuid.uuid4().hex[:8]}",
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running(simulator: Simulator) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(simulator.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def subscriber(
    broker: Mosquitto, session: str | None = None
) -> AsyncIterator[aiomqtt.Client]:
    """A telemetry subscriber; with `session`, a persistent one under that client id (the
    broker keeps what arrives while it is away, also across a broker restart)."""
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, identifier=session, clean_session=False if session else None
    ) as client:
        await client.subscribe("iot/+/telemetry", qos=1)
        yield client


async def collect(client: aiomqtt.Client, seconds: float) -> list[aiomqtt.Message]:
    messages: list[aiomqtt.Message] = []

    async def receive() -> None:
        async for message in client.messages:
            messages.append(message)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(receive(), seconds)
    return messages


def by_device(messages: list[aiomqtt.Message]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for message in messages:
        device_id = str(message.topic).split("/")[1]
        assert isinstance(message.payload, bytes)
        grouped[device_id].append(orjson.loads(message.payload))
    return grouped


def broker_connections(port: int) -> int:
    """This process's open TCP connections to the broker."""
    return sum(
        1
        for connection in psutil.Process().net_connections("tcp")
        if connection.raddr
        and connection.raddr.port == port
        and connection.status == psutil.CONN_ESTABLISHED
    )


@pytest.mark.parametrize("qos", [0, 1])
async def test_every_device_publishes_documented_messages_in_order(
    broker: Mosquitto, qos: int
) -> None:
    settings = simulator_settings(simulator_qos=qos)
    simulator = Simulator(settings, broker.url)
    started = datetime.now(UTC)

    async with subscriber(broker) as client, running(simulator):
        messages = await collect(client, 2.0)

    assert broker_connections(broker.port) == 0
    devices = by_device(messages)
    assert set(devices) == {device.device_id for device in simulator.devices}
    assert len(simulator.groups) == 2
    for message in messages:
        assert message.qos == qos
        assert str(message.topic).endswith("/telemetry")
    for device in simulator.devices:
        payloads = devices[device.device_id]
        # 2 s at one message per 0.2 s (± 10 %), the first within the first 0.2 s.
        assert 7 <= len(payloads) <= 12, len(payloads)
        assert [payload["seq"] for payload in payloads] == list(range(len(payloads)))
        for payload in payloads:
            assert set(payload) == {"ts", "seq", "msg_id", "type", "metrics"}
            assert payload["type"] == device.kind
            assert payload["ts"].endswith("Z")
            sent_at = datetime.fromisoformat(payload["ts"])
            assert started - timedelta(seconds=1) < sent_at < datetime.now(UTC)
            assert payload["metrics"]
            assert all(isinstance(value, float) for value in payload["metrics"].values())
        assert len({payload["msg_id"] for payload in payloads}) == len(payloads)
    assert simulator.stats.published >= len(messages)
    assert sum(simulator.stats.published_by_kind.values()) == simulator.stats.published
    assert set(simulator.stats.published_by_kind) == {"temperature", "humidity", "power_meter"}


async def test_devices_share_connections(broker: Mosquitto) -> None:
    simulator = Simulator(simulator_settings(), broker.url)

    async with running(simulator):
        for _ in range(100):
            if simulator.stats.connections_up == 2:
                break
            await asyncio.sleep(0.02)
        assert simulator.stats.connections_up == 2
        assert broker_connections(broker.port) == 2


async def test_spikes_are_marked_in_the_payload(broker: Mosquitto) -> None:
    simulator = Simulator(simulator_settings(simulator_spike_rate=1.0), broker.url)

    async with subscriber(broker) as client, running(simulator):
        messages = await collect(client, 0.6)

    payloads = [payload for batch in by_device(messages).values() for payload in batch]
    assert payloads
    assert all(payload["anomaly"] == "spike" for payload in payloads)
    assert simulator.stats.spikes == simulator.stats.published


async def test_full_dropout_publishes_nothing(broker: Mosquitto) -> None:
    simulator = Simulator(simulator_settings(simulator_dropout_rate=1.0), broker.url)

    async with subscriber(broker) as client, running(simulator):
        messages = await collect(client, 1.0)

    assert messages == []
    assert simulator.stats.published == 0
    assert simulator.stats.dropouts >= 6 * 4


async def test_cancel_ends_run_quickly_at_any_moment(broker: Mosquitto) -> None:
    settings = simulator_settings(simulator_interval_s=0.01, simulator_jitter=0.5)
    # From "still connecting" to "publishing at full speed".
    for delay in [0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3]:
        task = asyncio.create_task(run_simulator(settings, broker.url))
        await asyncio.sleep(delay)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1.0)
        assert time.monotonic() - cancelled_at < 1.0
        # Nothing left behind: no connection, no stray task (such as aiomqtt's keep-alive).
        await asyncio.sleep(0.05)
        assert broker_connections(broker.port) == 0, f"connection left open (delay {delay})"
    stray = [
        task
        for task in asyncio.all_tasks()
        if task is not asyncio.current_task() and "_misc_loop" in repr(task.get_coro())
    ]
    assert stray == []


async def test_cancel_while_the_broker_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    task = asyncio.create_task(
        run_simulator(simulator_settings(), f"mqtt://127.0.0.1:{free_port()}")
    )
    # Past the first retry (after 1 to 1.25 s): retries are not logged again.
    await asyncio.sleep(1.4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)
    assert [record.levelname for record in caplog.records if "cannot reach" in record.message] == [
        "WARNING",
        "WARNING",
    ]


async def test_reconnects_after_a_broker_restart(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    simulator = Simulator(simulator_settings(), broker.url)

    # Persistent: the simulator may reconnect and publish before the watcher is back.
    watcher = f"watcher-{uuid.uuid4().hex[:8]}"
    async with running(simulator) as task:
        async with subscriber(broker, watcher) as client:
            before = by_device(await collect(client, 1.0))
        assert len(before) == 6

        await asyncio.to_thread(broker.stop)
        # Down long enough for the first retries (after 1 s) to fail too.
        await asyncio.sleep(1.5)
        published_while_down = simulator.stats.published
        await asyncio.to_thread(broker.start)

        async with subscriber(broker, watcher) as client:
            # One consumer for the whole watch: aiomqtt's message iterator can drop the message
            # it had just taken when it is cancelled (as `collect`'s timeout does), which made
            # a gap in a device's sequence now and then. Cancelled once, at the end, it can
            # only lose the newest message, which leaves every sequence contiguous.
            received: list[aiomqtt.Message] = []
            every_device_heard = asyncio.Event()

            async def consume() -> None:
                async for message in client.messages:
                    received.append(message)
                    if len({str(m.topic) for m in received}) >= 6:
                        every_device_heard.set()

            consumer = asyncio.create_task(consume())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await every_device_heard.wait()
            await asyncio.sleep(1.0)  # a few messages of each device: their sequences must run on
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            after = by_device(received)
        assert not task.done()

    assert set(after) == set(before)
    assert simulator.stats.published > published_while_down
    assert simulator.stats.reconnects == 2
    for device_id, payloads in after.items():
        # The devices carry on counting: what was sent before the outage is not repeated.
        assert payloads[0]["seq"] > before[device_id][-1]["seq"]
        seqs = [payload["seq"] for payload in payloads]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    messages = [record.message for record in caplog.records]
    # One line per state change and connection, however many retries there were.
    assert sum("connected (" in message for message in messages) == 2
    assert sum(" lost " in message for message in messages) == 2
    assert sum("reconnected after" in message for message in messages) == 2
    assert not any("cannot reach" in message for message in messages)
