"""The device simulator: simulated devices publishing telemetry over MQTT, connected two ways.

- The device channel (`simulator_device_channel`, the default; always when devices authenticate):
  each device has its own connection, as a real one would. Client id and username are its id, a
  last will says `offline` on `iot/{id}/status`, and it applies the configuration iotmeter pushes
  to `iot/{id}/config` and reports it. A device costs a socket and a few small tasks, so a
  thousand per process are fine; connections open a few at a time, so that a thousand devices
  do not all knock on the broker in the same millisecond.
- Grouped: devices share `simulator_devices_per_connection` to one connection and only publish
  telemetry. Each connection keeps its devices' due times in a heap that a small pool of
  publishing coroutines works through, so thousands of devices cost a few connections and a few
  dozen coroutines, not a task or a socket each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import heapq
import logging
import random
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import orjson

from iotmeter.config import Settings, SimulatorKind
from iotmeter.devicelink.acl import config_topic, reported_topic, status_topic, telemetry_topic
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.retry import Backoff
from iotmeter.simulator.channel import ConfigRefused, DeviceChannelState, parse_config_message
from iotmeter.simulator.signals import Signal, make_signal

logger = logging.getLogger(__name__)

PUBLISH_WINDOW = 32
"""Publishes one connection keeps in flight at most (QoS 1 waits for the broker's PUBACK)."""
CONNECT_CONCURRENCY = 16
"""Connections being opened at once. Each holds a worker of the default executor (aiomqtt's
blocking connect) until the broker's CONNACK; more at once would only queue for the executor
that the rest of the process shares, and knock on the broker all together."""
OFFLINE_TIMEOUT_S = 0.5
"""How long a device stopping cleanly waits for the broker to take its `offline` status."""


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
    configs_applied: int = 0
    """Configuration messages a device applied (device channel)."""
    configs_refused: int = 0
    """Configuration messages a device refused as malformed (device channel)."""


class Simulator:
    """Publishes telemetry for `simulator_devices` devices until cancelled.

    With `password_for` (device authentication), every device connects on its own channel
    with its id and `password_for(id)`, whatever `simulator_device_channel` says.
    """

    def __init__(
        self,
        settings: Settings,
        broker_url: str,
        password_for: Callable[[str], str] | None = None,
    ) -> None:
        self.settings = settings
        self.broker = BrokerAddress.from_url(broker_url)
        self.devices = plan_devices(settings)
        self.stats = SimulatorStats()
        self.password_for = password_for
        self.device_channel = settings.simulator_device_channel or password_for is not None
        self._rng = random.Random()
        self._tls_context: ssl.SSLContext | None = None
        self._connect_slots = asyncio.Semaphore(CONNECT_CONCURRENCY)
        self.channels: dict[str, DeviceChannel] = {}
        """Device channels by device id (device channel on), for their `state`."""
        self.groups: list[list[SimulatedDevice]] = []
        """Devices by shared connection (device channel off)."""
        if self.device_channel:
            fleet = _FleetLog(len(self.devices), self.stats)
            self.channels = {
                device.device_id: DeviceChannel(
                    device,
                    settings,
                    self.stats,
                    connect=functools.partial(self._connect_device, device.device_id),
                    fleet=fleet,
                    rng=self._rng,
                )
                for device in self.devices
            }
        else:
            per_connection = settings.simulator_devices_per_connection
            self.groups = [
                self.devices[start : start + per_connection]
                for start in range(0, len(self.devices), per_connection)
            ]
        # Unique per run, so that two simulators on one broker never take over each other's
        # sessions; stable across the reconnects of one connection.
        run_id = uuid.uuid4().hex[:8]
        self.client_ids = [
            f"{settings.simulator_id_prefix}-{run_id}-{index}" for index in range(len(self.groups))
        ]

    async def run(self) -> None:
        """Publish until cancelled; connections that drop reconnect with capped backoff."""
        if not self.devices:
            logger.info("simulator has no devices to simulate")
            await asyncio.Event().wait()
            return
        if self.broker.tls and self._tls_context is None:
            # Loading the system's CA certificates reads files: keep it off the event loop.
            ca_file = self.settings.mqtt_ca_file
            self._tls_context = await asyncio.to_thread(
                ssl.create_default_context, cafile=str(ca_file) if ca_file else None
            )
        if self.device_channel:
            _warn_if_short_of_files(len(self.devices))
            logger.info(
                "simulating %d devices, each on its own connection to %s:%d (interval %.3g s, "
                "QoS %d, %s)",
                len(self.devices),
                self.broker.host,
                self.broker.port,
                self.settings.simulator_interval_s,
                self.settings.simulator_qos,
                "device credentials" if self.password_for is not None else "no device credentials",
            )
            await _run_together(
                {
                    f"simulated-device-{device_id}": channel.run()
                    for device_id, channel in self.channels.items()
                }
            )
            return
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
                async with self._connect(self._shared_client(client_id)) as client:
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

    def _shared_client(self, client_id: str) -> aiomqtt.Client:
        """A client for a connection that a group of devices shares."""
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
        return client

    def _device_client(self, device_id: str) -> aiomqtt.Client:
        """A client for one device's own connection, with its will."""
        username: str | None
        password: str | None
        if self.password_for is not None:
            # Device authentication: the device's own account, never the URL's.
            username, password = device_id, self.password_for(device_id)
        elif self.broker.username is not None:
            # No device accounts, but the broker wants the URL's account.
            username, password = self.broker.username, self.broker.password
        else:
            username, password = device_id, None
        return aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=username,
            password=password,
            identifier=device_id,
            tls_context=self._tls_context,
            will=aiomqtt.Will(status_topic(device_id), b"offline", qos=1, retain=True),
        )

    def _connect_device(self, device_id: str) -> AbstractAsyncContextManager[aiomqtt.Client]:
        return self._connect(self._device_client(device_id))

    @contextlib.asynccontextmanager
    async def _connect(self, client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Client]:
        async with self._connect_slots:
            # The connect runs partly in a worker thread that cancellation cannot stop;
            # cancelling the wait alone would leave a live connection behind. Let it finish,
            # then close it.
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
            _raise_if_cancelling()
            stats.published += 1
            stats.published_by_kind[device.kind] += 1
            if device.signal.anomaly is not None:
                stats.spikes += 1


class DeviceChannel:
    """One simulated device on its own connection: its status, its configuration, its telemetry."""

    def __init__(
        self,
        device: SimulatedDevice,
        settings: Settings,
        stats: SimulatorStats,
        *,
        connect: Callable[[], AbstractAsyncContextManager[aiomqtt.Client]],
        fleet: _FleetLog,
        rng: random.Random,
    ) -> None:
        self.device = device
        self.state = DeviceChannelState(default_interval_s=settings.simulator_interval_s)
        self._settings = settings
        self._stats = stats
        self._connect = connect
        self._fleet = fleet
        self._rng = rng
        self._config_changed = asyncio.Event()
        self._last_refused: bytes | None = None
        """Digest of the configuration message refused last (to say so once, not per delivery)."""

    async def run(self) -> None:
        """Stay connected until cancelled; a connection that drops reconnects with backoff."""
        device_id = self.device.device_id
        # Quiet: the fleet log says when connections are lost and when all are back.
        backoff = Backoff(f"simulated device {device_id}", initial=1.0, quiet=True)
        connected_before = False
        while True:
            error: aiomqtt.MqttError | None = None
            was_up = False
            try:
                async with self._connect() as client:
                    was_up = True
                    self._stats.connections_up += 1
                    try:
                        if connected_before:
                            self._stats.reconnects += 1
                        connected_before = True
                        self._fleet.connected(device_id)
                        backoff.succeeded()
                        await self._serve(client)
                    finally:
                        self._stats.connections_up -= 1
            except aiomqtt.MqttError as exc:
                error = exc
            self._fleet.failed(device_id, error, lost=was_up)
            await backoff.wait(error)

    async def _serve(self, client: aiomqtt.Client) -> None:
        device_id = self.device.device_id
        status = status_topic(device_id)
        reports = _LatestReport()
        try:
            # Reading messages is also what notices a lost connection, so it runs from the
            # start and never waits on the broker: a publish waiting for an acknowledgement
            # that will never come would otherwise hold the device until aiomqtt's timeout.
            await _run_together(
                {
                    f"device-{device_id}-configs": self._take_configs(client, reports),
                    f"device-{device_id}-work": self._work(client, reports),
                }
            )
        except asyncio.CancelledError:
            # A clean stop. Say `offline` before the DISCONNECT, which cancels the will.
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(
                    status, b"offline", qos=1, retain=True, timeout=OFFLINE_TIMEOUT_S
                )
            raise

    async def _work(self, client: aiomqtt.Client, reports: _LatestReport) -> None:
        """Say `online`, ask for the configuration, then report it and publish telemetry."""
        device_id = self.device.device_id
        await client.publish(status_topic(device_id), b"online", qos=1, retain=True)
        _raise_if_cancelling()
        await client.subscribe(config_topic(device_id), qos=1)
        _raise_if_cancelling()
        await _run_together(
            {
                f"device-{device_id}-reports": self._send_reports(client, reports),
                f"device-{device_id}-telemetry": self._publish_telemetry(client),
            }
        )

    async def _take_configs(self, client: aiomqtt.Client, reports: _LatestReport) -> None:
        """Apply each configuration message, leave its report to send; MqttError when the
        connection drops."""
        topic = config_topic(self.device.device_id)
        async for message in client.messages:
            if message.topic.value != topic or not isinstance(message.payload, bytes):
                continue
            report = self._take_config(message.payload)
            if report is not None:
                reports.put(report)
        raise aiomqtt.MqttError("message iteration ended")

    async def _send_reports(self, client: aiomqtt.Client, reports: _LatestReport) -> None:
        topic = reported_topic(self.device.device_id)
        while True:
            report = await reports.take()
            await client.publish(topic, report, qos=1, retain=True)
            _raise_if_cancelling()

    def _take_config(self, payload: bytes) -> bytes | None:
        """Apply one configuration message; the report to publish, or None."""
        device_id = self.device.device_id
        if not payload:
            logger.debug("simulated device %s: configuration cleared; keeping its own", device_id)
            return None
        try:
            desired = parse_config_message(payload)
        except ConfigRefused as exc:
            self._stats.configs_refused += 1
            digest = hashlib.sha256(payload).digest()
            # A retained message comes again with every reconnect: say it once.
            repeated = digest == self._last_refused
            self._last_refused = digest
            logger.log(
                logging.DEBUG if repeated else logging.WARNING,
                "simulated device %s refused a configuration message (%s); it keeps version %s",
                device_id,
                exc,
                self.state.config_version,
            )
            return None
        self.state.apply(desired)
        self._config_changed.set()
        self._stats.configs_applied += 1
        logger.debug(
            "simulated device %s applied configuration version %d (interval %.3g s, %s)",
            device_id,
            desired.version,
            self.state.interval_s,
            "enabled" if self.state.enabled else "disabled",
        )
        return desired.report()

    async def _publish_telemetry(self, client: aiomqtt.Client) -> None:
        loop = asyncio.get_running_loop()
        device = self.device
        state = self.state
        stats = self._stats
        rng = self._rng
        jitter = self._settings.simulator_jitter
        qos = self._settings.simulator_qos
        topic = telemetry_topic(device.device_id)
        # Where the message before the first would have been: first messages spread over one
        # interval after every (re)connect, so that many devices do not all publish at once.
        previous = loop.time() - rng.uniform(0.0, state.interval_s)
        while True:
            self._config_changed.clear()
            if not state.enabled:
                await self._config_changed.wait()
                previous = loop.time() - rng.uniform(0.0, state.interval_s)
                continue
            interval = state.interval_s
            due = previous + interval * (1.0 + jitter * rng.uniform(-1.0, 1.0))
            now = loop.time()
            if due < now - interval:
                # More than an interval late (overloaded): carry on from now, no catch-up burst.
                due = now
            if due > now and await _set_within(self._config_changed, due - now):
                # A new configuration: schedule again from the previous message.
                continue
            if not state.enabled:
                continue
            previous = due
            payload = device.next_payload(datetime.now(UTC))
            if payload is None:
                stats.dropouts += 1
                continue
            await client.publish(topic, payload, qos=qos)
            _raise_if_cancelling()
            stats.published += 1
            stats.published_by_kind[device.kind] += 1
            if device.signal.anomaly is not None:
                stats.spikes += 1


class _LatestReport:
    """The configuration report still to send. Reports are retained, so only the last counts:
    a newer one replaces one not sent yet."""

    def __init__(self) -> None:
        self._report: bytes | None = None
        self._put = asyncio.Event()

    def put(self, report: bytes) -> None:
        self._report = report
        self._put.set()

    async def take(self) -> bytes:
        while self._report is None:
            self._put.clear()
            await self._put.wait()
        report, self._report = self._report, None
        return report


class _FleetLog:
    """The connection news of many devices in a few lines: a thousand devices losing the broker
    together log one warning and one recovery, not two thousand lines."""

    def __init__(self, devices: int, stats: SimulatorStats) -> None:
        self._devices = devices
        self._stats = stats
        self._all_up_before = False
        self._trouble_since: float | None = None
        """Monotonic time of the first failure since every device was last up."""

    def connected(self, device_id: str) -> None:
        """Call after counting the connection in `stats.connections_up`."""
        logger.debug("simulated device %s connected", device_id)
        if self._stats.connections_up < self._devices:
            return
        if self._all_up_before and self._trouble_since is not None:
            logger.info(
                "all %d simulated devices reconnected after %.1f s",
                self._devices,
                time.monotonic() - self._trouble_since,
            )
        elif not self._all_up_before:
            logger.info("all %d simulated devices connected", self._devices)
        self._all_up_before = True
        self._trouble_since = None

    def failed(self, device_id: str, error: aiomqtt.MqttError | None, *, lost: bool) -> None:
        what = "lost its connection" if lost else "cannot connect"
        if self._trouble_since is not None:
            logger.debug("simulated device %s %s (%s)", device_id, what, error)
            return
        self._trouble_since = time.monotonic()
        logger.warning(
            "simulated device %s %s (%s); %d of %d devices connected, all retry with backoff "
            "(more of this at debug level until every device is connected)",
            device_id,
            what,
            error,
            self._stats.connections_up,
            self._devices,
        )


def _warn_if_short_of_files(connections: int) -> None:
    """Each connection is a file descriptor; say so before the connects fail one by one."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft_limit, _hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit != resource.RLIM_INFINITY and soft_limit < connections + 256:
        logger.warning(
            "%d simulated devices need as many open files, but this process may open %d: "
            "raise the limit (`ulimit -n`, systemd `LimitNOFILE=`) or simulate fewer devices",
            connections,
            soft_limit,
        )


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    """Wait for `event` at most `seconds`; whether it was set."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _raise_if_cancelling() -> None:
    """Call after each aiomqtt call that waits for the broker.

    On Python 3.11, asyncio.wait_for (inside aiomqtt's calls) returns normally when the answer
    and a cancellation arrive together, swallowing the cancellation (CPython gh-86296); without
    this check a loop would never stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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


async def run_simulator(
    settings: Settings, broker_url: str, password_for: Callable[[str], str] | None = None
) -> None:
    """Run a simulator with these settings against `broker_url` until cancelled."""
    await Simulator(settings, broker_url, password_for).run()
