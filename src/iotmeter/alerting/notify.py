"""The notifier: delivers the outbox (`notifications`) at least once, through restarts.

A notification row is written in the transaction that changes the alert (alerting/sink.py), so
no alert change is ever without its notifications. The notifier claims due rows (a lease: the
row's next attempt is moved 15 s ahead, past the 10 s timeout, so a crash mid-delivery retries
it then; on PostgreSQL with `FOR UPDATE SKIP LOCKED`, so several processes never claim the
same row), sends each in its own task (a receiver that is slow or down never holds up another, up to
`CONCURRENCY` at once), and records every attempt (`delivery_attempts`: status, latency, error,
the first 1 KB of the answer).

Webhooks follow the Standard Webhooks specification, signed by the `standardwebhooks` package:
`webhook-id` (the notification's event id, the same on every retry, so receivers can drop
duplicates), `webhook-timestamp`, `webhook-signature` (HMAC-SHA256 over `id.timestamp.body`).
Only http and https URLs; addresses that are private, loopback, link-local, multicast or
reserved are refused at connection time (each address the name resolves to is checked by the
resolver the connection uses, so a DNS answer cannot slip one in after a check) unless
`IOTMETER_WEBHOOK_ALLOW_PRIVATE=true`; no redirects; a 10 s timeout.

Retries: exponential backoff from 5 s, doubling, each wait at most an hour, with full jitter in
its upper half, until 24 h after the event; then the row is `failed` (a person can retry it).
The schedule is computed when an attempt fails and stored on the row, since it must survive
restarts: a retry library's in-memory loop would not (one line of arithmetic, `next_wait`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import aiomqtt
import aiosmtplib
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from sqlalchemy import insert, select, update
from standardwebhooks import Webhook

from iotmeter.db.base import utcnow
from iotmeter.db.engine import Database
from iotmeter.db.models import DeliveryAttempt, Notification, NotificationChannel
from iotmeter.ingest.broker import BrokerAddress
from iotmeter.observability.tracing import delivery_span

logger = logging.getLogger(__name__)

TIMEOUT_S = 10.0
CONCURRENCY = 32
LEASE_S = 15.0
POLL_S = 1.0
FIRST_WAIT_S = 5.0
MAX_WAIT_S = 3600.0
GIVE_UP_AFTER = timedelta(hours=24)
RESPONSE_KEPT_BYTES = 1024


def next_wait(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones."""
    ceiling = min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** max(0, attempts - 1))
    return random.uniform(ceiling / 2, ceiling)


class UnsafeAddress(Exception):
    """A webhook URL that points where iotmeter must not send (SSRF)."""


def address_refused(address: str) -> str | None:
    """Why this IP address may not receive webhooks, or None."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for refused, what in (
        (ip.is_loopback, "loopback"),
        (ip.is_private, "private"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip.is_reserved, "reserved"),
        (ip.is_unspecified, "unspecified"),
    ):
        if refused:
            return f"{address} is a {what} address"
    return None


def url_refused(url: str, *, allow_private: bool) -> str | None:
    """What is wrong with a webhook URL as written (its resolved addresses are checked when
    connecting), or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "a webhook URL must start with http:// or https://"
    if not parts.hostname:
        return "the webhook URL has no host"
    if parts.username or parts.password:
        return "put no credentials in the webhook URL; the signature authenticates iotmeter"
    if allow_private:
        return None
    try:
        why = address_refused(parts.hostname)
    except ValueError:
        if parts.hostname.lower() in ("localhost", "localhost.localdomain"):
            why = "localhost is a loopback address"
        else:
            return None  # a name: checked when it is resolved
    if why is None:
        return None
    return f"{why}; set IOTMETER_WEBHOOK_ALLOW_PRIVATE=true to allow internal receivers"


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing names that resolve to internal addresses."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            why = address_refused(result["host"])
            if why is not None:
                raise UnsafeAddress(
                    f"{host} resolves to {why}; set IOTMETER_WEBHOOK_ALLOW_PRIVATE=true to "
                    "allow internal receivers"
                )
        return results

    async def close(self) -> None:
        await self._resolver.close()


@dataclass(frozen=True, slots=True)
class Outcome:
    delivered: bool
    status_code: int | None
    latency_ms: float
    error: str | None
    response: str | None


@dataclass(frozen=True, slots=True)
class MailServer:
    """`smtp://user:password@host:587` (STARTTLS when offered; `?starttls=required` insists) or
    `smtps://user:password@host:465` (TLS from the first byte)."""

    host: str
    port: int
    username: str | None
    password: str | None
    use_tls: bool
    start_tls: bool | None
    sender: str
    ca_file: str | None
    public_url: str

    @classmethod
    def from_url(cls, url: str, *, sender: str, ca_file: str | None, public_url: str) -> MailServer:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("the mail server must be smtp://host:port or smtps://host:port")
        use_tls = parts.scheme == "smtps"
        required = "starttls=required" in parts.query
        return cls(
            host=parts.hostname,
            port=parts.port or (465 if use_tls else 587),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            use_tls=use_tls,
            start_tls=None if not required and not use_tls else (True if required else None),
            sender=sender,
            ca_file=ca_file,
            public_url=public_url.rstrip("/"),
        )


def mail_for(server: MailServer, recipients: list[str], payload: dict[str, Any]) -> EmailMessage:
    """One mail per event: the alert's facts and a link to it."""
    data = payload.get("data", {})
    kind = str(payload.get("type", "alert")).removeprefix("alert.")
    message = EmailMessage()
    message["From"] = server.sender
    message["To"] = ", ".join(recipients)
    severity = str(data.get("severity") or "info").upper()
    subject = f"[iotmeter {severity}] {kind}: {data.get('message') or data.get('device_id', '')}"
    message["Subject"] = " ".join(subject.split())[:200]
    lines = [f"{kind.capitalize()}: {data.get('message', '')}", ""]
    for name in (
        "device_id",
        "rule",
        "field",
        "value",
        "limit",
        "extreme_value",
        "breach_count",
        "first_breach_at",
        "last_breach_at",
        "at",
    ):
        if data.get(name) is not None:
            lines.append(f"{name.replace('_', ' ')}: {data[name]}")
    if data.get("alert_id") is not None:
        lines += ["", f"{server.public_url}/api/v1/alerts/{data['alert_id']}"]
    message.set_content("\n".join(lines) + "\n")
    return message


class Notifier:
    def __init__(
        self,
        database: Database,
        *,
        allow_private: bool,
        broker: BrokerAddress | None,
        mail: MailServer | None = None,
    ) -> None:
        self.database = database
        self.allow_private = allow_private
        self.broker = broker
        self._mqtt_tls: ssl.SSLContext | None = None
        self.mail = mail
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed_attempts = 0
        self.attempts: Counter[tuple[str, str]] = Counter()
        """Delivery attempts since start by (channel kind, `delivered` or `failed`)."""

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=None if self.allow_private else GuardedResolver(), limit=CONCURRENCY
        )
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            try:
                while True:
                    try:
                        for row in await self._claim():
                            task = asyncio.create_task(self._deliver(http, row))
                            self._tasks.add(task)
                            task.add_done_callback(self._tasks.discard)
                    except Exception as exc:
                        logger.warning("notifier: could not read the outbox: %s", exc)
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), POLL_S)
            finally:
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _claim(self) -> list[dict[str, Any]]:
        now = utcnow()
        room = CONCURRENCY * 4 - len(self._in_flight)
        if room <= 0:
            return []
        table = Notification.__table__
        channels = NotificationChannel.__table__
        async with self.database.transaction() as session:
            query = (
                select(
                    table,
                    channels.c.kind,
                    channels.c.url,
                    channels.c.secret,
                    channels.c.topic,
                    channels.c.email_to,
                )
                .join(channels, channels.c.id == table.c.channel_id)
                .where(table.c.status == "pending", table.c.next_attempt_at <= now)
                .order_by(table.c.next_attempt_at)
                .limit(room)
            )
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(of=table, skip_locked=True)
            rows = [
                dict(row._mapping)
                for row in await session.execute(query)
                if row.id not in self._in_flight
            ]
            if rows:
                await session.execute(
                    update(Notification)
                    .where(Notification.id.in_([row["id"] for row in rows]))
                    .values(next_attempt_at=now + timedelta(seconds=LEASE_S))
                )
        self._in_flight.update(row["id"] for row in rows)
        return rows

    async def _deliver(self, http: aiohttp.ClientSession, row: dict[str, Any]) -> None:
        try:
            async with self._slots:
                with delivery_span(row["kind"], row["id"], row["event_id"]) as trace:
                    if row["kind"] == "mqtt":
                        outcome = await self._publish(row)
                    elif row["kind"] == "email":
                        outcome = await self._mail(row)
                    else:
                        outcome = await self._post(http, row)
                    trace.outcome(outcome.delivered, outcome.status_code, outcome.error)
            await self._record(row, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("notifier: delivery of notification %s failed", row["id"])
        finally:
            self._in_flight.discard(row["id"])

    async def _post(self, http: aiohttp.ClientSession, row: dict[str, Any]) -> Outcome:
        url = row["url"] or ""
        body = orjson.dumps(row["payload"]).decode()
        started = time.perf_counter()
        why = url_refused(url, allow_private=self.allow_private)
        if why is not None:
            return Outcome(False, None, 0.0, why, None)
        sent_at = utcnow()
        headers = {
            "content-type": "application/json",
            "user-agent": "iotmeter-webhooks",
            "webhook-id": row["event_id"],
            "webhook-timestamp": str(int(sent_at.timestamp())),
        }
        if row["secret"]:
            signature = Webhook(row["secret"]).sign(row["event_id"], sent_at, body)
            headers["webhook-signature"] = signature
        try:
            async with http.post(
                url, data=body.encode(), headers=headers, allow_redirects=False
            ) as response:
                answer = await response.content.read(RESPONSE_KEPT_BYTES)
                latency = (time.perf_counter() - started) * 1000
                ok = 200 <= response.status < 300
                return Outcome(
                    ok,
                    response.status,
                    latency,
                    None if ok else f"the receiver answered {response.status}",
                    answer.decode(errors="replace"),
                )
        except TimeoutError:
            error = f"no answer within {TIMEOUT_S:g} s"
        except UnsafeAddress as exc:
            error = str(exc)
        except aiohttp.ClientError as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, UnsafeAddress) else exc
            error = f"{type(cause).__name__}: {cause}"
        return Outcome(False, None, (time.perf_counter() - started) * 1000, error, None)

    async def _publish(self, row: dict[str, Any]) -> Outcome:
        started = time.perf_counter()
        if self.broker is None:
            return Outcome(False, None, 0.0, "no MQTT broker is configured", None)
        data = row["payload"].get("data", {})
        topic = (row["topic"] or "").replace("{device_id}", str(data.get("device_id", "")))
        try:
            if self.broker.tls and self._mqtt_tls is None:
                self._mqtt_tls = await asyncio.to_thread(self.broker.tls_context)
            async with aiomqtt.Client(
                self.broker.host,
                self.broker.port,
                username=self.broker.username,
                password=self.broker.password,
                timeout=TIMEOUT_S,
                tls_context=self._mqtt_tls,
            ) as client:
                await client.publish(topic, orjson.dumps(row["payload"]), qos=1)
        except Exception as exc:
            return Outcome(
                False, None, (time.perf_counter() - started) * 1000, f"MQTT: {exc}", None
            )
        return Outcome(True, None, (time.perf_counter() - started) * 1000, None, None)

    async def _mail(self, row: dict[str, Any]) -> Outcome:
        started = time.perf_counter()
        server = self.mail
        if server is None:
            return Outcome(False, None, 0.0, "no mail server: set IOTMETER_SMTP_URL", None)
        recipients = list(row["email_to"] or [])
        context = ssl.create_default_context(cafile=server.ca_file)
        try:
            errors, answer = await aiosmtplib.send(
                mail_for(server, recipients, row["payload"]),
                sender=server.sender,
                recipients=recipients,
                hostname=server.host,
                port=server.port,
                username=server.username,
                password=server.password,
                use_tls=server.use_tls,
                start_tls=server.start_tls,
                tls_context=context,
                timeout=TIMEOUT_S,
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            latency = (time.perf_counter() - started) * 1000
            return Outcome(False, None, latency, f"SMTP: {type(exc).__name__}: {exc}", None)
        latency = (time.perf_counter() - started) * 1000
        if errors:
            refused = ", ".join(f"{address}: {reply.code}" for address, reply in errors.items())
            return Outcome(False, None, latency, f"recipients refused: {refused}", answer[:1024])
        return Outcome(True, None, latency, None, answer[:1024])

    async def _record(self, row: dict[str, Any], outcome: Outcome) -> None:
        now = utcnow()
        attempts = int(row["attempts"]) + 1
        values: dict[str, Any] = {"attempts": attempts}
        self.attempts[str(row["kind"]), "delivered" if outcome.delivered else "failed"] += 1
        if outcome.delivered:
            values.update(status="delivered", delivered_at=now, last_error=None)
            self.delivered += 1
        else:
            self.failed_attempts += 1
            created: datetime = row["created_at"]
            retry_at = now + timedelta(seconds=next_wait(attempts))
            if retry_at - created > GIVE_UP_AFTER:
                values.update(status="failed", last_error=outcome.error)
            else:
                values.update(next_attempt_at=retry_at, last_error=outcome.error)
        async with self.database.transaction() as session:
            await session.execute(
                insert(DeliveryAttempt).values(
                    notification_id=row["id"],
                    at=now,
                    status_code=outcome.status_code,
                    latency_ms=round(outcome.latency_ms, 3),
                    error=outcome.error,
                    response=outcome.response,
                )
            )
            await session.execute(
                update(Notification).where(Notification.id == row["id"]).values(**values)
            )
