"""The intake: MQTT in, spool out, PUBACK once the spool has the message on disk.

It owns the broker connection (a persistent session, reconnected with the project's backoff),
the subscription, and flow control:
- a QoS 1 message is acknowledged only after the spool's group commit made it durable, and only
  on the connection it came on (an earlier connection's messages are redelivered by the broker);
- at most `mqtt_max_inflight` messages are taken but not yet acknowledged, and none while the
  spool is full: what arrives meanwhile is kept in order, unacknowledged, and taken as room
  comes (reading goes on, so keepalive answers are still seen);
- while a working sink lags the intake by more than four batches, the socket is not read (for a
  second at most at a time): the broker keeps what waits, and the sinks are not starved of CPU
  by an intake that only moves the backlog from the broker to the spool;
- a payload over `max_payload_bytes` is not spooled whole: its head, size and hash are, for the
  dead letter;
- a message the broker delivers from its retained store (retain flag set on delivery) was
  delivered live when it was published (the session is persistent): it is acknowledged and
  ignored, so a resubscribe never stores it again.
It knows nothing of stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any, Protocol

from iotmeter.config import Settings, env_name
from iotmeter.errors import BackendUnavailable
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.ingest.decode import device_id_from_topic
from iotmeter.ingest.mqtt_session import MqttSession, SessionClosed
from iotmeter.ingest.spool import Spool
from iotmeter.ingest.stats import IngestStats
from iotmeter.retry import Backoff, describe

logger = logging.getLogger(__name__)

TOPIC_FILTER = "iot/+/telemetry"
KEPT_HEAD_BYTES = 64 * 1024
"""What is kept of a payload over the size limit (with its size and hash): the dead letter's."""
STABLE_AFTER_S = 10.0
"""A connection that lasted this long was a good one: the next failure starts the backoff anew."""
TAKEOVER_STREAK = 3
"""Connections in a row closed by the broker within `STABLE_AFTER_S` of subscribing: another
client is taking the session (same client id)."""
MAX_HOLD_S = 1.0
HOLD_REPORT_S = 60.0
"""Holding is logged when it starts, at most once in this many seconds, with how often and
how long the intake held since the last such line (under load it holds many times a second)."""

_Pending = tuple[str, bytes, int, int, bool]
"""A message kept for want of room: topic, payload, qos, mid, retained."""


class Flow(Protocol):
    """What the intake asks of the sinks: whether one that works lags, and when they move."""

    progress: asyncio.Event

    def behind(self, head: int, limit: int) -> bool:
        """Whether a working sink is more than `limit` records behind `head`."""
        ...


class Intake:
    """Runs until cancelled; survives broker outages and a spool that cannot write."""

    def __init__(
        self,
        settings: Settings,
        broker: BrokerAddress,
        spool: Spool,
        *,
        client_id: str,
        stats: IngestStats,
        flow: Flow,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.spool = spool
        self.client_id = client_id
        self.stats = stats
        self.flow = flow
        self.connected = False
        self.last_error: str | None = None
        self.spool_full_since: float | None = None
        self.spool_error: str | None = None
        self.held_s = 0.0
        self.holds = 0
        self.reconnects = 0
        """Established connections (subscribed) that were lost."""
        self.retained_ignored = 0
        self.oversized = 0
        self._session: MqttSession | None = None
        self._generation = 0
        self._unacked: list[tuple[int, int, int]] = []
        self._waiting: deque[_Pending] = deque()
        self._work = asyncio.Event()
        self._crowded = asyncio.Event()
        """Set when half the in-flight window waits for a commit: commit now, not after the
        interval (the broker sends no more than its window until acks come back)."""
        self._crowd_limit = max(1, settings.mqtt_max_inflight // 2)
        self._committed = asyncio.Event()
        self._since_check = 0
        # Whether to hold is asked every so many messages: often enough for the bound to hold
        # with small batches, rarely enough to cost nothing per message with large ones.
        self._check_every = max(1, min(64, settings.batch_max_messages))
        self._waiting_limit = 2 * settings.mqtt_max_inflight
        self._pauses: set[str] = set()
        """Why the socket is not read now: `hold` (a sink lags), `room` (too much waits)."""
        self._hold_limit = 4 * settings.batch_max_messages
        self._resume_limit = 2 * settings.batch_max_messages
        self._helpers: set[asyncio.Task[None]] = set()
        self._hold: asyncio.Task[None] | None = None
        self._admitting: asyncio.Task[None] | None = None
        self._hold_reported: tuple[float, int, float] | None = None
        """(when, holds, seconds held) at the last "intake held" line."""

    # --- observing ----------------------------------------------------------------------------

    async def health(self) -> str:
        """For `/ready`: up while subscribed and the spool takes messages."""
        if not self.connected:
            raise BackendUnavailable(
                f"not connected to the {self.broker.describe()}: {self.last_error or 'connecting'}"
            )
        if self.spool_error is not None:
            raise BackendUnavailable(f"the spool cannot write, not acking: {self.spool_error}")
        if self.spool_full_since is not None:
            raise BackendUnavailable(
                f"spool full for {time.monotonic() - self.spool_full_since:.0f} s "
                f"({self.spool.disk_bytes} bytes, {env_name('spool_max_bytes')}): not acking, "
                "the broker holds the backlog until the sinks catch up"
            )
        return f"subscribed to {TOPIC_FILTER} on the {self.broker.describe()} as {self.client_id}"

    @property
    def inflight(self) -> int:
        """Messages taken from the broker and not acknowledged yet (spooled or waiting)."""
        return len(self._unacked) + len(self._waiting)

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._connection_loop(), name="intake-connection")
                group.create_task(self._commit_loop(), name="intake-commit")
        finally:
            for task in list(self._helpers):
                task.cancel()
            if self._helpers:
                await asyncio.gather(*self._helpers, return_exceptions=True)

    async def _connection_loop(self) -> None:
        context = {"broker": f"{self.broker.host}:{self.broker.port}"}
        backoff = Backoff(
            f"MQTT connection to the {self.broker.describe()}", log=logger, context=context
        )
        short_lived = 0
        while True:
            session = MqttSession(self.broker, self.client_id, self._on_message)
            self._generation += 1
            self._session = session
            self._pauses.clear()
            subscribed_at: float | None = None
            try:
                await session.connect()
                await session.subscribe(TOPIC_FILTER, 1)
                subscribed_at = time.monotonic()
                self.connected, self.last_error = True, None
                # "Broker back" now; the delays start anew only once the connection has lasted.
                backoff.recovered()
                logger.info(
                    "collector subscribed to %s as client id %s",
                    TOPIC_FILTER,
                    self.client_id,
                    extra={**context, "client_id": self.client_id},
                )
                await session.wait_closed()
            except SessionClosed as exc:
                error: BaseException = exc
            finally:
                self.connected = False
                self._session = None
                session.close()
                self._waiting.clear()  # not acked: the broker sends them again
            self.last_error = describe(error)
            if subscribed_at is not None:
                self.reconnects += 1
            if subscribed_at is not None and time.monotonic() - subscribed_at >= STABLE_AFTER_S:
                backoff.succeeded()
                short_lived = 0
            elif subscribed_at is not None:
                short_lived += 1
                if short_lived == TAKEOVER_STREAK:
                    logger.error(
                        "the broker closed the connection %d times in a row within %.0f s of "
                        "subscribing: another client probably uses the client id %r and takes "
                        "the session; give each iotmeter its own %s. Backing off.",
                        short_lived,
                        STABLE_AFTER_S,
                        self.client_id,
                        env_name("mqtt_client_id"),
                        extra={**context, "client_id": self.client_id},
                    )
            await backoff.wait(error)

    def _on_message(
        self, topic: str, payload: bytes, qos: int, packet_id: int, retained: bool
    ) -> None:
        """Each PUBLISH the broker sends, on the event loop."""
        # One string per topic, shared by every record of the device (a backlog keeps tens
        # of thousands of records in memory).
        pending = (sys.intern(topic), payload, qos, packet_id, retained)
        self._since_check += 1
        if self._since_check >= self._check_every:
            self._since_check = 0
            self._maybe_hold()
        if self._waiting or not self._has_room():
            # Kept (unacked, in order) until there is room. The broker's in-flight window
            # should bound how many, but Mosquitto 2.0 was seen sending a whole 150,000
            # message backlog at once: past a bound the socket is not read until they are in.
            self._waiting.append(pending)
            if len(self._waiting) >= self._waiting_limit:
                self._pause("room")
            if self._admitting is None or self._admitting.done():
                self._admitting = self._spawn(self._admit_waiting(), "intake-admit")
            return
        self._admit(*pending)

    def _admit(self, topic: str, payload: bytes, qos: int, mid: int, retained: bool) -> None:
        if retained:
            self.retained_ignored += 1
        elif len(payload) > self.settings.max_payload_bytes:
            self.oversized += 1
            now_us = time.time_ns() // 1000
            self.spool.append(
                topic,
                payload[:KEPT_HEAD_BYTES],
                now_us,
                payload_size=len(payload),
                payload_sha256=hashlib.sha256(payload).digest(),
            )
            self.stats.message_received(device_id_from_topic(topic), now_us)
        else:
            now_us = time.time_ns() // 1000
            self.spool.append(topic, payload, now_us)
            self.stats.message_received(device_id_from_topic(topic), now_us)
        if qos > 0:
            # Acked with the others, in order, after the next commit.
            self._unacked.append((self._generation, mid, qos))
            if len(self._unacked) >= self._crowd_limit:
                self._crowded.set()
        self._work.set()

    async def _commit_loop(self) -> None:
        """Group commit: fsync what arrived, then ack it (on the connection it came on)."""
        interval = self.settings.spool_commit_interval_s
        backoff = Backoff("spool write", log=logger, context={"spool": str(self.spool.directory)})
        while True:
            await self._work.wait()
            if not self._crowded.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._crowded.wait()
            self._work.clear()
            self._crowded.clear()
            acks, self._unacked = self._unacked, []
            try:
                await self.spool.commit()
            except OSError as exc:
                self._unacked[:0] = acks
                self.spool_error = describe(exc)
                self._work.set()
                await backoff.wait(exc)
                continue
            backoff.succeeded()
            self.spool_error = None
            session = self._session
            if session is not None and session.connected:
                for generation, mid, qos in acks:
                    # A message from an earlier connection is redelivered by the broker instead.
                    if generation == self._generation:
                        session.ack(mid, qos)
            self._committed.set()

    # --- flow control -------------------------------------------------------------------------

    def _pause(self, reason: str) -> None:
        """Stop reading the broker's socket for `reason` (until every reason is gone)."""
        self._pauses.add(reason)
        if self._session is not None:
            self._session.pause_reading()

    def _resume(self, reason: str) -> None:
        self._pauses.discard(reason)
        if not self._pauses and self._session is not None:
            self._session.resume_reading()

    def _maybe_hold(self) -> None:
        if self._session is None or (self._hold is not None and not self._hold.done()):
            return
        if self.flow.behind(self._head(), self._hold_limit):
            self._pause("hold")
            self._hold = self._spawn(self._hold_intake(), "intake-hold")
            self.holds += 1
            now = time.monotonic()
            if self._hold_reported is None or now - self._hold_reported[0] >= HOLD_REPORT_S:
                self._report_hold(now)

    def _report_hold(self, now: float) -> None:
        head = self._head()
        if self._hold_reported is None:
            logger.info(
                "intake held: a sink is more than %d records behind, so the intake stops "
                "reading the broker (a second at a time) until it catches up; the broker keeps "
                "what waits",
                self._hold_limit,
                extra={"spool_seq": head},
            )
        else:
            since, holds, held_s = self._hold_reported
            logger.info(
                "intake held again: a sink is more than %d records behind (%d holds, %.1f s "
                "held in the %.0f s since the last such line)",
                self._hold_limit,
                self.holds - holds,
                self.held_s - held_s,
                now - since,
                extra={
                    "spool_seq": head,
                    "holds": self.holds - holds,
                    "held_s": round(self.held_s - held_s, 1),
                },
            )
        self._hold_reported = (now, self.holds, self.held_s)

    def _head(self) -> int:
        return self.spool.committed_seq + self.spool.pending

    async def _hold_intake(self) -> None:
        """Stop reading while a working sink lags; at most a second at a time (keepalive
        answers must still be read). The broker keeps what waits."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(MAX_HOLD_S):
                while self.flow.behind(self._head(), self._resume_limit):
                    self.flow.progress.clear()
                    await self.flow.progress.wait()
        except TimeoutError:
            pass
        finally:
            self._resume("hold")
            self.held_s += time.monotonic() - started

    def _has_room(self) -> bool:
        return (
            len(self._unacked) < self.settings.mqtt_max_inflight
            and not self.spool.full
            and self.spool_full_since is None
        )

    async def _admit_waiting(self) -> None:
        """Admit what was kept for want of room, in order, as room comes (until it is all in:
        nothing may wait for a next delivery that might never come)."""
        while self._waiting and self._session is not None:
            if not self._has_room():
                await self._wait_for_room()
                continue
            self._admit(*self._waiting.popleft())
            if len(self._waiting) <= self._waiting_limit // 2:
                self._resume("room")
        self._resume("room")

    async def _wait_for_room(self) -> None:
        while self.spool.full:
            if self.spool_full_since is None:
                self.spool_full_since = time.monotonic()
                logger.error(
                    "spool full (%d bytes, %s): not acking; the broker keeps the backlog",
                    self.spool.disk_bytes,
                    env_name("spool_max_bytes"),
                    extra={
                        "spool_bytes": self.spool.disk_bytes,
                        "spool_seq": self.spool.committed_seq,
                    },
                )
            await asyncio.sleep(0.2)
        if self.spool_full_since is not None:
            full_s = time.monotonic() - self.spool_full_since
            logger.warning(
                "spool has room again after %.0f s; acking resumes",
                full_s,
                extra={"spool_bytes": self.spool.disk_bytes, "full_s": round(full_s, 1)},
            )
            self.spool_full_since = None
        # Back-pressure on a broker that sends without limit: wait for the next commit.
        while len(self._unacked) >= self.settings.mqtt_max_inflight:
            self._committed.clear()
            self._work.set()
            await self._committed.wait()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)
        return task
