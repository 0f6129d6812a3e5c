"""The device simulator: many simulated devices publishing telemetry over a few MQTT connections.

Devices are grouped `simulator_devices_per_connection` to one connection. Each connection
keeps its devices' due times in a heap that a small pool of publishing coroutines works
through, so thousands of devices cost a few connections and a few dozen coroutines, not a task
or a socket each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import random
import ssl
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import orjson

from iotmeter.config import Settings, SimulatorKind
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.retry import Backoff
from iotmeter.simulator.signals import Signal, make_signal

logger = logging.getLogger(__name__)

PUBLISH_WINDOW = 32
"""Publishes one connection keeps in flight at most (QoS 1 waits for the broker's PUBACK)."""


def device_seed(device_id: str) -> int:
    """A stable seed for a device's random streams, derived from its id."""
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big")


def format_timestamp(at: datetime) -> str:
    """RFC 3339 in UTC with milliseconds: `2026-11-27T09:05:11.123Z`."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(eq=False)
class SimulatedDevice:
    """One simulated device: its signal, its message counter and its dropout stream."""

    device_id: str
    kind: SimulatorKind
    signal: Signal
    dropout_rate: float = 0.0
    dropout_rng: random.Random = field(default_factory=random.Random, repr=False)
    seq: int = 0
    """Sequence number of the next message; dropped messages use one up too (a visible gap)."""

    @property
    def topic(self) -> str:
        return f"iot/{self.device_id}/telemetry"

    def next_payload(self, at: datetime) -> bytes | None:
        """The next message's JSON, or None when this message is dropped."""
        metrics = self.signal.sample(at)
        seq = self.seq
        self.seq += 1
        if self.dropout_rng.random() < self.dropout_rate:
            return None
        message: dict[str, Any] = {
            "ts": format_timestamp(at),
            "seq": seq,
            # A uuid, not device-seq: seq restarts with the simulator, a msg_id must not repeat.
            "msg_id": str(uuid.uuid4()),
            "type": self.kind,
            "metrics": metrics,
        }
        if self.signal.anomaly is not None:
            message["anomaly"] = self.signal.anomaly
        return orjson.dumps(message)


def plan_devices(settings: Settings) -> list[SimulatedDevice]:
    """`simulator_devices` devices, kinds taken round-robin, ids `{prefix}-{kind}-{n:04d}`."""
    kinds = settings.simulator_kinds
    if settings.simulator_devices and not kinds:
        raise ValueError("simulator_kinds is empty: no kind of device to simulate")
    numbers: Counter[SimulatorKind] = Counter()
    devices = []
    for index in range(settings.simulator_devices):
        kind = kinds[index % len(kinds)]
        numbers[kind] += 1
        device_id = f"{settings.simulator_id_prefix}-{kind}-{numbers[kind]:04d}"
        seed = device_seed(device_id)
        devices.append(
            SimulatedDevice(
                device_id=device_id,
                kind=kind,
                signal=make_signal(
                    kind, random.Random(seed), spike_rate=settings.simulator_spike_rate
                ),
                dropout_rate=settings.simulator_dropout_rate,
                dropout_rng=random.Random(seed ^ 0x5EED),
            )
        )
    return devices


@dataclass
class SimulatorStats:
    """Counters of a running simulator (read them; the simulator writes them)."""

    published: int = 0
    """Messages the broker took (QoS 1: acknowledged; QoS 0: written to the socket)."""
    published_by_kind: Counter[str] = field(default_factory=Counter)
    dropouts: int = 0
    spikes: int = 0
    """Published messages that carry a spike."""
    connections_up: int = 0
    reconnects: int = 0


class Simulator:
    """Publishes telemetry for `simulator_devices` devices until cancelled."""

    def __init__(self, settings: Settings, broker_url: str) -> None:
        self.settings = settings
        self.broker = BrokerAddress.from_url(broker_url)
        self.devices = plan_devices(settings)
        self.stats = SimulatorStats()
        per_connection = settings.simulator_devices_per_connection
        self.groups: list[list[SimulatedDevice]] = [
            self.devices[start : start + per_connection]
            for start in range(0, len(self.devices), per_connection)
        ]
        # Unique per run, so that two simulators on one broker never take over each other's
        # sessions; stable across the reconnects of one connection.
        run_id = uuid.uuid4().hex[:8]
        self.client_ids = [
            f"{settings.simulator_id_prefix}-{run_id}-{index}" for index in range(len(self.groups))
        ]
        self._rng = random.Random()
        self._tls_context: ssl.SSLContext | None = None

    async def run(self) -> None:
        """Publish until cancelled; connections that drop reconnect with capped backoff."""
        if not self.groups:
            logger.info("simulator has no devices to simulate")
            await asyncio.Event().wait()
            return
        if self.broker.tls and self._tls_context is None:
            # Loading the system's CA certificates reads files: keep it off the event loop.
            self._tls_context = await asyncio.to_thread(ssl.create_default_context)
        logger.info(
            "simulating %d devices over %d connections to %s:%d (interval %.3g s, QoS %d)",
            len(self.devices),
            len(self.groups),
            self.broker.host,
            self.broker.port,
            self.settings.simulator_interval_s,
            self.settings.simulator_qos,
        )
        await _run_together(
            {
                f"simulator-connection-{index}": self._run_connection(index, devices)
                for index, devices in enumerate(self.groups)
            }
        )

    async def _run_connection(self, index: int, devices: Sequence[SimulatedDevice]) -> None:
        client_id = self.client_ids[index]
        # Quiet: the connection's own lines below say when it is lost and when it is back.
        backoff = Backoff(f"simulator connection {client_id}", initial=1.0, quiet=True)
        connected_before = False
        down_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            error: aiomqtt.MqttError | None = None
            was_up = False
            try:
                async with self._connect(client_id) as client:
                    was_up = True
                    self.stats.connections_up += 1
                    try:
                        if connected_before:
                            self.stats.reconnects += 1
                            outage = loop.time() - (down_since or loop.time())
                            logger.info(
                                "simulator connection %s reconnected after %.1f s",
                                client_id,
                                outage,
                            )
                        else:
                            logger.info(
                                "simulator connection %s connected (%d devices)",
                                client_id,
                                len(devices),
                            )
                        connected_before = True
                        down_since = None
                        backoff.succeeded()
                        await self._publish_until_disconnected(client, devices)
                    finally:
                        self.stats.connections_up -= 1
            except aiomqtt.MqttError as exc:
                error = exc
            if was_up:
                down_since = loop.time()
                logger.warning(
                    "simulator connection %s lost (%s); reconnecting with backoff", client_id, error
                )
            elif down_since is None:
                # Never connected yet, or the first failure after a loss was already logged.
                down_since = loop.time()
                logger.warning(
                    "simulator connection %s cannot reach %s:%d (%s); retrying with backoff",
                    client_id,
                    self.broker.host,
                    self.broker.port,
                    error,
                )
            await backoff.wait(error)

    @contextlib.asynccontextmanager
    async def _connect(self, client_id: str) -> AsyncIterator[aiomqtt.Client]:
        client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=self.broker.username,
            password=self.broker.password,
            identifier=client_id,
            tls_context=self._tls_context,
            max_inflight_messages=PUBLISH_WINDOW,
        )
        # aiomqtt warns above 10 pending calls; a full window is expected here.
        client.pending_calls_threshold = PUBLISH_WINDOW + 1
        # The connect runs partly in a worker thread that cancellation cannot stop; cancelling
        # the wait alone would leave a live connection behind. Let it finish, then close it.
        entering = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.shield(entering)
        except asyncio.CancelledError:
            with contextlib.suppress(aiomqtt.MqttError):
                await entering
                await client.__aexit__(None, None, None)
            raise
        try:
            yield client
        except BaseException as exc:
            await client.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        await client.__aexit__(None, None, None)

    async def _publish_until_disconnected(
        self, client: aiomqtt.Client, devices: Sequence[SimulatedDevice]
    ) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.simulator_interval_s
        # Spread first publishes over one interval (after every (re)connect), so that many
        # devices do not all publish at once.
        now = loop.time()
        schedule = [
            (now + self._rng.uniform(0.0, interval), position) for position in range(len(devices))
        ]
        heapq.heapify(schedule)
        workers = min(PUBLISH_WINDOW, len(devices))
        await _run_together(
            {
                "watch-disconnection": _watch_disconnection(client),
                **{
                    f"publisher-{number}": self._publish_worker(client, devices, schedule)
                    for number in range(workers)
                },
            }
        )

    async def _publish_worker(
        self,
        client: aiomqtt.Client,
        devices: Sequence[SimulatedDevice],
        schedule: list[tuple[float, int]],
    ) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.simulator_interval_s
        jitter = self.settings.simulator_jitter
        qos = self.settings.simulator_qos
        stats = self.stats
        rng = self._rng
        current_task = asyncio.current_task()
        assert current_task is not None
        while True:
            due, position = heapq.heappop(schedule)
            now = loop.time()
            if due < now - interval:
                # More than an interval late (overloaded): carry on from now, no catch-up burst.
                due = now
            next_due = due + interval * (1.0 + jitter * rng.uniform(-1.0, 1.0))
            heapq.heappush(schedule, (next_due, position))
            if due > now:
                await asyncio.sleep(due - now)
            device = devices[position]
            payload = device.next_payload(datetime.now(UTC))
            if payload is None:
                stats.dropouts += 1
                continue
            await client.publish(device.topic, payload, qos=qos)
            if current_task.cancelling():
                # On Python 3.11, asyncio.wait_for (inside aiomqtt's publish) returns normally
                # when the acknowledgement and a cancellation arrive together, swallowing the
                # cancellation (CPython gh-86296); without this check we would never stop.
                raise asyncio.CancelledError
            stats.published += 1
            stats.published_by_kind[device.kind] += 1
            if device.signal.anomaly is not None:
                stats.spikes += 1


async def _watch_disconnection(client: aiomqtt.Client) -> None:
    """Raise `MqttError` as soon as the connection drops, even while no publish is pending."""
    # Nothing is subscribed, so the iterator yields nothing and only ends on disconnection.
    async for _message in client.messages:
        pass
    raise aiomqtt.MqttError("message iteration ended")


async def _run_together(coroutines: Mapping[str, Coroutine[Any, Any, None]]) -> None:
    """Run tasks until one fails (raise its error as is) or we are cancelled; then stop the rest.

    Not `asyncio.TaskGroup`: on Python 3.11 a child failing while the group waits to exit leaves
    the parent task marked as cancelling for good (CPython gh-116720), and an error from any
    child would arrive wrapped in an ExceptionGroup while all we want is to reconnect.
    """
    tasks = [asyncio.create_task(coroutine, name=name) for name, coroutine in coroutines.items()]
    first_error: BaseException | None = None
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled():
                first_error = task.exception()
                if first_error is not None:
                    raise first_error
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if (
                isinstance(result, Exception)
                and result is not first_error
                and not isinstance(result, aiomqtt.MqttError)
            ):
                logger.error("simulator task %s failed", task.get_name(), exc_info=result)


async def run_simulator(settings: Settings, broker_url: str) -> None:
    """Run a simulator with these settings against `broker_url` until cancelled."""
    await Simulator(settings, broker_url).run()
