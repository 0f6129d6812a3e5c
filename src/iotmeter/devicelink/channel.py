"""The way back to devices: desired configuration out, reported configuration and status in.

One MQTT connection (iotmeter's service account) does both:
- publishes each device's whole desired configuration, retained, QoS 1, to `iot/{id}/config`
  as `{"version": n, "config": {...}}` whenever its version in the registry is ahead of the
  published one (so a change made while the broker was down goes out once it is back, and a
  device that connects later gets it from the broker);
- subscribes to `iot/+/status` (`online` / `offline`, the devices' last wills) and
  `iot/+/config/reported` (`{"version": n, "config": {...}}`), and records them in batches.
  Both are retained by the devices, so every (re)subscription replays the current state: a
  status change missed while iotmeter was down is found at the next start. A replayed message
  changes the registry only when it differs from it (it says what is, not when it began).
Bad status and reported messages go to the dead letters with their reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import orjson

from iotmeter.db.engine import Database
from iotmeter.devicelink.acl import (
    MAX_CONFIG_VERSION,
    config_topic,
    reported_topic,
    status_topic,
)
from iotmeter.ids import DEVICE_ID_RE
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.readings import Rejection, RejectReason
from iotmeter.repositories.dead_letters import DeadLetterRepository
from iotmeter.repositories.device_channel import ChannelRepository, ReportedConfig, StatusChange
from iotmeter.retry import Backoff

logger = logging.getLogger(__name__)

STATUS_FILTER = "iot/+/status"
REPORTED_FILTER = "iot/+/config/reported"
FLUSH_EVERY_S = 0.2
PUBLISH_BATCH = 500
RESCAN_S = 30.0
"""The registry is also scanned this often for unpublished configuration (another process's
change, or a publish that failed)."""
MAX_HELD_REFUSALS = 1000
"""Dead letters kept in memory while the registry is down (the newest)."""
MAX_REPORTED_BYTES = 256 * 1024
MAX_CONFIG_KEYS = 1000
"""As many keys as the API lets a device's desired configuration have."""


@dataclass
class ChannelStats:
    published: int = 0
    status_changes: int = 0
    reports: int = 0
    refused: int = 0
    connected: bool = False
    last_error: str | None = None


@dataclass
class _Pending:
    status: dict[str, StatusChange] = field(default_factory=dict)
    reported: dict[str, ReportedConfig] = field(default_factory=dict)
    refused: list[Rejection] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.status or self.reported or self.refused)


def parse_status(payload: bytes) -> bool | None:
    """`online` -> True, `offline` -> False (case and surrounding space ignored; a JSON string
    or `{"status": ...}` is accepted too); anything else None."""
    text = payload[:64].strip().lower()
    if text in (b"online", b"offline"):
        return text == b"online"
    if len(payload) > 1024:
        return None
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(value, dict):
        value = value.get("status")
    if value in ("online", "offline"):
        return bool(value == "online")
    return None


def parse_reported(payload: bytes) -> tuple[int, dict[str, Any]] | str:
    """(version, config), or a sentence saying what is wrong."""
    if len(payload) > MAX_REPORTED_BYTES:
        return f"reported configuration is {len(payload)} bytes, at most {MAX_REPORTED_BYTES}"
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return 'not JSON: publish {"version": <the version applied>, "config": {...}}'
    if not isinstance(value, dict):
        return 'not a JSON object: publish {"version": <n>, "config": {...}}'
    version = value.get("version")
    config = value.get("config")
    if isinstance(version, bool) or not isinstance(version, int):
        return '"version" must be the whole number of the configuration applied'
    if not 0 <= version <= MAX_CONFIG_VERSION:
        return f'"version" must be from 0 to {MAX_CONFIG_VERSION}: the configuration applied'
    if not isinstance(config, dict):
        return '"config" must be a JSON object of the keys applied'
    if len(config) > MAX_CONFIG_KEYS:
        return f'"config" has {len(config)} keys, at most {MAX_CONFIG_KEYS}'
    if not _finite(config, 0):
        return '"config" holds a number that is not finite, or is nested too deep'
    return version, config


def _finite(value: Any, depth: int) -> bool:
    if depth > 16:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(item, depth + 1) for item in value.values())
    if isinstance(value, list):
        return all(_finite(item, depth + 1) for item in value)
    return True


def _device_of(topic: str, suffix: str) -> str | None:
    if not topic.startswith("iot/") or not topic.endswith(suffix):
        return None
    device_id = topic[4 : len(topic) - len(suffix)]
    return device_id if DEVICE_ID_RE.fullmatch(device_id) else None


class DeviceChannel:
    """Publishes desired configuration and records status and reports until cancelled."""

    def __init__(
        self,
        database: Database,
        broker: BrokerAddress,
        *,
        tls_context: ssl.SSLContext | None = None,
        client_id: str | None = None,
    ) -> None:
        self.database = database
        self.broker = broker
        self.tls_context = tls_context
        self.client_id = client_id or f"iotmeter-channel-{uuid.uuid4().hex[:8]}"
        self.stats = ChannelStats()
        self._wake = asyncio.Event()
        self._pending = _Pending()
        self._arrived = asyncio.Event()
        self._to_clear: set[str] = set()

    def wake(self, device_ids: Iterable[str] = ()) -> None:
        """Desired configuration changed (committed): publish it now."""
        self._wake.set()

    def clear(self, device_ids: Iterable[str]) -> None:
        """Deleted devices: their retained configuration is removed from the broker."""
        self._to_clear.update(device_ids)
        self._wake.set()

    async def health(self) -> str | None:
        return "connected" if self.stats.connected else None

    async def run(self) -> None:
        backoff = Backoff("device channel", initial=1.0, quiet=True)
        while True:
            error: BaseException | None = None
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    username=self.broker.username,
                    password=self.broker.password,
                    identifier=self.client_id,
                    tls_context=self.tls_context,
                    clean_session=True,
                ) as client:
                    self.stats.connected = True
                    backoff.succeeded()
                    logger.info("device channel connected to %s", self.broker.describe())
                    await client.subscribe([(STATUS_FILTER, 1), (REPORTED_FILTER, 1)])
                    self._wake.set()
                    tasks = [
                        asyncio.create_task(self._receive(client)),
                        asyncio.create_task(self._publish(client)),
                        asyncio.create_task(self._flush_loop()),
                    ]
                    try:
                        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                        for task in done:
                            task.result()
                    finally:
                        for task in tasks:
                            task.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
                        await self._flush()
            except aiomqtt.MqttError as exc:
                error = exc
            finally:
                self.stats.connected = False
            self.stats.last_error = str(error) if error else None
            logger.warning("device channel lost its broker connection (%s); retrying", error)
            await backoff.wait(error)

    # --- in: status and reported configuration ---------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                payload = b"" if payload is None else str(payload).encode()
            self._take(topic, bytes(payload), bool(message.retain))
        raise aiomqtt.MqttError("message iteration ended")

    def _take(self, topic: str, payload: bytes, retained: bool) -> None:
        now = datetime.now(UTC)
        pending = self._pending
        if topic.endswith("/status"):
            device_id = _device_of(topic, "/status")
            if device_id is None or not payload:
                return  # not a device topic, or a cleared retained status
            connected = parse_status(payload)
            if connected is None:
                pending.refused.append(
                    _rejection(
                        RejectReason.BAD_STATUS,
                        "publish `online` or `offline` (retained) to iot/{id}/status",
                        topic,
                        payload,
                        device_id,
                    )
                )
            else:
                pending.status[device_id] = StatusChange(connected, now, retained)
        else:
            device_id = _device_of(topic, "/config/reported")
            if device_id is None or not payload:
                return
            parsed = parse_reported(payload)
            if isinstance(parsed, str):
                pending.refused.append(
                    _rejection(RejectReason.BAD_REPORTED_CONFIG, parsed, topic, payload, device_id)
                )
            else:
                version, config = parsed
                pending.reported[device_id] = ReportedConfig(version, config, now, retained)
        self._arrived.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._arrived.wait()
            await asyncio.sleep(FLUSH_EVERY_S)
            self._arrived.clear()
            await self._flush()

    async def _flush(self) -> None:
        pending, self._pending = self._pending, _Pending()
        if not pending:
            return
        try:
            async with self.database.transaction() as session:
                repository = ChannelRepository(session)
                await repository.apply_status(pending.status)
                await repository.apply_reported(pending.reported)
                await DeadLetterRepository(session).add_many(pending.refused, scope="channel")
        except BaseException as exc:
            # Not written (the registry is down, or we are being stopped): keep what came,
            # newer entries of a device winning, for the next flush.
            self._restore(pending)
            if not isinstance(exc, Exception):
                raise
            self._arrived.set()
            logger.warning("device channel cannot write to the registry; retrying: %s", exc)
            await asyncio.sleep(1.0)
            return
        self.stats.status_changes += len(pending.status)
        self.stats.reports += len(pending.reported)
        self.stats.refused += len(pending.refused)

    def _restore(self, pending: _Pending) -> None:
        for device_id, change in pending.status.items():
            self._pending.status.setdefault(device_id, change)
        for device_id, report in pending.reported.items():
            self._pending.reported.setdefault(device_id, report)
        self._pending.refused[:0] = pending.refused[-MAX_HELD_REFUSALS:]

    # --- out: desired configuration --------------------------------------------------------

    async def _publish(self, client: aiomqtt.Client) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESCAN_S):
                    await self._wake.wait()
            self._wake.clear()
            for device_id in sorted(self._to_clear):
                # An empty retained message deletes the broker's copy: a device registered
                # later under the same id starts from nothing.
                for topic in (
                    config_topic(device_id),
                    status_topic(device_id),
                    reported_topic(device_id),
                ):
                    await client.publish(topic, b"", qos=1, retain=True)
                self._to_clear.discard(device_id)
            while await self._publish_batch(client) == PUBLISH_BATCH:
                pass

    async def _publish_batch(self, client: aiomqtt.Client) -> int:
        """Publish one batch of changed configurations; how many were due.

        One transaction holds the due devices' rows from reading to marking them published
        (PostgreSQL: locked, skipping rows another iotmeter process holds): a configuration
        change waits for it, so a version is published with its own keys, and no process can
        publish an older version over a newer one."""
        due: list[tuple[str, int]] = []
        try:
            async with self.database.transaction() as session:
                repository = ChannelRepository(session)
                due = await repository.unpublished(PUBLISH_BATCH, lock=True)
                configs = await repository.desired([device_id for device_id, _ in due])
                published: dict[str, int] = {}
                for device_id, version in due:
                    config = configs.get(device_id, {})
                    message = orjson.dumps({"version": version, "config": config})
                    await client.publish(config_topic(device_id), message, qos=1, retain=True)
                    published[device_id] = version
                await repository.mark_published(published)
        except aiomqtt.MqttError:
            raise  # the connection is gone: `run` reconnects; the versions stay unpublished
        except Exception as exc:
            logger.warning("device channel cannot use the registry; retrying: %s", exc)
            self._wake.set()
            await asyncio.sleep(1.0)
            return 0
        self.stats.published += len(due)
        return len(due)


def _rejection(
    reason: RejectReason, detail: str, topic: str, payload: bytes, device_id: str
) -> Rejection:
    return Rejection(
        reason=reason,
        detail=detail,
        topic=topic,
        payload=payload[:65536],
        device_id=device_id,
        received_at_us=int(datetime.now(UTC).timestamp() * 1e6),
        payload_size=len(payload) if len(payload) > 65536 else None,
    )
