"""Processes for bench/harness.py: MQTT publisher, bare subscriber, HTTP client, S3 PUTs, and
two helpers that run with the app's own code (`register` devices, `inspect` the app's settings).

Each role runs as its own process (`python bench/load.py <role> [options]`) so that its CPU is
its own and the GIL of one never slows another. A role prints one JSON object per line on
stdout: `{"ready": true}` once connected, progress lines (`{"t": epoch_s, ...}`) every 0.5 s,
then a final line with `"done": true`. Roles that start together wait for a line
`go <epoch_s>` on stdin and start at that instant; the subscriber stops on a line `stop` (or when
stdin closes). Every role is bounded in time (`--timeout`).

For the harness's backlog mode the publisher also publishes a fixed number of messages
(`--messages`, paced by the broker's acks alone) and the subscriber keeps a persistent session
under a fixed client id (`--persistent --client-id`): one run creates it (`--session-only`), a
later one resumes it and counts what the broker queued meanwhile (`--expect`, then `--forget`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

PROGRESS_INTERVAL_S = 0.5
TOPIC_FILTER = "iot/+/telemetry"


def emit(**fields: Any) -> None:
    sys.stdout.write(orjson.dumps(fields).decode() + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def device_id(index: int) -> str:
    """The id of bench device `index`; the harness and every role agree on it."""
    return f"bench-{index:05d}"


def history_device_id(index: int, prefix: str = "hist") -> str:
    """A device with a seeded past (role `history`), for the telemetry query tests: `hist`
    one hour, `hist30` thirty days."""
    return f"{prefix}-{index:05d}"


def broker_address(url: str) -> tuple[str, int, str | None, str | None]:
    parts = urlsplit(url)
    return (
        parts.hostname or "127.0.0.1",
        parts.port or 1883,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


def wait_for_go() -> float:
    """Block until the harness says `go <epoch_s>`; return that start time."""
    line = sys.stdin.readline().split()
    if len(line) != 2 or line[0] != "go":
        raise SystemExit(f"expected 'go <epoch_s>' on stdin, got {line!r}")
    return float(line[1])


def sleep_until(instant: float) -> None:
    delay = instant - time.time()
    if delay > 0:
        time.sleep(delay)


def telemetry_payload(sequence: int, message_id: str, sent_us: int) -> bytes:
    """One message: publish time in `ts` (epoch microseconds), four readings."""
    return orjson.dumps(
        {
            "ts": sent_us,
            "seq": sequence,
            "msg_id": message_id,
            "type": "bench",
            "metrics": {
                "temperature": 20.0 + (sequence % 50) / 10,
                "humidity": 40.0 + (sequence % 30) / 10,
                "voltage": 230.0 + (sequence % 7) / 10,
                "power": 100.0 + (sequence % 13),
            },
        }
    )


# --- publisher -------------------------------------------------------------------------------


def _remaining_length(length: int) -> bytes:
    """MQTT's variable-length integer."""
    encoded = bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(encoded)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


class RawPublisher:
    """A minimal MQTT 3.1.1 QoS 1 publisher on a plain socket.

    The load generator shares the machine's two cores with the broker and the app, so it must
    cost little: packets are built from pre-encoded topic headers and written in bursts with one
    `sendall`, and PUBACKs are counted from the byte stream (the broker acknowledges a
    connection's QoS 1 messages in order). paho spent about 80% of a core at 8,000 msg/s here;
    this spends a fraction of that, which leaves the CPU to what is measured.
    """

    def __init__(self, host: str, port: int, client_id: str, keepalive: int = 600) -> None:
        self.sock = socket.create_connection((host, port), timeout=15)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client_id = client_id
        self.keepalive = keepalive
        self.acked = 0
        self._next_id = 0
        self._buffer = b""

    def connect(self, username: str | None, password: str | None) -> None:
        flags = 0x02  # clean session
        payload = _utf8(self.client_id)
        if username is not None:
            flags |= 0x80
            payload += _utf8(username)
            if password is not None:
                flags |= 0x40
                payload += _utf8(password)
        variable = _utf8("MQTT") + bytes([4, flags]) + self.keepalive.to_bytes(2, "big")
        body = variable + payload
        self.sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
        connack = self._read_exactly(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise SystemExit(f"broker refused the connection: CONNACK {connack.hex()}")
        self.sock.setblocking(False)

    def _read_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise SystemExit("broker closed the connection")
            data += chunk
        return data

    def packet(self, topic_header: bytes, payload: bytes) -> bytes:
        """A QoS 1 PUBLISH; `topic_header` is the length-prefixed topic."""
        self._next_id = self._next_id % 65535 + 1
        length = len(topic_header) + 2 + len(payload)
        return (
            b"\x32"
            + _remaining_length(length)
            + topic_header
            + self._next_id.to_bytes(2, "big")
            + payload
        )

    def send(self, packets: list[bytes]) -> None:
        data = memoryview(b"".join(packets))
        while data:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                # The broker is not reading: take its acks meanwhile, then wait to write.
                self.read_acks(0.0)
                select.select([], [self.sock], [], 0.05)
                continue
            data = data[sent:]

    def read_acks(self, wait_s: float) -> None:
        """Count the PUBACKs that arrived; wait up to `wait_s` for the first."""
        if wait_s > 0:
            readable, _, _ = select.select([self.sock], [], [], wait_s)
            if not readable:
                return
        while True:
            try:
                chunk = self.sock.recv(262144)
            except BlockingIOError:
                return
            if not chunk:
                raise SystemExit("broker closed the connection")
            buffer = self._buffer + chunk
            position = 0
            while len(buffer) - position >= 2:
                # Every packet a publisher gets here is short: PUBACK (0x40, length 2).
                length = buffer[position + 1]
                if length & 0x80:
                    raise SystemExit(f"unexpected packet from the broker: {buffer[position]:#x}")
                if len(buffer) - position < 2 + length:
                    break
                if buffer[position] & 0xF0 == 0x40:
                    self.acked += 1
                position += 2 + length
            self._buffer = buffer[position:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


def message_share(total: int, index: int, count: int) -> int:
    """Publisher `index`'s share of `total` messages dealt over `count` processes."""
    return total // count + (1 if index < total % count else 0)


class ConsumedCounter:
    """What the consumer has taken, as the harness reports it on stdin (`consumed <total>`),
    and this process's share of it (devices are dealt evenly)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.total = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            parts = line.split()
            if len(parts) == 2 and parts[0] == "consumed":
                self.total = int(parts[1])

    @property
    def share(self) -> int:
        return self.total // self.processes


def run_publisher(args: argparse.Namespace) -> None:
    """Publish QoS 1 telemetry for this process's share of the devices until the end time.

    Devices are dealt round-robin over the publisher processes (device d belongs to process
    d % count). `--rate 0` offers as much as the consumer takes: the broker acknowledges a
    publish as soon as it is queued, whatever the subscriber's pace, so the harness reports what
    the consumer has taken (`consumed <total>` lines on stdin) and this process keeps at most
    `--window` of its messages ahead of its share of that.

    `--messages N` publishes this process's share of N messages and stops (or at the end time,
    whichever comes first): a backlog for a consumer that is offline, so only the broker's acks
    pace it (at most `--window` unacknowledged).
    """
    host, port, username, password = broker_address(args.mqtt_url)
    client = RawPublisher(host, port, f"bench-pub-{args.index}-{uuid.uuid4().hex[:8]}")
    client.connect(username, password)
    indexes = range(args.index, args.devices, args.count)
    topics = [_utf8(f"iot/{device_id(d)}/telemetry") for d in indexes]
    if not topics:
        raise SystemExit(f"publisher {args.index}: no devices (devices={args.devices})")
    emit(ready=True)
    start = wait_for_go()
    consumed = ConsumedCounter(args.count)
    end = start + args.duration
    sleep_until(start)
    cpu_start = cpu_seconds()
    published = 0
    next_progress = start + PROGRESS_INTERVAL_S
    rate = args.rate
    first_publish = last_publish = None
    device_count = len(topics)
    prefix = f"p{args.index}-"
    quota = message_share(args.messages, args.index, args.count) if args.messages else None
    while True:
        now = time.time()
        if now >= end or (quota is not None and published >= quota):
            break
        if now >= next_progress:
            emit(t=now, published=published, acked=client.acked)
            next_progress += PROGRESS_INTERVAL_S
        if rate > 0:
            due = int((now - start) * rate) + 1
            if published >= due:
                client.read_acks(min(0.002, (published + 1) / rate - (now - start)))
                continue
            burst = min(due - published, 200)
        else:
            client.read_acks(0.0)
            taken = client.acked if quota is not None else min(client.acked, consumed.share)
            ahead = published - taken
            if ahead >= args.window:
                client.read_acks(0.002)
                continue
            burst = min(args.window - ahead, 200)
        if quota is not None:
            burst = min(burst, quota - published)
        packets = []
        for _ in range(burst):
            slot = published % device_count
            sequence = published // device_count
            packets.append(
                client.packet(
                    topics[slot],
                    telemetry_payload(sequence, prefix + str(published), time.time_ns() // 1000),
                )
            )
            published += 1
        client.send(packets)
        if first_publish is None:
            first_publish = now
        last_publish = time.time()
    publish_cpu = cpu_seconds() - cpu_start
    deadline = time.time() + args.ack_timeout
    while client.acked < published and time.time() < deadline:
        if time.time() >= next_progress:
            emit(t=time.time(), published=published, acked=client.acked)
            next_progress += PROGRESS_INTERVAL_S
        client.read_acks(0.01)
    acked_at = time.time()
    emit(t=acked_at, published=published, acked=client.acked)
    client.close()
    emit(
        done=True,
        published=published,
        acked=client.acked,
        first_publish=first_publish,
        last_publish=last_publish,
        acked_at=acked_at,
        publish_cpu_s=publish_cpu,
        devices=device_count,
    )


# --- bare subscriber (the ceiling) -----------------------------------------------------------


def use_fast_loop() -> str:
    """Run on uvloop when installed (as uvicorn, and so the app, does); return the loop's name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _stdin_says_stop() -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "stop":
            return


async def run_subscriber(args: argparse.Namespace, loop_name: str) -> None:
    """Receive QoS 1 messages and count them: nothing else, the most a Python client does.

    With `--persistent` the session (subscription and queue) outlives the connection: a
    session kept under the same `--client-id` gets what the broker queued meanwhile right after
    CONNACK (aiomqtt queues them until they are counted; subscribing again changes nothing)."""
    import aiomqtt

    host, port, username, password = broker_address(args.mqtt_url)
    identifier = args.client_id or f"bench-ceiling-{uuid.uuid4().hex[:8]}"
    received = 0
    first_message_at: float | None = None
    all_received_at: float | None = None
    started = connect_at = time.time()
    async with aiomqtt.Client(
        host,
        port,
        username=username,
        password=password,
        identifier=identifier,
        clean_session=not args.persistent,
        keepalive=60,
    ) as client:
        connected_at = time.time()
        if args.session_only:
            await client.subscribe(TOPIC_FILTER, qos=1)
            emit(ready=True, loop=loop_name, client_id=identifier)
            emit(done=True, received=0, client_id=identifier, seconds=time.time() - started)
            return

        async def receive() -> None:
            nonlocal received, first_message_at, all_received_at
            async for _message in client.messages:
                received += 1
                if received == 1:
                    first_message_at = time.time()
                if received == args.expect:
                    all_received_at = time.time()
                    return

        async def progress() -> None:
            while True:
                await asyncio.sleep(PROGRESS_INTERVAL_S)
                emit(t=time.time(), received=received)

        cpu_start = cpu_seconds()
        # Counting starts before the SUBACK: a resumed session's messages come first.
        tasks = [asyncio.create_task(receive()), asyncio.create_task(progress())]
        await client.subscribe(TOPIC_FILTER, qos=1)
        emit(ready=True, loop=loop_name, client_id=identifier)
        stopper = asyncio.create_task(_stdin_says_stop())
        await asyncio.wait([stopper, tasks[0]], timeout=args.timeout, return_when="FIRST_COMPLETED")
        for task in [*tasks, stopper]:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        emit(t=time.time(), received=received)
        cpu_s = cpu_seconds() - cpu_start
    if args.forget:
        # A clean session under the same id ends the persistent one: nothing queues for it.
        async with aiomqtt.Client(
            host,
            port,
            username=username,
            password=password,
            identifier=identifier,
            clean_session=True,
        ):
            pass
    emit(
        done=True,
        received=received,
        cpu_s=cpu_s,
        seconds=time.time() - started,
        loop=loop_name,
        client_id=identifier,
        connect_at=connect_at,
        connected_at=connected_at,
        first_message_at=first_message_at,
        all_received_at=all_received_at,
    )


# --- HTTP client -----------------------------------------------------------------------------

ENDPOINTS: dict[str, Callable[[random.Random, int], str]] = {
    "device_get": lambda rng, n: f"/api/v1/devices/{device_id(rng.randrange(n))}",
    "device_list": lambda _rng, _n: "/api/v1/devices?limit=50",
    "telemetry": lambda rng, n: (
        f"/api/v1/devices/{device_id(rng.randrange(n))}/telemetry?start=-1h&every=1m"
    ),
    "telemetry_history": lambda rng, n: (
        f"/api/v1/devices/{history_device_id(rng.randrange(n))}/telemetry?start=-1h&every=1m"
    ),
    "telemetry_history_30d": lambda rng, n: (
        f"/api/v1/devices/{history_device_id(rng.randrange(n), 'hist30')}/telemetry"
        "?start=-30d&every=1h"
    ),
}


class RequestFailed(Exception):
    """A request got no HTTP answer; the message names why (timeout, connection reset...)."""


class HttpxGetter:
    """GET through httpx.AsyncClient (the reference client)."""

    def __init__(
        self, base_url: str, connections: int, timeout: float, api_key: str | None = None
    ) -> None:
        import httpx

        self.httpx = httpx
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.client = httpx.AsyncClient(
            base_url=base_url,
            limits=limits,
            timeout=httpx.Timeout(timeout),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        )

    async def get(self, path: str) -> int:
        try:
            response = await self.client.get(path)
        except self.httpx.HTTPError as exc:
            raise RequestFailed(type(exc).__name__) from exc
        return response.status_code

    async def close(self) -> None:
        await self.client.aclose()


class RawGetter:
    """GET over a fixed pool of keep-alive HTTP/1.1 connections with hand-written framing:
    a fraction of httpx's CPU per request, for loads where the client would be the limit."""

    def __init__(
        self, base_url: str, connections: int, timeout: float, api_key: str | None = None
    ) -> None:
        parts = urlsplit(base_url)
        self.authorization = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.size = connections
        self.timeout = timeout
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = (
            asyncio.Queue()
        )
        for _ in range(connections):
            self.idle.put_nowait(None)  # opened on first use

    async def _request(
        self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str
    ) -> int:
        reader, writer = connection
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nAccept: application/json\r\n"
            f"{self.authorization}\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RequestFailed("no Content-Length (chunked answers are not supported)")
        await reader.readexactly(length)
        return status

    async def get(self, path: str) -> int:
        connection = await self.idle.get()
        try:
            if connection is None:
                connection = await asyncio.open_connection(self.host, self.port)
            status = await asyncio.wait_for(self._request(connection, path), self.timeout)
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
        ) as exc:
            if connection is not None:
                connection[1].close()
            self.idle.put_nowait(None)
            raise RequestFailed(type(exc).__name__) from exc
        self.idle.put_nowait(connection)
        return status

    async def close(self) -> None:
        while not self.idle.empty():
            connection = self.idle.get_nowait()
            if connection is not None:
                connection[1].close()


async def run_http(args: argparse.Namespace, loop_name: str) -> None:
    """Closed loop (`--concurrency` workers back to back) or open loop (`--rate` requests/s,
    latency counted from each request's scheduled time, so a slow server cannot hide queueing)."""
    rng = random.Random(args.seed)
    path_of = ENDPOINTS[args.endpoint]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    # Open loop: requests beyond the connections wait for one, and that wait counts in their
    # latency (measured from the scheduled time).
    connections = max(args.concurrency, 1) if args.rate == 0 else args.connections
    kind = HttpxGetter if args.client == "httpx" else RawGetter
    api_key = Path(args.api_key_file).read_text().strip() if args.api_key_file else None
    client = kind(args.base_url, connections, args.request_timeout, api_key)
    try:
        # Open the connections before the clock starts.
        await asyncio.gather(
            *(client.get("/health") for _ in range(connections)), return_exceptions=True
        )
        emit(ready=True, loop=loop_name, client=args.client)
        start = await asyncio.get_running_loop().run_in_executor(None, wait_for_go)
        await asyncio.sleep(max(0.0, start - time.time()))
        cpu_start = cpu_seconds()
        begin = time.perf_counter()
        end = begin + args.duration

        async def one(scheduled: float) -> None:
            try:
                status = await client.get(path_of(rng, args.devices))
            except RequestFailed as exc:
                errors[str(exc)] = errors.get(str(exc), 0) + 1
                return
            done = time.perf_counter()
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200:
                latencies.append((done - scheduled) * 1000)

        dropped = 0
        if args.rate == 0:

            async def worker() -> None:
                while time.perf_counter() < end:
                    await one(time.perf_counter())

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        else:
            interval = 1.0 / args.rate
            pending: set[asyncio.Task[None]] = set()
            sent = 0
            while True:
                scheduled = begin + sent * interval
                if scheduled >= end:
                    break
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent += 1
                if len(pending) >= args.max_outstanding:
                    dropped += 1
                    continue
                task = asyncio.create_task(one(scheduled))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.wait(pending, timeout=args.request_timeout)
        elapsed = time.perf_counter() - begin
        cpu = cpu_seconds() - cpu_start
    finally:
        await client.close()
    emit(
        done=True,
        endpoint=args.endpoint,
        seconds=elapsed,
        latencies_ms=[round(value, 3) for value in latencies],
        statuses=statuses,
        errors=errors,
        dropped=dropped,
        cpu_s=cpu,
        loop=loop_name,
        client=args.client,
    )


# --- S3 small-PUT ceiling ----------------------------------------------------------------------


async def run_s3_puts(args: argparse.Namespace, loop_name: str) -> None:
    """PutObject of ~200 B bodies at a fixed concurrency: the object store's own small-PUT rate.

    The PUTs go through iotmeter's `SignedPut` (about 0.3 ms of client CPU each, against about
    0.9 ms through aiobotocore's full pipeline): with the cheaper client the figure is the
    store's rate, not this process's."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    from iotmeter.storage.archive.s3 import SignedPut

    config = AioConfig(
        s3={"addressing_style": "path"},
        max_pool_connections=args.concurrency,
        request_checksum_calculation="when_required",
    )
    body = telemetry_payload(1, "x" * 16, time.time_ns() // 1000).ljust(args.body_bytes, b" ")
    async with get_session().create_client(
        "s3",
        endpoint_url=args.endpoint,
        region_name=args.region,
        aws_access_key_id=args.access_key,
        aws_secret_access_key=args.secret_key,
        config=config,
    ) as client:
        with contextlib.suppress(Exception):
            await client.create_bucket(Bucket=args.bucket)
        await client.put_object(Bucket=args.bucket, Key="warm-up", Body=b"{}")  # first-PUT cost
        signed_put = SignedPut(
            endpoint_url=args.endpoint,
            bucket=args.bucket,
            region=args.region,
            access_key=args.access_key,
            secret_key=args.secret_key,
            concurrency=args.concurrency,
            connect_timeout=5,
            read_timeout=30,
            max_attempts=1,
        )
        puts = 0
        failures = 0
        cpu_start = cpu_seconds()
        begin = time.perf_counter()
        end = begin + args.duration

        async def worker(number: int) -> None:
            nonlocal puts, failures
            sequence = 0
            while time.perf_counter() < end:
                key = f"{device_id(number % 1000)}/{time.time_ns()}-{number}-{sequence}.json"
                sequence += 1
                try:
                    await signed_put.put(key, body, "application/json")
                except Exception:
                    failures += 1
                else:
                    puts += 1

        async def progress() -> None:
            while True:
                emit(t=time.time(), puts=puts)
                await asyncio.sleep(PROGRESS_INTERVAL_S)

        reporter = asyncio.create_task(progress())
        await asyncio.gather(*(worker(number) for number in range(args.concurrency)))
        reporter.cancel()
        elapsed = time.perf_counter() - begin
        await signed_put.close()
        emit(t=time.time(), puts=puts)
        emit(
            done=True,
            puts=puts,
            failures=failures,
            seconds=elapsed,
            puts_per_s=puts / elapsed,
            body_bytes=len(body),
            concurrency=args.concurrency,
            cpu_s=cpu_seconds() - cpu_start,
            loop=loop_name,
        )


# --- app-side helpers (run with the app's code and environment) -------------------------------


async def run_register(args: argparse.Namespace, _loop_name: str) -> None:
    """Register bench devices 0..count-1 through the registry's own repository."""
    from iotmeter.db.engine import Database, build_engine
    from iotmeter.repositories.devices import DeviceRepository

    started = time.perf_counter()
    database = Database(build_engine(args.database_url))
    try:
        for first in range(0, args.count, 1000):
            batch = {device_id(n): "bench" for n in range(first, min(first + 1000, args.count))}
            async with database.transaction() as session:
                await DeviceRepository(session).register_missing(batch)
    finally:
        await database.close()
    emit(done=True, registered=args.count, seconds=time.perf_counter() - started)


async def run_history(args: argparse.Namespace, _loop_name: str) -> None:
    """Register `count` history devices and give each the past `--hours` of 4-field readings
    every `--interval` seconds, written through the app's own SQL time-series store."""
    from iotmeter.db.engine import Database, build_engine
    from iotmeter.repositories.devices import DeviceRepository
    from iotmeter.storage.timeseries.sql import SqlTimeSeriesStore

    try:
        from iotmeter.readings import ReadingSet
    except ImportError:  # the app's code before the move (e.g. `--app-ref` an older commit)
        from iotmeter.ingest.models import ReadingSet  # type: ignore[no-redef]

    started = time.perf_counter()
    database = Database(build_engine(args.database_url))
    try:
        from iotmeter.storage.timeseries.sql import Lifecycle

        # Written as data from before the rollups: the app's lifecycle task backfills them
        # (marking each seeded minute as a late reading would only repeat that work).
        store = SqlTimeSeriesStore(database, lifecycle=Lifecycle(rollups=False))
    except ImportError:  # the app's code before rollups (e.g. `--app-ref` an older commit)
        store = SqlTimeSeriesStore(database)
    now_us = time.time_ns() // 1000
    steps = int(args.hours * 3600 / args.interval)
    step_us = int(args.interval * 1_000_000)
    written = 0
    try:
        async with database.transaction() as session:
            await DeviceRepository(session).register_missing(
                {history_device_id(n, args.prefix): "bench" for n in range(args.count)}
            )
        batch: list[ReadingSet] = []
        for step in range(steps):
            epoch_us = now_us - (steps - step) * step_us
            for n in range(args.count):
                device = history_device_id(n, args.prefix)
                batch.append(
                    ReadingSet(
                        device_id=device,
                        epoch_us=epoch_us,
                        values={
                            "temperature": 20.0 + (step % 50) / 10,
                            "humidity": 40.0 + (step % 30) / 10,
                            "voltage": 230.0 + (step % 7) / 10,
                            "power": 100.0 + (step % 13),
                        },
                        topic=f"iot/{device}/telemetry",
                        received_at_us=epoch_us,
                        raw=b"{}",
                    )
                )
            if len(batch) >= 5000:
                await store.write(batch)
                written += len(batch)
                batch = []
        if batch:
            await store.write(batch)
            written += len(batch)
    finally:
        await database.close()
    emit(done=True, devices=args.count, reading_sets=written, seconds=time.perf_counter() - started)


async def run_inspect(_args: argparse.Namespace, _loop_name: str) -> None:
    """Which iotmeter the app runs, and whether it knows the settings the harness passes."""
    import iotmeter
    from iotmeter.config import Settings

    emit(
        done=True,
        version=iotmeter.__version__,
        source=str(Path(iotmeter.__file__).parent),
        archive_layout_setting=("archive_layout" in Settings.model_fields),
    )


# --- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--kill-after", type=float, default=900, help="exit after this many seconds, whatever"
    )
    roles = parser.add_subparsers(dest="role", required=True)

    publisher = roles.add_parser("publish")
    publisher.add_argument("--mqtt-url", required=True)
    publisher.add_argument("--index", type=int, default=0)
    publisher.add_argument("--count", type=int, default=1)
    publisher.add_argument("--devices", type=int, default=1000)
    publisher.add_argument("--duration", type=float, default=60)
    publisher.add_argument(
        "--rate", type=float, default=0, help="msg/s, 0: a window ahead of the consumer"
    )
    publisher.add_argument(
        "--window",
        type=int,
        default=20000,
        help="rate 0: most messages ahead of the consumer (the harness reports it every 0.5 s)",
    )
    publisher.add_argument("--ack-timeout", type=float, default=60)
    publisher.add_argument(
        "--messages",
        type=int,
        default=0,
        help="publish this many in all (over --count processes), paced by acks only; 0: "
        "until --duration ends",
    )

    subscriber = roles.add_parser("subscribe")
    subscriber.add_argument("--mqtt-url", required=True)
    subscriber.add_argument("--timeout", type=float, default=600)
    subscriber.add_argument("--client-id", help="default: a random one")
    subscriber.add_argument(
        "--persistent", action="store_true", help="clean_session=False: the session stays"
    )
    subscriber.add_argument(
        "--session-only", action="store_true", help="subscribe, then disconnect at once"
    )
    subscriber.add_argument(
        "--expect", type=int, default=0, help="stop once this many messages came"
    )
    subscriber.add_argument(
        "--forget", action="store_true", help="end the persistent session when done"
    )

    http = roles.add_parser("http")
    http.add_argument("--base-url", required=True)
    http.add_argument("--api-key-file", help="a file holding the API key to send")
    http.add_argument("--endpoint", choices=sorted(ENDPOINTS), required=True)
    http.add_argument("--devices", type=int, default=1000)
    http.add_argument("--duration", type=float, default=10)
    http.add_argument("--concurrency", type=int, default=32)
    http.add_argument("--rate", type=float, default=0, help="open loop requests/s; 0: closed")
    http.add_argument("--max-outstanding", type=int, default=2000)
    http.add_argument("--connections", type=int, default=64, help="open loop: pool size")
    http.add_argument("--request-timeout", type=float, default=10)
    http.add_argument("--seed", type=int, default=1)
    http.add_argument("--client", choices=["httpx", "raw"], default="httpx")

    s3 = roles.add_parser("s3-put")
    s3.add_argument("--endpoint", required=True)
    s3.add_argument("--bucket", required=True)
    s3.add_argument("--access-key", required=True)
    s3.add_argument("--secret-key", required=True)
    s3.add_argument("--region", default="us-east-1")
    s3.add_argument("--concurrency", type=int, default=64)
    s3.add_argument("--duration", type=float, default=10)
    s3.add_argument("--body-bytes", type=int, default=200)

    register = roles.add_parser("register")
    register.add_argument("--database-url", required=True)
    register.add_argument("--count", type=int, required=True)

    history = roles.add_parser("history")
    history.add_argument("--database-url", required=True)
    history.add_argument("--count", type=int, default=100)
    history.add_argument("--hours", type=float, default=1.0)
    history.add_argument("--interval", type=float, default=10.0, help="seconds between readings")
    history.add_argument("--prefix", default="hist", help="device ids: {prefix}-{index:05d}")

    roles.add_parser("inspect")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    # A role must never outlive its harness, whatever it waits for: a hard bound in time.
    watchdog = threading.Timer(args.kill_after, os._exit, args=(3,))
    watchdog.daemon = True
    watchdog.start()
    if args.role == "publish":
        run_publisher(args)
        return
    loop_name = use_fast_loop()
    roles: dict[str, Callable[[argparse.Namespace, str], Coroutine[Any, Any, None]]] = {
        "subscribe": run_subscriber,
        "http": run_http,
        "s3-put": run_s3_puts,
        "register": run_register,
        "history": run_history,
        "inspect": run_inspect,
    }
    asyncio.run(roles[args.role](args, loop_name))


if __name__ == "__main__":
    main()
