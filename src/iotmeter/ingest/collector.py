"""The MQTT collector: receive, spool durably, acknowledge, then drain to every sink.

A QoS 1 message is acknowledged to the broker (PUBACK) only after it is fsync'd in the local
spool. aiomqtt 2.x acknowledges as soon as a message reaches its queue, so the collector turns on
paho's manual acknowledgement underneath it (see `_enable_manual_ack`) and acks after each group
commit. Three sinks drain the spool independently, each from its own confirmed position, with
retries and capped backoff: the registry (devices, last_seen, dead letters), the time-series
store and the archive. One slow or failing sink never holds up the others; the spool frees space
only once all of them have confirmed it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt

from iotmeter.config import Settings, env_name
from iotmeter.db.engine import Database
from iotmeter.errors import BackendUnavailable
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.ingest.decode import DecodeLimits, decode_message, device_id_from_topic
from iotmeter.ingest.models import ReadingSet, Rejection, RejectReason
from iotmeter.ingest.spool import Chunk, Spool
from iotmeter.ingest.stats import IngestStats
from iotmeter.repositories.dead_letters import DeadLetterRepository
from iotmeter.repositories.devices import DeviceRepository
from iotmeter.storage.archive.segments import LayeredArchive, build_segment, segment_line
from iotmeter.storage.timeseries.base import TimeSeriesStore

logger = logging.getLogger(__name__)

TOPIC_FILTER = "iot/+/telemetry"
MAX_BACKOFF_S = 30.0
UNKNOWN_TYPE = "unknown"
SINKS = ("registry", "timeseries", "archive")


class ManualAckUnsupported(RuntimeError):
    """The installed aiomqtt no longer exposes what manual acknowledgement needs."""


def _enable_manual_ack(client: aiomqtt.Client) -> Any:
    """Switch paho (under aiomqtt) to manual PUBACKs; returns the paho client for `ack()`.

    aiomqtt 2.x keeps its paho client in `_client` and does not expose `manual_ack`; a test
    (tests/integration/test_manual_ack.py) fails if a release changes either.
    """
    paho = getattr(client, "_client", None)
    if paho is None or not hasattr(paho, "manual_ack_set") or not hasattr(paho, "ack"):
        raise ManualAckUnsupported(
            "this aiomqtt version hides paho's manual acknowledgement; without it iotmeter "
            "cannot ack only what is durable: pin aiomqtt<3 or update iotmeter"
        )
    paho.manual_ack_set(True)
    return paho


_READ_SIZE = 256 * 1024


class _BufferedSocket:
    """A paho socket that reads in large blocks.

    paho reads each packet with three or more `recv()` calls (the type byte, each byte of the
    length, then the body), and aiomqtt's reader callback handles one packet per wake-up. With
    this wrapper one `recv()` brings in hundreds of messages, and `pending()` (which aiomqtt
    checks, as for TLS sockets) keeps its callback reading until the block is used up. Everything
    else is the socket's own.
    """

    __slots__ = ("_buffer", "_offset", "_sock", "paused")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._offset = 0
        self.paused = False
        """Set while the collector holds its intake: what is buffered is still handed out,
        but nothing more is read, so the reader callback returns (its loop would otherwise
        go on for as long as the broker keeps sending)."""

    def recv(self, size: int) -> bytes:
        if self._offset >= len(self._buffer):
            if self.paused:
                raise BlockingIOError
            data = self._sock.recv(max(size, _READ_SIZE))
            if len(data) <= size:
                return data
            self._buffer, self._offset = data, 0
        start = self._offset
        self._offset = min(start + size, len(self._buffer))
        return self._buffer[start : self._offset]

    def pending(self) -> int:
        return len(self._buffer) - self._offset

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _NoFilteredCallbacks:
    """paho matches every message's topic against per-topic callbacks; aiomqtt registers
    none, so the (trie) match is work for nothing."""

    def iter_match(self, _topic: str) -> Iterator[Any]:
        return iter(())


def _tune_paho(paho: Any) -> None:
    """Cheaper reception for the connection just opened (see the two classes above)."""
    if hasattr(paho, "_on_message_filtered"):
        paho._on_message_filtered = _NoFilteredCallbacks()
    paho_logger = getattr(paho, "_logger", None)
    if isinstance(paho_logger, logging.Logger) and not paho_logger.isEnabledFor(logging.DEBUG):
        # paho formats a debug line for every packet (aiomqtt hands it its logger); below
        # DEBUG nobody reads them. Warnings and errors are logged by aiomqtt and by us.
        paho.disable_logger()
    sock = getattr(paho, "_sock", None)
    if type(sock) is socket.socket:  # not TLS: an SSL socket buffers by itself
        paho._sock = _BufferedSocket(sock)


def _from_epoch_us(epoch_us: int) -> datetime:
    return datetime.fromtimestamp(epoch_us / 1_000_000, UTC)


class Backoff:
    """Capped exponential backoff that logs a state change once, not every retry."""

    def __init__(self, what: str, initial: float = 0.5, cap: float = MAX_BACKOFF_S) -> None:
        self.what = what
        self.initial = initial
        self.cap = cap
        self.delay = initial
        self.failing_since: float | None = None

    def failed(self, exc: BaseException, retry_after: float | None = None) -> float:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            logger.warning("%s failing, retrying until it works: %s", self.what, exc)
        else:
            logger.debug("%s still failing: %s", self.what, exc)
        wait = self.delay if retry_after is None else max(retry_after, 0.05)
        self.delay = min(self.delay * 2, self.cap)
        return wait

    def succeeded(self) -> None:
        if self.failing_since is not None:
            logger.warning(
                "%s recovered after %.1f s", self.what, time.monotonic() - self.failing_since
            )
        self.failing_since = None
        self.delay = self.initial


@dataclass(frozen=True, slots=True)
class Decoded:
    readings: list[ReadingSet]
    rejections: list[Rejection]


class DeviceDirectory:
    """The registry's view for the sinks: each device's registered type (cached)."""

    def __init__(self, database: Database, auto_register: bool) -> None:
        self.database = database
        self.auto_register = auto_register
        self.types: dict[str, str] = {}

    async def resolve(
        self, readings: Sequence[ReadingSet], *, retype: bool = True
    ) -> list[ReadingSet]:
        """Readings with the registry's type (with `retype`); without those of unregistered
        devices when auto-registration is off (the registry sink dead-letters them)."""
        if self.auto_register and not retype:
            return list(readings)
        missing = {r.device_id for r in readings if r.device_id not in self.types}
        if missing:
            try:
                async with self.database.transaction() as session:
                    self.types.update(await DeviceRepository(session).types_of(missing))
            except Exception as exc:
                if not self.auto_register:
                    raise BackendUnavailable(f"registry lookup failed: {exc}") from exc
                # The type only labels the series; the device's own type is the best guess.
        result = []
        for reading in readings:
            registered = self.types.get(reading.device_id)
            if registered is None:
                if not self.auto_register:
                    continue
                # Not registered yet: the registry sink will register it with the type of its
                # first reading, as seen here in the same spool order.
                registered = self.types[reading.device_id] = reading.device_type or UNKNOWN_TYPE
            result.append(
                reading
                if not retype or reading.device_type == registered
                else replace(reading, device_type=registered)
            )
        return result


class _Epoch:
    """The open segments of the segment layout: per device, (reading time, line) pairs."""

    def __init__(self) -> None:
        self.lines: dict[str, list[tuple[int, bytes]]] = {}
        self.size = 0
        self.started = time.monotonic()
        self._seen: set[tuple[str, int, str]] = set()

    def add(self, readings: Sequence[ReadingSet]) -> None:
        if not self.lines:
            self.started = time.monotonic()
        for reading in readings:
            # A message the broker redelivered within the epoch is written once.
            identity = reading.identity
            if identity in self._seen:
                continue
            self._seen.add(identity)
            line = segment_line(reading)
            self.lines.setdefault(reading.device_id, []).append((reading.epoch_us, line))
            self.size += len(line)


class Collector:
    """Long-running task: `run()` until cancelled; survives broker and store outages."""

    def __init__(
        self,
        settings: Settings,
        broker: BrokerAddress,
        database: Database,
        timeseries: TimeSeriesStore,
        archive: LayeredArchive,
        stats: IngestStats,
        spool: Spool,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.database = database
        self.timeseries = timeseries
        self.archive = archive
        self.stats = stats
        self.spool = spool
        self.limits = DecodeLimits.from_settings(settings)
        self.directory = DeviceDirectory(database, settings.auto_register)
        self.connected = False
        self.last_error: str | None = None
        self.spool_full_since: float | None = None
        self._paho: Any = None
        self._client: aiomqtt.Client | None = None
        # Delivered while there was no room: (topic, payload, qos, mid), admitted in order.
        self._waiting: deque[tuple[str, bytes, int, int]] = deque()
        self._hold_task: asyncio.Task[None] | None = None
        self._admit_task: asyncio.Task[None] | None = None
        self._since_sink_check = 0
        self._catching_up: set[str] = set()
        self._generation = 0
        self._unacked: list[tuple[int, int]] = []
        self._work = asyncio.Event()
        self._committed = asyncio.Event()
        self.sink_errors: dict[str, str | None] = dict.fromkeys(SINKS)
        # The segment layout's archive sink takes records into its open epoch long before it
        # confirms them (once per epoch): how far it has taken them.
        self._epoch_taken: int | None = None
        self.intake_held_s = 0.0
        self._sink_progress = asyncio.Event()

    # --- observing -----------------------------------------------------------------------------

    async def health(self) -> str:
        """For `/ready`: up while subscribed and the spool has room."""
        if not self.connected:
            raise BackendUnavailable(
                f"not connected to the {self.broker.describe()}: {self.last_error or 'connecting'}"
            )
        if self.spool_full_since is not None:
            raise BackendUnavailable(
                f"spool full for {time.monotonic() - self.spool_full_since:.0f} s "
                f"({self.spool.disk_bytes} bytes, {env_name('spool_max_bytes')}): not acking, "
                "the broker holds the backlog until the sinks catch up"
            )
        return f"subscribed to {TOPIC_FILTER} on the {self.broker.describe()}"

    async def spool_health(self) -> str:
        """For `/ready`: the spool and the sinks draining it."""
        failing = {name: error for name, error in self.sink_errors.items() if error}
        lag = self.spool.lag()
        detail = f"depth {self.spool.depth()}, lag {lag}"
        if failing:
            raise BackendUnavailable(f"sink(s) failing, retrying: {failing}; {detail}")
        return detail

    # --- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._receive_loop(), name="collector-receive")
            group.create_task(self._commit_loop(), name="collector-commit")
            group.create_task(self._drain("registry", self._store_registry))
            group.create_task(self._drain("timeseries", self._store_timeseries))
            if self.settings.archive_layout == "segment":
                group.create_task(self._drain_segments())
            else:
                group.create_task(self._drain("archive", self._store_archive))

    async def _receive_loop(self) -> None:
        backoff = Backoff(f"MQTT connection to the {self.broker.describe()}")
        while True:
            client = aiomqtt.Client(
                self.broker.host,
                self.broker.port,
                username=self.broker.username,
                password=self.broker.password,
                identifier=self.settings.mqtt_client_id,
                clean_session=False,
                # A connection that died without a FIN is noticed within ~1.5 keepalives.
                keepalive=10,
                timeout=10,
                tls_context=ssl.create_default_context() if self.broker.tls else None,
            )
            # Before connecting: a persistent session gets its queued messages right away.
            paho = _enable_manual_ack(client)
            # Messages go straight from paho's (public) callback into the spool: aiomqtt's
            # Message objects, its queue and its iterator's task per message cost more than
            # the rest of the intake. aiomqtt still owns the connection and its loss.
            paho.on_message = self._on_paho_message
            try:
                async with client:
                    _tune_paho(paho)
                    self._generation += 1
                    self._paho = paho
                    self._client = client
                    await client.subscribe(TOPIC_FILTER, qos=1)
                    self.connected = True
                    self.last_error = None
                    backoff.succeeded()
                    logger.info("collector subscribed to %s", TOPIC_FILTER)
                    async for _message in client.messages:
                        pass  # never yields: it raises when the connection is lost
            except aiomqtt.MqttError as exc:
                self.connected = False
                self._paho = None
                self._client = None
                self._waiting.clear()  # not acked: the broker sends them again
                self.last_error = str(exc)
                await asyncio.sleep(backoff.failed(exc))

    def _on_paho_message(self, _paho: Any, _userdata: Any, message: Any) -> None:
        """paho's on_message, on the event loop (aiomqtt runs paho's reads there)."""
        try:
            topic: str = message.topic
        except UnicodeDecodeError:
            # Brokers refuse such topics; if one came, the decoder dead-letters it.
            topic = bytes(getattr(message, "_topic", b"")).decode("utf-8", "replace")
        payload = message.payload
        if not isinstance(payload, bytes):
            payload = bytes(payload)
        self._since_sink_check += 1
        if self._since_sink_check >= 64:
            self._since_sink_check = 0
            if self._sinks_behind():
                self._request_hold()
        if self._waiting or not self._room_for_more():
            # Kept (unacked, in order) until there is room; the broker's in-flight window
            # bounds how many. Reading goes on, so keepalive replies are still seen.
            self._waiting.append((topic, payload, message.qos, message.mid))
            if self._admit_task is None or self._admit_task.done():
                self._admit_task = asyncio.get_running_loop().create_task(
                    self._admit_waiting(), name="collector-admit-waiting"
                )
            return
        self._admit(topic, payload, message.qos, message.mid)

    def _sinks_behind(self) -> bool:
        """Whether a working sink has fallen behind the intake.

        Taking messages faster than the sinks store them only moves the backlog from the broker
        into the spool, and once a sink has to read it back from disk (and decode it again)
        every message costs more: on one core, intake would starve the sinks. A failing sink
        does not count, nor one catching up after a failure: the spool is there to hold an
        outage's backlog, which the broker may not (its queue is bounded).
        """
        head = self.spool.committed_seq + self.spool.pending
        limit = 4 * self.settings.batch_max_messages
        window = self.spool.memory_first_seq
        behind = False
        for sink, confirmed in self.spool.confirmed.items():
            taken = confirmed
            if sink == "archive" and self._epoch_taken is not None:
                taken = self._epoch_taken
            if sink in self._catching_up:
                if self.sink_errors[sink] is None and taken + 1 >= window:
                    self._catching_up.discard(sink)  # back within memory: caught up
            elif head - taken > limit:
                behind = True
        return behind

    def _request_hold(self) -> None:
        sock = getattr(self._paho, "_sock", None)
        if isinstance(sock, _BufferedSocket):
            sock.paused = True
        if self._hold_task is None or self._hold_task.done():
            self._hold_task = asyncio.get_running_loop().create_task(
                self._hold_intake(), name="collector-hold-intake"
            )

    async def _hold_intake(self) -> None:
        """Stop reading the broker's socket while a working sink lags; the broker keeps what
        waits. At most a second at a time: keepalive replies must still be read."""
        paho, client = self._paho, self._client
        sock = getattr(paho, "_sock", None)
        disconnected = getattr(client, "_disconnected", None)
        if paho is None or sock is None or not isinstance(disconnected, asyncio.Future):
            if isinstance(sock, _BufferedSocket):
                sock.paused = False
            return
        fd = sock.fileno()
        loop = asyncio.get_running_loop()

        def read() -> None:
            # What aiomqtt's own reader does (aiomqtt/client.py `_on_socket_open`).
            try:
                while True:
                    paho.loop_read()
                    current = paho._sock
                    if current is not None and getattr(current, "pending", lambda: 0)() > 0:
                        continue
                    break
            except Exception as exc:
                if not disconnected.done():
                    disconnected.set_exception(exc)

        started = time.monotonic()
        loop.remove_reader(fd)
        try:
            async with asyncio.timeout(1.0):
                while self._sinks_behind():
                    self._sink_progress.clear()
                    await self._sink_progress.wait()
        except TimeoutError:
            pass
        finally:
            if isinstance(sock, _BufferedSocket):
                sock.paused = False
            if paho._sock is sock and sock.fileno() >= 0:
                loop.add_reader(fd, read)
            self.intake_held_s += time.monotonic() - started

    async def _admit_waiting(self) -> None:
        """Admit what was kept for want of room, in order, as room comes (until it is all in:
        nothing may wait for a next delivery that might never come)."""
        while self._waiting and self._paho is not None:
            if not self._room_for_more():
                await self._wait_for_room()
                continue
            self._admit(*self._waiting.popleft())

    def _room_for_more(self) -> bool:
        return (
            len(self._unacked) < self.settings.mqtt_max_inflight
            and not self.spool.full
            and self.spool_full_since is None
        )

    async def _wait_for_room(self) -> None:
        while self.spool.full:
            if self.spool_full_since is None:
                self.spool_full_since = time.monotonic()
                logger.error(
                    "spool full (%d bytes, %s): not acking; the broker keeps the backlog",
                    self.spool.disk_bytes,
                    env_name("spool_max_bytes"),
                )
            await asyncio.sleep(0.2)
        if self.spool_full_since is not None:
            logger.warning(
                "spool has room again after %.0f s; acking resumes",
                time.monotonic() - self.spool_full_since,
            )
            self.spool_full_since = None
        # Back-pressure on a broker that sends without limit: wait for the next commit.
        while len(self._unacked) >= self.settings.mqtt_max_inflight:
            self._committed.clear()
            self._work.set()
            await self._committed.wait()

    def _admit(self, topic: str, payload: bytes, qos: int, mid: int) -> None:
        self.spool.append(topic, payload, time.time_ns() // 1000)
        if qos > 0:
            self._unacked.append((self._generation, mid))
        self.stats.message_received(device_id_from_topic(topic))
        self._work.set()

    async def _commit_loop(self) -> None:
        """Group commit: fsync what arrived, then ack it (on the connection it came on)."""
        interval = self.settings.spool_commit_interval_s
        while True:
            await self._work.wait()
            await asyncio.sleep(interval)
            self._work.clear()
            acks, self._unacked = self._unacked, []
            await self.spool.commit()
            paho = self._paho
            if paho is None or not paho.is_connected():
                # The connection is gone: the broker redelivers these on the next one.
                self._committed.set()
                continue
            for generation, mid in acks:
                # A message from an earlier connection is redelivered by the broker instead.
                if generation == self._generation:
                    paho.ack(mid, 1)
            self._committed.set()

    # --- draining ------------------------------------------------------------------------------

    def _decoded(self, chunk: Chunk) -> Decoded:
        """The chunk's readings, decoded once for all sinks and forgotten by the chunk after
        the last of them took it (so memory holds raw records, not decoded ones)."""
        uses = chunk.cache.get("uses", 0)
        assert isinstance(uses, int)
        chunk.cache["uses"] = uses + 1
        if uses + 1 >= len(SINKS):
            cached = chunk.cache.pop("decoded", None)
        else:
            cached = chunk.cache.get("decoded")
        if isinstance(cached, Decoded):
            return cached
        readings: list[ReadingSet] = []
        rejections: list[Rejection] = []
        for record in chunk.records:
            result = decode_message(
                record.payload, record.topic, record.received_at_us, self.limits
            )
            readings.extend(result.readings)
            rejections.extend(result.rejections)
        decoded = Decoded(readings, rejections)
        if uses + 1 < len(SINKS):
            chunk.cache["decoded"] = decoded
        return decoded

    async def _drain(self, sink: str, store: Callable[[list[Decoded]], Awaitable[None]]) -> None:
        position = self.spool.confirmed[sink]
        batch_max = self.settings.batch_max_messages
        while True:
            await self.spool.wait_beyond(position, within=1.0)
            if self.spool.committed_seq <= position:
                continue
            # A full batch goes at once; a partial one waits at most batch_max_delay_s to fill.
            await self.spool.wait_beyond(
                position + batch_max - 1, within=self.settings.batch_max_delay_s
            )
            chunks = await self.spool.read(position, batch_max)
            if not chunks:
                continue
            decoded = [self._decoded(chunk) for chunk in chunks]
            await self._retry_until_done(sink, functools.partial(store, decoded))
            position = chunks[-1].last_seq
            await self.spool.confirm(sink, position)
            self._sink_progress.set()

    async def _retry_until_done(self, sink: str, action: Callable[[], Awaitable[None]]) -> None:
        backoff = Backoff(f"{sink} sink")
        while True:
            try:
                await action()
            except BackendUnavailable as exc:
                self._sink_failed(sink, str(exc))
                await asyncio.sleep(backoff.failed(exc, getattr(exc, "retry_after", None)))
                continue
            except Exception as exc:
                logger.exception("%s sink failed unexpectedly; retrying", sink)
                self._sink_failed(sink, f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff.failed(exc))
                continue
            backoff.succeeded()
            self.sink_errors[sink] = None
            return

    def _sink_failed(self, sink: str, error: str) -> None:
        self.sink_errors[sink] = error
        # Its backlog is the spool's to hold: exempt from holding the intake until caught up.
        self._catching_up.add(sink)

    # --- the segment archive layout ------------------------------------------------------------

    def _epoch_intent_path(self) -> Path:
        return self.spool.directory / "archive-epoch"

    async def _drain_segments(self) -> None:
        """The archive sink of the segment layout.

        Lines collect per device over an epoch (`archive_segment_max_age_s`, or until the open
        segments hold `archive_segment_buffer_bytes`). Before writing an epoch, its last spool
        position is recorded; after a crash, exactly the same records are rebuilt into the same
        segments (same content, same keys) and written again, so nothing is lost or doubled.
        Only then does the archive confirm its spool position.
        """
        position = self.spool.confirmed["archive"]
        intent = await asyncio.to_thread(self._read_epoch_intent)
        if intent is not None and intent > position:
            rebuilt = _Epoch()
            after = position
            while after < intent:
                chunks = await self.spool.read(after, self.settings.batch_max_messages)
                chunks = [chunk for chunk in chunks if chunk.first_seq <= intent]
                if not chunks:
                    break
                for chunk in chunks:
                    kept = [record for record in chunk.records if record.seq <= intent]
                    await self._add_to_epoch(rebuilt, self._decoded(Chunk(kept)))
                    after = kept[-1].seq
            await self._write_epoch(rebuilt, intent)
            position = intent
        processed = position
        epoch = _Epoch()
        max_age = self.settings.archive_segment_max_age_s
        while True:
            await self.spool.wait_beyond(processed, within=min(1.0, max_age))
            chunks = await self.spool.read(processed, self.settings.batch_max_messages)
            for chunk in chunks:
                await self._add_to_epoch(epoch, self._decoded(chunk))
                processed = self._epoch_taken = chunk.last_seq
                self._sink_progress.set()
            if not epoch.lines:
                # Nothing open (only rejected messages so far): nothing to wait for.
                if processed > self.spool.confirmed["archive"]:
                    await self.spool.confirm("archive", processed)
                continue
            due = time.monotonic() - epoch.started >= max_age
            if due or epoch.size >= self.settings.archive_segment_buffer_bytes:
                await self._write_epoch(epoch, processed)
                epoch = _Epoch()

    async def _add_to_epoch(self, epoch: _Epoch, decoded: Decoded) -> None:
        """Encode the readings as segment lines now: an epoch holds bytes, not objects."""
        readings = decoded.readings
        if not self.settings.auto_register:

            async def resolve() -> None:
                readings[:] = await self.directory.resolve(list(readings), retype=False)

            readings = list(readings)
            await self._retry_until_done("archive", resolve)
        epoch.add(readings)

    async def _write_epoch(self, epoch: _Epoch, end: int) -> None:
        if not epoch.lines:
            await self.spool.confirm("archive", end)
            return
        await asyncio.to_thread(self._write_epoch_intent, end)
        objects = []
        limit = self.settings.archive_segment_max_bytes
        for device_id, lines in epoch.lines.items():
            part: list[tuple[int, bytes]] = []
            size = 0
            for epoch_us, line in lines:
                if part and size + len(line) > limit:
                    objects.append(build_segment(device_id, part, compress=self._gzip))
                    part, size = [], 0
                part.append((epoch_us, line))
                size += len(line)
            objects.append(build_segment(device_id, part, compress=self._gzip))

        async def upload() -> None:
            await self.archive.put_objects(objects)

        await self._retry_until_done("archive", upload)
        await self.spool.confirm("archive", end)
        await asyncio.to_thread(self._write_epoch_intent, None)
        self.stats.count_stored(
            "archive", Counter({device: len(lines) for device, lines in epoch.lines.items()})
        )

    @property
    def _gzip(self) -> bool:
        return self.settings.archive_segment_gzip

    def _read_epoch_intent(self) -> int | None:
        try:
            return int(self._epoch_intent_path().read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _write_epoch_intent(self, end: int | None) -> None:
        path = self._epoch_intent_path()
        if end is None:
            path.unlink(missing_ok=True)
            return
        temporary = path.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            handle.write(str(end))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    async def _store_registry(self, batch: list[Decoded]) -> None:
        """Register new devices (or refuse them), keep dead letters, move last_seen_at."""
        readings = [reading for decoded in batch for reading in decoded.readings]
        rejections = [rejection for decoded in batch for rejection in decoded.rejections]
        types: dict[str, str] = {}
        seen: dict[str, int] = {}
        for reading in readings:
            types.setdefault(reading.device_id, reading.device_type or UNKNOWN_TYPE)
            if reading.received_at_us > seen.get(reading.device_id, 0):
                seen[reading.device_id] = reading.received_at_us
        async with self.database.transaction() as session:
            devices = DeviceRepository(session)
            registered = await devices.types_of(types)
            unknown = {
                device_id: kind for device_id, kind in types.items() if device_id not in registered
            }
            if unknown and self.settings.auto_register:
                await devices.register_missing(unknown)
                registered.update(unknown)
                logger.info(
                    "registered %d new device(s): %s", len(unknown), ", ".join(sorted(unknown)[:5])
                )
            elif unknown:
                rejections.extend(
                    Rejection(
                        reason=RejectReason.UNKNOWN_DEVICE,
                        detail=f"device {reading.device_id!r} is not registered and "
                        f"{env_name('auto_register')} is off; register it with "
                        "POST /api/v1/devices",
                        topic=reading.topic,
                        payload=reading.raw,
                        device_id=reading.device_id,
                        batch_index=reading.batch_index,
                    )
                    for reading in readings
                    if reading.device_id in unknown
                )
                for device_id in unknown:
                    seen.pop(device_id, None)
            await DeadLetterRepository(session).add_many(rejections)
            await devices.touch_last_seen(
                {device_id: _from_epoch_us(epoch_us) for device_id, epoch_us in seen.items()}
            )
        self.directory.types.update(registered)
        for rejection in rejections:
            self.stats.count_rejection(rejection.reason.value, rejection.device_id)

    async def _store_timeseries(self, batch: list[Decoded]) -> None:
        readings = await self._resolved(batch, retype=self.timeseries.tags_device_type)
        if not readings:
            return
        try:
            await self.timeseries.write(readings)
        except BackendUnavailable:
            raise
        except Exception as exc:
            refused = getattr(exc, "rejected", None)
            if refused is None:
                raise
            # A record the store refuses for good is dead-lettered, not retried forever.
            await self._dead_letter_refused("time-series store", refused)
            refused_ids = {id(reading) for reading, _message in refused}
            readings = [reading for reading in readings if id(reading) not in refused_ids]
        self.stats.count_stored("timeseries", Counter(r.device_id for r in readings))

    async def _store_archive(self, batch: list[Decoded]) -> None:
        readings = await self._resolved(batch, retype=False)
        if readings:
            await self.archive.put(readings)
        self.stats.count_stored("archive", Counter(r.device_id for r in readings))

    async def _resolved(self, batch: list[Decoded], *, retype: bool) -> list[ReadingSet]:
        readings = [reading for decoded in batch for reading in decoded.readings]
        return await self.directory.resolve(readings, retype=retype)

    async def _dead_letter_refused(
        self, what: str, refused: Sequence[tuple[ReadingSet, str]]
    ) -> None:
        rejections = [
            Rejection(
                reason=RejectReason.REFUSED_BY_STORE,
                detail=f"{what} refused it: {message}",
                topic=reading.topic,
                payload=reading.raw,
                device_id=reading.device_id,
                batch_index=reading.batch_index,
            )
            for reading, message in refused
        ]
        try:
            async with self.database.transaction() as session:
                await DeadLetterRepository(session).add_many(rejections)
        except Exception as exc:
            raise BackendUnavailable(f"dead-letter store unavailable: {exc}") from exc
        for rejection in rejections:
            self.stats.count_rejection(rejection.reason.value, rejection.device_id)
