"""The simulator's device channel against a real (private) Mosquitto: each device on its own
connection, its status and last will, the configuration it applies and reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import psutil
import pytest

from iotmeter.config import Settings
from iotmeter.simulator.publisher import Simulator
from tests.fixtures.services import Mosquitto, running_mosquitto, writable_by_mosquitto

LOGGER = "iotmeter.simulator"


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with running_mosquitto() as mosquitto:
        yield mosquitto


def channel_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "simulator_devices": 3,
        "simulator_interval_s": 0.2,
        "simulator_qos": 1,
        "simulator_device_channel": True,
        # Own prefix per test: device ids never meet another test's.
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
async def subscribed(broker: Mosquitto, *topics: str) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        yield client


async def collect(client: aiomqtt.Client, seconds: float) -> list[aiomqtt.Message]:
    messages: list[aiomqtt.Message] = []

    async def receive() -> None:
        async for message in client.messages:
            messages.append(message)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(receive(), seconds)
    return messages


async def wait_for_messages(
    client: aiomqtt.Client, count: int, seconds: float = 10.0
) -> list[aiomqtt.Message]:
    """The first `count` messages; fails after `seconds` without them."""
    messages: list[aiomqtt.Message] = []
    async with asyncio.timeout(seconds):
        async for message in client.messages:
            messages.append(message)
            if len(messages) == count:
                return messages
    raise AssertionError("message iteration ended")


async def drain(client: aiomqtt.Client) -> None:
    """Drop the messages received so far."""
    for _ in range(len(client.messages)):
        await anext(client.messages)


async def retained(broker: Mosquitto, topic_filter: str, count: int) -> dict[str, bytes]:
    """What the broker retains on `count` topics matching the filter, by device id."""
    async with subscribed(broker, topic_filter) as client:
        messages = await wait_for_messages(client, count, 5.0)
    assert all(message.retain for message in messages)
    return {device_of(message): payload_of(message) for message in messages}


def device_of(message: aiomqtt.Message) -> str:
    return str(message.topic).split("/")[1]


def payload_of(message: aiomqtt.Message) -> bytes:
    assert isinstance(message.payload, bytes)
    return message.payload


async def publish_config(
    broker: Mosquitto, device_id: str, payload: bytes, *, retain: bool = True
) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(f"iot/{device_id}/config", payload, qos=1, retain=retain)


def config_message(version: int, config: dict[str, Any]) -> bytes:
    return orjson.dumps({"version": version, "config": config})


async def until(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def broker_connections(port: int) -> int:
    """This process's open TCP connections to the broker."""
    return sum(
        1
        for connection in psutil.Process().net_connections("tcp")
        if connection.raddr
        and connection.raddr.port == port
        and connection.status == psutil.CONN_ESTABLISHED
    )


def connections_in_log(broker: Mosquitto) -> list[tuple[str, str]]:
    """(client id, username) of each connection Mosquitto logged."""
    log = (broker.workdir / "mosquitto.log").read_text()
    return re.findall(r"New client connected from \S+ as (\S+) \(.*?u'([^']*)'\)", log)


async def test_each_device_connects_on_its_own_with_its_id(broker: Mosquitto) -> None:
    simulator = Simulator(channel_settings(), broker.url)
    device_ids = {device.device_id for device in simulator.devices}

    async with running(simulator):
        await until(lambda: simulator.stats.connections_up == 3)
        assert broker_connections(broker.port) == 3
        await until(lambda: len(connections_in_log(broker)) == 3)

    assert sorted(connections_in_log(broker)) == sorted((id_, id_) for id_ in device_ids)
    assert simulator.groups == []
    assert broker_connections(broker.port) == 0


async def test_status_is_online_while_running_and_offline_after_a_clean_stop(
    broker: Mosquitto,
) -> None:
    simulator = Simulator(channel_settings(), broker.url)
    device_ids = {device.device_id for device in simulator.devices}

    async with running(simulator):
        await until(lambda: simulator.stats.connections_up == 3)
        # A subscriber that comes later still learns it: the status is retained.
        assert await retained(broker, "iot/+/status", 3) == dict.fromkeys(device_ids, b"online")

    assert await retained(broker, "iot/+/status", 3) == dict.fromkeys(device_ids, b"offline")


async def test_cancel_stops_quickly_and_leaves_nothing_behind(broker: Mosquitto) -> None:
    settings = channel_settings(simulator_devices=6, simulator_interval_s=0.01)
    # From "still connecting" to "publishing at full speed".
    for delay in [0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3]:
        task = asyncio.create_task(Simulator(settings, broker.url).run())
        await asyncio.sleep(delay)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2.0)
        assert time.monotonic() - cancelled_at < 1.0
        await asyncio.sleep(0.05)
        assert broker_connections(broker.port) == 0, f"connection left open (delay {delay})"
    stray = [
        task
        for task in asyncio.all_tasks()
        if task is not asyncio.current_task() and "_misc_loop" in repr(task.get_coro())
    ]
    assert stray == []


SIMULATOR_PROCESS = """
import asyncio, sys
from iotmeter.config import Settings
from iotmeter.simulator.publisher import run_simulator
asyncio.run(run_simulator(Settings(), sys.argv[1]))
"""


async def test_last_will_says_offline_when_the_process_dies(broker: Mosquitto) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "IOTMETER_SIMULATOR_DEVICES": "2",
        "IOTMETER_SIMULATOR_ID_PREFIX": prefix,
        "IOTMETER_SIMULATOR_INTERVAL_S": "0.2",
        "IOTMETER_SIMULATOR_DEVICE_CHANNEL": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SIMULATOR_PROCESS,
        broker.url,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with subscribed(broker, "iot/+/status") as client:
            online = await wait_for_messages(client, 2, 30.0)
            assert {payload_of(message) for message in online} == {b"online"}
            killed_at = time.monotonic()
            process.send_signal(signal.SIGKILL)
            offline = await wait_for_messages(client, 2, 10.0)
            # Mosquitto sends the will as soon as it sees the socket close, not after the
            # keep-alive (60 s, times 1.5) runs out.
            assert time.monotonic() - killed_at < 5.0
        assert {payload_of(message) for message in offline} == {b"offline"}
        assert {device_of(message) for message in offline} == {
            f"{prefix}-temperature-0001",
            f"{prefix}-humidity-0001",
        }
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    # Retained, as the will says: a subscriber that comes later learns it too.
    assert set((await retained(broker, "iot/+/status", 2)).values()) == {b"offline"}


async def test_a_retained_config_is_applied_on_connect_and_reported(broker: Mosquitto) -> None:
    simulator = Simulator(channel_settings(), broker.url)
    configured, *others = (device.device_id for device in simulator.devices)
    config = {"interval_s": 0.05, "enabled": True, "firmware": {"channel": "beta"}, "n": [1, 2]}
    await publish_config(broker, configured, config_message(7, config))

    async with subscribed(broker, "iot/+/config/reported") as client, running(simulator):
        (report,) = await wait_for_messages(client, 1)
        # No configuration for the others: they report nothing.
        assert await collect(client, 0.5) == []

    assert device_of(report) == configured
    assert orjson.loads(payload_of(report)) == {"version": 7, "config": config}
    state = simulator.channels[configured].state
    assert (state.interval_s, state.enabled, state.config_version) == (0.05, True, 7)
    assert state.config == config
    for device_id in others:
        assert simulator.channels[device_id].state.config_version is None
        assert simulator.channels[device_id].state.interval_s == 0.2
    assert simulator.stats.configs_applied == 1
    assert simulator.stats.configs_refused == 0
    # The report is retained for whoever asks later.
    assert orjson.loads((await retained(broker, "iot/+/config/reported", 1))[configured]) == {
        "version": 7,
        "config": config,
    }


async def test_after_a_broker_restart_devices_say_online_again_and_take_their_config_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with running_mosquitto(extra_config=("log_type all",)) as broker:
        simulator = Simulator(channel_settings(), broker.url)
        device_id = simulator.devices[0].device_id
        await publish_config(broker, device_id, config_message(5, {"interval_s": 0.1}))

        async with running(simulator) as task:
            await until(lambda: simulator.stats.configs_applied == 1)
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(1.5)  # down long enough for the first retries to fail too
            await asyncio.to_thread(broker.start)
            await until(
                lambda: simulator.stats.reconnects == 3 and simulator.stats.connections_up == 3
            )
            # The broker keeps the retained configuration: it comes again and is applied again.
            await until(lambda: simulator.stats.configs_applied == 2)
            assert not task.done()

        log = (broker.workdir / "mosquitto.log").read_text()
    for device in simulator.devices:
        says_online = f"Received PUBLISH from {device.device_id} (d0, q1, r1, m"
        status = f"'iot/{device.device_id}/status', ... (6 bytes))"
        assert sum(says_online in line and status in line for line in log.splitlines()) == 2
    messages = [record.getMessage() for record in caplog.records]
    # One line for the outage and one for the recovery, however many devices and retries.
    assert sum("lost its connection" in message for message in messages) == 1
    assert sum("reconnected after" in message for message in messages) == 1
    ours = [r for r in caplog.records if r.name.startswith(LOGGER)]
    assert [r.levelname for r in ours if r.levelno >= logging.WARNING] == ["WARNING"]


def telemetry_seqs(messages: list[aiomqtt.Message], device_id: str) -> list[int]:
    """The `seq` of each telemetry message of one device."""
    return [
        orjson.loads(payload_of(message))["seq"]
        for message in messages
        if str(message.topic) == f"iot/{device_id}/telemetry"
    ]


async def reported(client: aiomqtt.Client, device_id: str, version: int) -> None:
    """Read the subscription up to the device's report of `version`: what came before it,
    the device sent under its previous configuration."""
    async with asyncio.timeout(10.0):
        async for message in client.messages:
            topic = str(message.topic)
            if topic == f"iot/{device_id}/config/reported" and (
                orjson.loads(payload_of(message))["version"] == version
            ):
                return


async def test_a_config_change_changes_what_the_device_publishes(broker: Mosquitto) -> None:
    simulator = Simulator(channel_settings(simulator_interval_s=0.5), broker.url)
    device_id, other, _ = (device.device_id for device in simulator.devices)

    async with (
        subscribed(broker, "iot/+/telemetry", "iot/+/config/reported") as client,
        running(simulator),
    ):

        async def configure(version: int, config: dict[str, Any]) -> None:
            await publish_config(broker, device_id, config_message(version, config))
            await reported(client, device_id, version)

        await until(lambda: simulator.stats.connections_up == 3)
        # The default interval: about 2 messages a second.
        assert len(telemetry_seqs(await collect(client, 1.0), device_id)) <= 4

        await configure(1, {"interval_s": 0.05})
        faster = telemetry_seqs(await collect(client, 1.0), device_id)
        # About 20 a second; loosely, in case the machine is busy.
        assert len(faster) >= 8
        assert faster == list(range(faster[0], faster[0] + len(faster)))

        await configure(2, {"interval_s": 0.05, "enabled": False})
        quiet = await collect(client, 1.0)
        assert telemetry_seqs(quiet, device_id) == []
        assert telemetry_seqs(quiet, other)  # the others carry on

        # `enabled` gone: back to its default (on), at the interval still configured.
        await configure(3, {"interval_s": 0.05})
        assert len(telemetry_seqs(await collect(client, 1.0), device_id)) >= 8

        # `interval_s` gone: back to the default interval.
        await configure(4, {})
        assert len(telemetry_seqs(await collect(client, 1.0), device_id)) <= 4

    state = simulator.channels[device_id].state
    assert (state.interval_s, state.enabled, state.config_version) == (0.5, True, 4)


def hostile_configs() -> list[bytes]:
    rng = random.Random(20261127)
    deep = b'{"version": 2, "config": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    # Within the nesting depth a parser takes, but far larger than a device's memory.
    huge = config_message(2, {"interval_s": 1, "x": [[["y" * 1000] * 100] * 4]})
    return [
        rng.randbytes(200),
        b"\xff\xfe\x00garbage",
        b"null",
        b"[]",
        b'"text"',
        b"42",
        b"{}",
        b'{"version": 2}',
        b'{"config": {}}',
        b'{"version": 2, "config": {}, "extra": 1}',
        b'{"version": "2", "config": {}}',
        b'{"version": true, "config": {}}',
        b'{"version": -1, "config": {}}',
        b'{"version": 2.5, "config": {}}',
        b'{"version": 1e30, "config": {}}',
        b'{"version": 2, "config": []}',
        b'{"version": 2, "config": "interval_s=1"}',
        b'{"version": 2, "config": {"interval_s": -1}}',
        b'{"version": 2, "config": {"interval_s": 0}}',
        b'{"version": 2, "config": {"interval_s": "x"}}',
        b'{"version": 2, "config": {"interval_s": 1e309}}',
        b'{"version": 2, "config": {"interval_s": NaN}}',
        b'{"version": 2, "config": {"interval_s": Infinity}}',
        b'{"version": 2, "config": {"interval_s": true}}',
        b'{"version": 2, "config": {"interval_s": null, "enabled": "no"}}',
        b'{"version": 2, "config": {"enabled": 0}}',
        b'{"version": 2, "config": {"name": "\xed\xa0\x80"}}',  # a lone surrogate
        b'{"version": 2, "config": {"interval_s": 1, ',
        deep,
        huge,
    ]


async def test_malformed_configs_are_refused_and_the_device_carries_on(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    simulator = Simulator(channel_settings(simulator_interval_s=0.1), broker.url)
    device_id = simulator.devices[0].device_id
    channel = simulator.channels[device_id]
    hostile = hostile_configs()
    assert len(hostile[-1]) > 256 * 1024

    async with (
        subscribed(broker, "iot/+/config/reported", "iot/+/telemetry") as client,
        running(simulator) as task,
    ):
        good = {"interval_s": 0.25, "keep": "me"}
        await publish_config(broker, device_id, config_message(1, good))
        await until(lambda: channel.state.config_version == 1)
        for payload in hostile:
            await publish_config(broker, device_id, payload)
        # The same bad message again (as a reconnect redelivers it): refused, not logged again.
        await publish_config(broker, device_id, hostile[-1])
        # A cleared configuration: ignored, not refused.
        await publish_config(broker, device_id, b"")
        await until(lambda: simulator.stats.configs_refused == len(hostile) + 1)

        assert (channel.state.config_version, channel.state.interval_s) == (1, 0.25)
        assert channel.state.config == good
        assert channel.state.enabled
        await drain(client)
        messages = await collect(client, 1.0)
        assert not task.done()
        # Still publishing, at the interval of the configuration it kept.
        assert 2 <= len(telemetry_seqs(messages, device_id)) <= 6
        reports = [m for m in messages if str(m.topic).endswith("/config/reported")]
        # Only the good configuration was reported (once, as the subscription started).
        assert all(orjson.loads(payload_of(m))["version"] == 1 for m in reports)

        # It still takes a good configuration after all that.
        await publish_config(broker, device_id, config_message(3, {"enabled": False}))
        await until(lambda: channel.state.config_version == 3)

    assert simulator.stats.configs_applied == 2
    refusals = [r for r in caplog.records if "refused a configuration" in r.getMessage()]
    assert len(refusals) == len(hostile)
    assert all(r.levelname == "WARNING" for r in refusals)
    # The log says why, not what: no hostile bytes end up in it.
    assert all(len(r.getMessage()) < 300 for r in refusals)


def password_of(device_id: str) -> str:
    return f"secret-of-{device_id}"


@pytest.fixture
def broker_with_accounts() -> Iterator[tuple[Mosquitto, Settings]]:
    """A Mosquitto that knows each device's password and a `collector` account."""
    settings = channel_settings(simulator_device_channel=False)
    with tempfile.TemporaryDirectory(prefix="iotmeter-accounts-") as folder:
        path = Path(folder) / "passwords"
        accounts = {"collector": "collector-password"}
        accounts.update(
            {d.device_id: password_of(d.device_id) for d in Simulator(settings, "mqtt://x").devices}
        )
        for index, (user, password) in enumerate(accounts.items()):
            create = ["-c"] if index == 0 else []
            subprocess.run(
                ["mosquitto_passwd", *create, "-b", str(path), user, password], check=True
            )
        writable_by_mosquitto(Path(folder))
        writable_by_mosquitto(path)
        with running_mosquitto(extra_config=(f"password_file {path}",)) as mosquitto:
            yield mosquitto, settings


async def test_with_device_credentials_devices_log_in_as_themselves(
    broker_with_accounts: tuple[Mosquitto, Settings],
) -> None:
    broker, settings = broker_with_accounts
    # The URL's account works, but is not what devices use; the channel is on even though the
    # setting says off, since device authentication needs it.
    url = f"mqtt://collector:collector-password@127.0.0.1:{broker.port}"
    simulator = Simulator(settings, url, password_of)
    device_ids = {device.device_id for device in simulator.devices}

    async with running(simulator):
        await until(lambda: simulator.stats.connections_up == 3)
        await until(lambda: len(connections_in_log(broker)) == 3)

    assert sorted(connections_in_log(broker)) == sorted((id_, id_) for id_ in device_ids)


async def test_with_wrong_device_credentials_no_device_gets_in(
    broker_with_accounts: tuple[Mosquitto, Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    broker, settings = broker_with_accounts
    url = f"mqtt://collector:collector-password@127.0.0.1:{broker.port}"
    simulator = Simulator(settings, url, lambda device_id: "wrong")

    async with running(simulator) as task:
        await asyncio.sleep(1.5)  # past the first retries (after 0.5 to 1 s)
        assert simulator.stats.connections_up == 0
        assert not task.done()

    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    # One line for the fleet, not one per device and retry.
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "cannot connect" in warnings[0].getMessage()


async def test_a_thousand_devices_connect_and_stop_cleanly(broker: Mosquitto) -> None:
    settings = channel_settings(simulator_devices=1000, simulator_interval_s=5.0)
    simulator = Simulator(settings, broker.url)

    started = time.monotonic()
    async with subscribed(broker, "iot/+/status") as client, running(simulator) as task:
        online = await wait_for_messages(client, 1000, 60.0)
        took = time.monotonic() - started
        assert {payload_of(m) for m in online} == {b"online"}
        assert len({device_of(m) for m in online}) == 1000
        assert broker_connections(broker.port) == 1000 + 1
        assert simulator.stats.connections_up == 1000
        assert not task.done()
    assert took < 30.0, took

    statuses = Counter((await retained(broker, "iot/+/status", 1000)).values())
    assert statuses == {b"offline": 1000}
