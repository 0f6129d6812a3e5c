"""iotmeter under load, against the ceiling of a bare MQTT subscriber measured in the same run.

One command starts what it needs on free loopback ports (Mosquitto, a fresh PostgreSQL database
on the shared server, SeaweedFS for the S3 archive) or uses the URLs it is given, runs iotmeter
as a separate process (`python -m iotmeter serve`), drives it from separate publisher processes
(a raw-socket MQTT client, QoS 1, a few % of a core; with `--rate 0` they stay a window ahead of
what the consumer has taken, since the broker acks a publish once queued) and prints a table;
`--json` (default `bench/results/<time>-<layout>-<archive>.json`) keeps every figure and the
sampled timeline.

    .venv/bin/python bench/harness.py                          # 60 s, 1,000 devices, S3 archive
    .venv/bin/python bench/harness.py --duration 20 --archive local
    .venv/bin/python bench/harness.py --archive-layout segment --publishers 2
    .venv/bin/python bench/harness.py --rate 5000              # latency at a fixed offered rate
    .venv/bin/python bench/harness.py --devices 10000 --devices-registered 10000 --no-api
    .venv/bin/python bench/harness.py --profile 20 --no-api --no-ceiling   # py-spy the app
    .venv/bin/python bench/harness.py --smoke                  # CI: small and quick
    .venv/bin/python bench/harness.py --mode backlog --no-api  # drain 400,000 queued messages

Phases of the steady mode (the default), in order, each bounded in time:
1. S3 small-PUT ceiling (S3 archive on the harness's own SeaweedFS): PutObject of ~200 B at
   concurrency 64; the per-message archive layout cannot beat it.
2. Ceiling: the publishers' load (same settings as phase 3) into a bare aiomqtt subscriber process
   that only counts QoS 1 messages.
3. iotmeter: the same load into the app. Stored messages/s come from `/api/v1/stats`
   (`messages.stored`: in the time-series store and the archive), sampled every 0.5 s; the rate is
   taken over the steady part of the window (after `--warmup`). A probe device publishes its send
   time every `--probe-interval` s and the harness polls `/api/v1/devices/bench-probe/latest`
   until each probe is visible: publish-to-queryable latency. App CPU and RSS are sampled with
   psutil every 0.5 s. After the window the harness waits until stored equals what the broker
   acknowledged (or stops moving): loss = acknowledged - stored, and a SQL count of the stored
   rows checks it independently.
4. API (`--api`, on by default): device get, device list and a 1 h / 1 m telemetry query at a
   fixed concurrency for a fixed time each, then device get open-loop at a fixed offered rate.

The backlog mode (`--mode backlog`) measures a restart after downtime instead: the broker holds
everything published while the collector was away in its persistent session (clean_session
False, a fixed client id), `--backlog` QoS 1 messages (default 400,000 from 1,000 devices; the
same messages as above, published as fast as the broker acks them; `--rate` does not apply).
1. Bare drain (`--ceiling`, on by default): a bare aiomqtt subscriber process creates its
   persistent session and disconnects; the publishers publish the backlog and wait for every
   ack; the subscriber reconnects and counts until it has all of them: its drain rate.
2. iotmeter: the app starts once (its collector's session now exists, `/ready`), stops
   (SIGTERM; SIGKILL after 30 s), the publishers publish the backlog, and the app starts again
   with the same client id and spool folder. From that second start until `/api/v1/stats`
   counts the whole backlog as stored: drain rates from process start and from the
   collector's first message (and from the first stored, which with the segment layout grows
   in steps: every 10 s the archive writes its segments), the ratio to the bare drain, app and
   PostgreSQL CPU, app RSS, loss, and the stored-over-time series (`timeline`).
   `--profile` runs py-spy on the app from (half a second after) its second start.
3. API (`--api`): as above, on the app that drained the backlog.
The harness's Mosquitto keeps every queued message (`max_queued_messages` 100,000,000, no byte
limit, no persistence) and updates `$SYS` every second: the run fails when the broker's
`$SYS/broker/publish/messages/dropped` counter grew during a backlog.

Device authentication (steady mode; 200 devices unless `--devices` says otherwise):

    .venv/bin/python bench/harness.py --device-auth-compare --repeat 2 --duration 45 \
        --archive-layout segment                      # off, on, off, on; rates and ratio on/off
    .venv/bin/python bench/harness.py --device-auth   # one run, auth on
    .venv/bin/python bench/harness.py --per-device-connections   # the same, auth off

`--device-auth` starts Mosquitto with the dynamic-security plugin (`allow_anonymous false`, the
file made by `mosquitto_ctrl dynsec init` with an admin account) and the app under that admin
account with `IOTMETER_MQTT_DEVICE_AUTH=true`, so iotmeter reconciles the broker's device
accounts itself. Before the ceiling, an app start of its own registers every device (and the
probe) with `POST /api/v1/devices`, creates its credential with `POST .../credentials` and waits
until `GET .../credentials` shows `on_broker` for all; that app stops and its collector's
persistent session is ended. The publishers (`harness.py --worker publish-per-device`) then open
one connection per device (client id = username = device id, its password), the probe connects
as its own device, and the bare subscriber uses the admin account; payloads, pacing and the
accounting are those of the normal mode. `--per-device-connections` does all the same on an
anonymous broker with device auth off: the like-for-like baseline. `--device-auth-compare` runs
both (fresh services each time), `--repeat` pairs alternating, without the API and S3 PUT phases
unless asked, and prints each run's table, then the rates, the ratio on / off and the spread
between repeats; the machine's busy CPU and `outside_bench` (CPU that neither the bench nor
PostgreSQL took) show how much else ran meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx
import orjson
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from load import broker_address, device_id  # noqa: E402
from tests.fixtures.services import (  # noqa: E402
    Mosquitto,
    create_pg_database,
    drop_pg_database,
    free_port,
    running_seaweedfs,
    writable_by_mosquitto,
)

LOAD = ROOT / "bench" / "load.py"
HARNESS_WORKER = (str(Path(__file__).resolve()), "--worker")
RESULTS = ROOT / "bench" / "results"
PROBE_DEVICE = "bench-probe"
HISTORY_DEVICES = 100  # devices with a seeded past hour for the API's telemetry test
HISTORY_30D_DEVICES = 10  # devices with 30 seeded days (10 s readings) for the 30 d / 1 h query
SAMPLE_INTERVAL_S = 0.5
S3_ACCESS_KEY = "iotmeter-bench"
S3_SECRET_KEY = "iotmeter-bench-secret"
MB = 1024 * 1024


class HarnessError(RuntimeError):
    """Something the benchmark needs did not work; the message says what."""


# --- small helpers -----------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of `values` (unsorted), or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(-(-fraction * len(ordered) // 1)))
    return ordered[min(rank, len(ordered)) - 1]


def value_at(series: Sequence[tuple[float, float]], instant: float) -> float | None:
    """A counter's value at `instant`, linearly interpolated between the samples around it."""
    if not series:
        return None
    if instant <= series[0][0]:
        return series[0][1]
    for (t0, v0), (t1, v1) in itertools.pairwise(series):
        if t0 <= instant <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (instant - t0) / (t1 - t0)
    return series[-1][1]


def rate_between(series: Sequence[tuple[float, float]], start: float, stop: float) -> float | None:
    """How fast a counter grew between two instants, per second."""
    first, last = value_at(series, start), value_at(series, stop)
    if first is None or last is None or stop <= start:
        return None
    return (last - first) / (stop - start)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def command_version(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip().splitlines()
    return text[0].strip() if text else None


def git_revision(ref: str | None = None) -> str | None:
    """The short commit of `ref`, or of the working tree (with -dirty when it has edits)."""
    revision = command_version(["git", "-C", str(ROOT), "rev-parse", "--short", ref or "HEAD"])
    if revision is None or ref is not None:
        return revision
    status = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return revision + ("-dirty" if status.stdout.strip() else "")


def round_or_none(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# --- services ----------------------------------------------------------------------------------


BENCH_MAX_QUEUED_MESSAGES = 100_000_000


# The backlog mode's broker: `$SYS` every second instead of every ten (the harness reads the
# dropped counter after each backlog) and, spelled out, no byte limit on a session's queue.
BACKLOG_BROKER_CONFIG = ("max_queued_bytes 0", "sys_interval 1")


# The broker account iotmeter administers the dynamic-security plugin with (device-auth modes);
# iotmeter gives it its service role on the first pass.
BENCH_BROKER_ADMIN = "iotmeter"


@contextlib.contextmanager
def running_bench_mosquitto(
    workdir: Path, backlog: bool = False, dynsec_admin: tuple[str, str] | None = None
) -> Iterator[Mosquitto]:
    """The test suite's private Mosquitto, tuned for load: 1,000 in flight, no persistence,
    and a queue the whole run's backlog fits in (the collector's persistent session must never
    lose a message to it). With `backlog`, `$SYS` every second (`BACKLOG_BROKER_CONFIG`).
    With `dynsec_admin` (user, password): the dynamic-security plugin, anonymous access off."""
    if shutil.which("mosquitto") is None:
        raise HarnessError("mosquitto is not installed (apt-get install mosquitto)")
    writable_by_mosquitto(workdir)
    broker = Mosquitto(
        port=free_port(),
        workdir=workdir,
        persistence=False,
        max_queued_messages=BENCH_MAX_QUEUED_MESSAGES,
        max_inflight_messages=1000,
        extra_config=BACKLOG_BROKER_CONFIG if backlog else (),
        dynsec_admin=dynsec_admin,
    )
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@dataclass
class Services:
    mqtt_url: str  # the app's, the bare subscriber's (with device auth: the dynsec admin's)
    database_url: str
    s3: dict[str, str] | None  # endpoint, access_key, secret_key, bucket
    influx: dict[str, str] | None
    owned_s3: bool
    pids: dict[str, int]
    describe: dict[str, str]
    device_url: str = ""  # the broker without credentials: devices bring their own


def without_credentials(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"


async def open_services(args: argparse.Namespace, workdir: Path, stack: AsyncExitStack) -> Services:
    """Start (or take from the options) the broker, the database and the S3 server."""
    sync = ExitStack()
    stack.push_async_callback(asyncio.to_thread, sync.close)
    pids: dict[str, int] = {}
    describe: dict[str, str] = {}
    if args.mqtt_url:
        mqtt_url = args.mqtt_url
        describe["mqtt"] = f"given: {mqtt_url.split('@')[-1]}"
    else:
        if args.device_auth or args.per_device_connections:
            # The broker, running as `mosquitto`, reads its dynsec file there: the run's own
            # folder (root's, 0700) is out of its reach. Both variants alike.
            folder = Path(tempfile.mkdtemp(prefix="iotmeter-bench-mosquitto-"))
            sync.callback(shutil.rmtree, folder, ignore_errors=True)
        else:
            folder = workdir / "mosquitto"
            folder.mkdir()
        backlog = args.mode == "backlog"
        admin = (BENCH_BROKER_ADMIN, uuid.uuid4().hex) if args.device_auth else None
        broker = await asyncio.to_thread(
            sync.enter_context, running_bench_mosquitto(folder, backlog, admin)
        )
        mqtt_url = broker.admin_url if admin else broker.url
        assert broker.process is not None
        pids["broker"] = broker.process.pid
        version = command_version(["mosquitto", "-h"]) or "mosquitto"
        describe["mqtt"] = f"{version}, own instance on {broker.url} (max_inflight_messages 1000"
        if admin:
            describe["mqtt"] += (
                f", dynamic-security plugin, allow_anonymous false, admin {BENCH_BROKER_ADMIN}"
            )
        if backlog:
            describe["mqtt"] += (
                f", max_queued_messages {BENCH_MAX_QUEUED_MESSAGES:,}, max_queued_bytes 0, "
                "no persistence, sys_interval 1"
            )
        describe["mqtt"] += ")"

    if args.database_url:
        database_url = args.database_url
        describe["database"] = f"given: {database_url.split('@')[-1]}"
    else:
        database_url = await create_pg_database("iotmeter_bench")
        if not args.keep_database:
            stack.push_async_callback(drop_pg_database, database_url)
        describe["database"] = f"fresh database {database_url.rsplit('/', 1)[-1]}"

    s3: dict[str, str] | None = None
    owned_s3 = False
    if args.archive == "s3":
        bucket = args.s3_bucket or f"iotmeter-bench-{uuid.uuid4().hex[:8]}"
        if args.s3_endpoint:
            s3 = {
                "endpoint": args.s3_endpoint,
                "access_key": args.s3_access_key or S3_ACCESS_KEY,
                "secret_key": args.s3_secret_key or S3_SECRET_KEY,
                "bucket": bucket,
            }
            describe["archive"] = f"S3 given: {args.s3_endpoint}, bucket {bucket}"
        else:
            server = await asyncio.to_thread(sync.enter_context, running_seaweedfs())
            assert server.process is not None
            pids["s3"] = server.process.pid
            s3 = {
                "endpoint": server.endpoint_url,
                "access_key": S3_ACCESS_KEY,
                "secret_key": S3_SECRET_KEY,
                "bucket": bucket,
            }
            owned_s3 = True
            version = command_version([weed_path(), "version"]) or "SeaweedFS"
            describe["archive"] = f"S3: {version}, own instance on {server.endpoint_url}"
    else:
        describe["archive"] = "local folder (in the run's temporary folder)"

    influx = None
    if args.influx_url:
        if not args.influx_token:
            raise HarnessError("--influx-url needs --influx-token")
        influx = {
            "url": args.influx_url,
            "token": args.influx_token,
            "org": args.influx_org,
            "bucket": args.influx_bucket,
        }
        describe["timeseries"] = f"InfluxDB given: {args.influx_url}"
    else:
        describe["timeseries"] = "SQL (the PostgreSQL database)"
    return Services(
        mqtt_url, database_url, s3, influx, owned_s3, pids, describe, without_credentials(mqtt_url)
    )


def weed_path() -> str:
    return shutil.which("weed") or str(Path(sys.executable).parent / "weed")


# --- load processes ----------------------------------------------------------------------------


class Worker:
    """One `bench/load.py` process, speaking JSON lines."""

    started: ClassVar[
        list[Worker]
    ] = []  # every worker of the run, killed at the end whatever happens

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log
        self.ready = asyncio.Event()
        self.finished = asyncio.Event()
        self.progress: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None
        self._reader = asyncio.create_task(self._read())
        Worker.started.append(self)

    @classmethod
    async def start(
        cls,
        name: str,
        role: str,
        options: Iterable[str],
        workdir: Path,
        kill_after: float,
        env: dict[str, str] | None = None,
        script: Sequence[str] = (str(LOAD),),
    ) -> Worker:
        """`script` (default `bench/load.py`) with its role; `HARNESS_WORKER` runs one of this
        file's own roles (`publish-per-device`)."""
        log = workdir / f"{name}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                *script,
                "--kill-after",
                f"{kill_after:.0f}",
                role,
                *options,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=env,
                limit=1 << 26,  # the HTTP role's final line holds every latency
            )
        return cls(name, process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            try:
                data = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if data.get("ready"):
                self.info = data
                self.ready.set()
            elif data.get("done"):
                self.final = data
            else:
                self.progress.append(data)
        self.finished.set()

    def failure(self, what: str) -> HarnessError:
        return HarnessError(f"{self.name} {what}; its log ({self.log}):\n{tail(self.log)}")

    async def wait_ready(self, within: float = 30) -> None:
        waits = [asyncio.create_task(self.ready.wait()), asyncio.create_task(self.finished.wait())]
        done, pending = await asyncio.wait(
            waits, timeout=within, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if not self.ready.is_set():
            raise self.failure("did not get ready" if not done else "exited before it was ready")

    def send(self, line: str) -> None:
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.write(line.encode() + b"\n")

    async def wait_done(self, within: float) -> dict[str, Any]:
        try:
            await asyncio.wait_for(self.finished.wait(), within)
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            await self.kill()
            raise self.failure(f"did not finish within {within:.0f} s") from None
        if self.final is None:
            raise self.failure(f"exited with {self.process.returncode} without a result")
        return self.final

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 10)


def series_of(worker: Worker, key: str) -> list[tuple[float, float]]:
    return [(line["t"], float(line[key])) for line in worker.progress if key in line]


# --- one connection per device (the device-auth modes) -----------------------------------------

PER_DEVICE_ROLE = "publish-per-device"
MAX_CONNECTIONS_PER_PUBLISHER = 900  # RawPublisher.send waits with select(): fds below 1024


class DeviceConnections:
    """This process's devices, each on its own `load.RawPublisher` connection (client id =
    username = device id, the device's password), and their PUBACKs read over one selector."""

    def __init__(self, host: str, port: int, passwords: dict[str, str | None]) -> None:
        from load import RawPublisher

        self.clients: list[Any] = []
        self.selector = selectors.DefaultSelector()
        for device in passwords:
            client = RawPublisher(host, port, device)
            try:
                client.connect(device, passwords[device])
            except SystemExit as exc:
                raise SystemExit(f"device {device}: {exc}") from None
            self.selector.register(client.sock, selectors.EVENT_READ, client)
            self.clients.append(client)

    @property
    def acked(self) -> int:
        return sum(client.acked for client in self.clients)

    def read_acks(self, wait_s: float) -> None:
        """Count the PUBACKs that arrived on any connection; wait up to `wait_s` for one."""
        for key, _events in self.selector.select(wait_s):
            key.data.read_acks(0.0)

    def close(self) -> None:
        self.selector.close()
        for client in self.clients:
            client.close()


def run_per_device_publisher(args: argparse.Namespace) -> None:
    """`load.py publish`, with one connection per device instead of one for all: the same
    devices (d % count == index), messages dealt round-robin over them, the same payloads,
    pacing (`--rate`, or `--window` ahead of what the consumer took) and progress lines."""
    from load import (
        PROGRESS_INTERVAL_S,
        ConsumedCounter,
        cpu_seconds,
        emit,
        message_share,
        sleep_until,
        telemetry_payload,
        wait_for_go,
    )

    host, port, _username, _password = broker_address(args.mqtt_url)
    passwords: dict[str, str | None] = orjson.loads(Path(args.passwords_file).read_bytes())
    devices = [device_id(d) for d in range(args.index, args.devices, args.count)]
    if not devices:
        raise SystemExit(f"publisher {args.index}: no devices (devices={args.devices})")
    if len(devices) > MAX_CONNECTIONS_PER_PUBLISHER:
        raise SystemExit(
            f"publisher {args.index}: {len(devices)} connections; at most "
            f"{MAX_CONNECTIONS_PER_PUBLISHER} per process (use more --publishers)"
        )
    connect_started = time.time()
    connections = DeviceConnections(host, port, {d: passwords.get(d) for d in devices})
    connect_s = time.time() - connect_started
    clients = connections.clients
    topics = [f"iot/{d}/telemetry".encode() for d in devices]
    topics = [len(topic).to_bytes(2, "big") + topic for topic in topics]
    emit(ready=True, connections=len(clients), connect_s=connect_s)
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
            emit(t=now, published=published, acked=connections.acked)
            next_progress += PROGRESS_INTERVAL_S
        if rate > 0:
            due = int((now - start) * rate) + 1
            if published >= due:
                connections.read_acks(min(0.002, (published + 1) / rate - (now - start)))
                continue
            burst = min(due - published, 200)
        else:
            connections.read_acks(0.0)
            acked = connections.acked
            taken = acked if quota is not None else min(acked, consumed.share)
            ahead = published - taken
            if ahead >= args.window:
                connections.read_acks(0.002)
                continue
            burst = min(args.window - ahead, 200)
        if quota is not None:
            burst = min(burst, quota - published)
        by_device: dict[int, list[bytes]] = {}
        for _ in range(burst):
            slot = published % device_count
            sequence = published // device_count
            by_device.setdefault(slot, []).append(
                clients[slot].packet(
                    topics[slot],
                    telemetry_payload(sequence, prefix + str(published), time.time_ns() // 1000),
                )
            )
            published += 1
        for slot, packets in by_device.items():
            clients[slot].send(packets)
        if first_publish is None:
            first_publish = now
        last_publish = time.time()
    publish_cpu = cpu_seconds() - cpu_start
    deadline = time.time() + args.ack_timeout
    while connections.acked < published and time.time() < deadline:
        if time.time() >= next_progress:
            emit(t=time.time(), published=published, acked=connections.acked)
            next_progress += PROGRESS_INTERVAL_S
        connections.read_acks(0.01)
    acked_at = time.time()
    acked = connections.acked
    emit(t=acked_at, published=published, acked=acked)
    connections.close()
    emit(
        done=True,
        published=published,
        acked=acked,
        first_publish=first_publish,
        last_publish=last_publish,
        acked_at=acked_at,
        publish_cpu_s=publish_cpu,
        devices=device_count,
        connections=len(clients),
        connect_s=connect_s,
    )


def run_worker(argv: Sequence[str]) -> int:
    """This file's own worker roles (started as `harness.py --worker ...`), as `load.py`'s."""
    parser = argparse.ArgumentParser(prog="harness.py --worker")
    parser.add_argument("--kill-after", type=float, default=900)
    roles = parser.add_subparsers(dest="role", required=True)
    publisher = roles.add_parser(PER_DEVICE_ROLE)
    publisher.add_argument("--mqtt-url", required=True, help="the broker (credentials ignored)")
    publisher.add_argument(
        "--passwords-file", required=True, help="JSON: device id -> password (null: none)"
    )
    publisher.add_argument("--index", type=int, default=0)
    publisher.add_argument("--count", type=int, default=1)
    publisher.add_argument("--devices", type=int, default=200)
    publisher.add_argument("--duration", type=float, default=60)
    publisher.add_argument("--rate", type=float, default=0)
    publisher.add_argument("--window", type=int, default=20000)
    publisher.add_argument("--ack-timeout", type=float, default=60)
    publisher.add_argument("--messages", type=int, default=0)
    args = parser.parse_args(argv)
    # Never outlive the harness, whatever it waits for (as load.py's roles).
    watchdog = threading.Timer(args.kill_after, os._exit, args=(3,))
    watchdog.daemon = True
    watchdog.start()
    run_per_device_publisher(args)
    return 0


# --- measuring processes -----------------------------------------------------------------------


class Meter:
    """CPU seconds per group of processes (monotonic even when a process exits) and the app's
    RSS; also the machine's busy CPU, to show how much the rest of the machine took."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[int, psutil.Process]] = {}
        self.last_cpu: dict[str, dict[int, float]] = {}
        self.scan_postgres = True

    def add(self, group: str, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            self.groups.setdefault(group, {})[pid] = psutil.Process(pid)
            self.last_cpu.setdefault(group, {})

    def _refresh_postgres(self) -> None:
        found = self.groups.setdefault("postgres", {})
        self.last_cpu.setdefault("postgres", {})
        for process in psutil.process_iter(["name"]):
            if process.info["name"] in ("postgres", "postmaster") and process.pid not in found:
                found[process.pid] = process

    def sample(self) -> dict[str, float]:
        if self.scan_postgres:
            self._refresh_postgres()
        cpu: dict[str, float] = {}
        for group, processes in self.groups.items():
            seen = self.last_cpu[group]
            for pid, process in list(processes.items()):
                try:
                    times = process.cpu_times()
                    seen[pid] = times.user + times.system
                except psutil.Error:
                    del processes[pid]  # gone: keep its last CPU seconds
            cpu[group] = sum(seen.values())
        disks = psutil.disk_io_counters()
        if disks is not None and hasattr(disks, "busy_time"):
            # Milliseconds the disks were busy, as CPU seconds are: a rate of 1.0 = 100 %.
            cpu["disk_busy"] = disks.busy_time / 1000
        machine = psutil.cpu_times()
        cpu["machine_busy"] = (
            machine.user
            + machine.system
            + machine.nice
            + machine.irq
            + (machine.softirq + machine.steal)
        )
        # Interrupt work (loopback networking, disk completions) belongs to no process;
        # steal is time the hypervisor gave to other guests.
        cpu["machine_irq"] = machine.irq + machine.softirq
        cpu["machine_steal"] = machine.steal
        return cpu

    def known_pids(self) -> set[int]:
        return {pid for group in self.last_cpu.values() for pid in group}


MACHINE_KEYS = ("machine_busy", "machine_irq", "machine_steal", "disk_busy")


def process_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds of every process on the machine, with its command line."""
    result: dict[int, tuple[str, float]] = {}
    for process in psutil.process_iter(["cmdline", "name", "cpu_times"]):
        times = process.info["cpu_times"]
        if times is None:
            continue
        command = " ".join(process.info["cmdline"] or []) or process.info["name"] or "?"
        result[process.pid] = (command[:120], times.user + times.system)
    return result


def top_outside(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    seconds: float,
    known: set[int],
    top: int = 5,
) -> list[dict[str, Any]]:
    """The processes outside the bench that took the most CPU between two snapshots."""
    used = []
    for pid, (command, cpu) in after.items():
        if pid in known or "postgres" in command.split(" ", 1)[0]:
            continue
        delta = cpu - before.get(pid, (command, 0.0))[1]
        if delta > 0.01 * seconds:
            used.append(
                {"pid": pid, "cpu_percent": round(100 * delta / seconds, 1), "command": command}
            )
    return sorted(used, key=lambda entry: -entry["cpu_percent"])[:top]


def peak_rss_mb(pid: int) -> float | None:
    """The kernel's high-water mark of the process's RSS (VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Sample:
    t: float
    cpu: dict[str, float]
    rss_mb: float | None = None
    stored: int | None = None
    received: int | None = None
    rejected: int | None = None
    spool_depth: int | None = None
    lag_by_sink: dict[str, int] | None = None
    intake_held_s: float | None = None
    stats_request_s: float | None = None  # how long GET /api/v1/stats took (or failed after)


class Sampler:
    """Every 0.5 s: CPU of every group, the app's RSS and (when the app runs) its counters."""

    def __init__(self, meter: Meter, app_pid: int | None, api: httpx.AsyncClient | None) -> None:
        self.meter = meter
        self.app_pid = app_pid
        self.api = api
        self.samples: list[Sample] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        app = psutil.Process(self.app_pid) if self.app_pid else None
        next_at = time.time()
        while True:
            sample = await self.take(app)
            self.samples.append(sample)
            next_at += SAMPLE_INTERVAL_S
            await asyncio.sleep(max(0.0, next_at - time.time()))

    async def take(self, app: psutil.Process | None = None) -> Sample:
        before = time.time()
        sample = Sample(t=before, cpu=self.meter.sample())
        if app is not None:
            with contextlib.suppress(psutil.Error):
                sample.rss_mb = app.memory_info().rss / MB
        if self.api is not None:
            try:
                response = await self.api.get("/api/v1/stats", timeout=5)
                body = response.json()
            except (httpx.HTTPError, ValueError):
                sample.stats_request_s = time.time() - before
                return sample
            sample.stats_request_s = time.time() - before
            # The counters were read somewhere during the request: take its middle.
            sample.t = (before + time.time()) / 2
            messages = body.get("messages", {})
            sample.stored = messages.get("stored")
            sample.received = messages.get("received")
            sample.rejected = messages.get("rejected")
            spool = body.get("spool") or {}
            sample.spool_depth = spool.get("depth")
            sample.lag_by_sink = spool.get("lag_by_sink")
            sample.intake_held_s = spool.get("intake_held_s")
        return sample

    def cpu_series(self, group: str) -> list[tuple[float, float]]:
        return [(s.t, s.cpu[group]) for s in self.samples if group in s.cpu]

    def series(self, attribute: str) -> list[tuple[float, float]]:
        return [
            (s.t, float(getattr(s, attribute)))
            for s in self.samples
            if getattr(s, attribute) is not None
        ]

    def cpu_percent(self, group: str, start: float, stop: float) -> float | None:
        rate = rate_between(self.cpu_series(group), start, stop)
        return None if rate is None else rate * 100


# --- the latency probe -------------------------------------------------------------------------


def device_client_options(
    mqtt_url: str, identity: tuple[str, str | None] | None, prefix: str
) -> dict[str, Any]:
    """aiomqtt.Client options of a probe device: with `identity` (device id, password) it
    connects as that device (client id = username = device id), else under the URL's
    credentials with a client id of its own."""
    host, port, username, password = broker_address(mqtt_url)
    if identity is not None:
        return {
            "hostname": host,
            "port": port,
            "username": identity[0],
            "password": identity[1],
            "identifier": identity[0],
        }
    return {
        "hostname": host,
        "port": port,
        "username": username,
        "password": password,
        "identifier": f"{prefix}-{uuid.uuid4().hex[:8]}",
    }


class Probe:
    """A device that publishes its send time every `interval` s; the poller finds each message
    through the API and notes when it became visible."""

    def __init__(
        self,
        mqtt_url: str,
        interval: float,
        poll_interval: float,
        identity: tuple[str, str | None] | None = None,
    ) -> None:
        self.mqtt_url = mqtt_url
        self.identity = identity
        self.interval = interval
        self.poll_interval = poll_interval
        self.sent_at: dict[int, float] = {}
        self.visible_at: dict[int, float] = {}
        self.acked = 0
        self.polls = 0
        self.poll_errors = 0

    async def publish(self, start: float, stop: float) -> None:
        import aiomqtt

        options = device_client_options(self.mqtt_url, self.identity, "bench-probe")
        async with aiomqtt.Client(**options, timeout=10) as client:
            await asyncio.sleep(max(0.0, start - time.time()))
            sequence = 0
            while time.time() < stop:
                sequence += 1
                sent = time.time()
                payload = orjson.dumps(
                    {
                        "ts": time.time_ns() // 1000,
                        "seq": sequence,
                        "type": "bench",
                        "metrics": {"probe_seq": sequence},
                    }
                )
                self.sent_at[sequence] = sent
                await client.publish(f"iot/{PROBE_DEVICE}/telemetry", payload, qos=1)
                self.acked += 1
                await asyncio.sleep(max(0.0, sent + self.interval - time.time()))

    async def poll(self, api: httpx.AsyncClient, stop: asyncio.Event) -> None:
        """Until stopped: while a sent probe is not yet visible, ask for the latest value."""
        newest_seen = 0
        path = f"/api/v1/devices/{PROBE_DEVICE}/latest"
        while not stop.is_set():
            if self.sent_at and max(self.sent_at) > newest_seen:
                self.polls += 1
                try:
                    response = await api.get(path, timeout=10)
                except httpx.HTTPError:
                    self.poll_errors += 1
                else:
                    now = time.time()
                    if response.status_code == 200:
                        value = response.json()["fields"].get("probe_seq", {}).get("value")
                        newest = int(value) if value is not None else 0
                        # Probes reach the store in order: up to the newest, all are visible.
                        for sequence in range(newest_seen + 1, newest + 1):
                            self.visible_at.setdefault(sequence, now)
                        newest_seen = max(newest_seen, newest)
            await asyncio.sleep(self.poll_interval)

    def latencies_ms(self, start: float, stop: float) -> list[float]:
        return [
            (self.visible_at[sequence] - sent) * 1000
            for sequence, sent in self.sent_at.items()
            if start <= sent <= stop and sequence in self.visible_at
        ]

    def summary(self, start: float, stop: float) -> dict[str, Any]:
        latencies = self.latencies_ms(start, stop)
        sent = [s for s, at in self.sent_at.items() if start <= at <= stop]
        return {
            "p50_ms": round_or_none(percentile(latencies, 0.50)),
            "p99_ms": round_or_none(percentile(latencies, 0.99)),
            "max_ms": round_or_none(max(latencies) if latencies else None),
            "samples": len(latencies),
            "probes_sent": len(sent),
            "never_visible": sum(1 for s in sent if s not in self.visible_at),
            "probe_interval_s": self.interval,
            "poll_interval_s": self.poll_interval,
            "polls": self.polls,
            "poll_errors": self.poll_errors,
        }


# --- alerting: rules to evaluate, and the breach-to-webhook latency -----------------------------

ALERT_DEVICE = "bench-alert"


def alert_rule_bodies(count: int, devices: int) -> list[dict[str, Any]]:
    """`count` rules spread over the kinds and scopes, on the bench devices' fields, set so that
    they evaluate every reading and rarely fire: 40% threshold, 20% rate of change, 20% anomaly,
    10% no data (one device each), 10% threshold on every device of type `bench`."""
    fields = ("temperature", "humidity", "voltage", "power")
    bodies: list[dict[str, Any]] = []
    for n in range(count):
        device = f"bench-{(n * 37) % max(1, devices):05d}"
        field = fields[n % len(fields)]
        slot = n % 10
        body: dict[str, Any] = {"name": f"bench rule {n}", "severity": "info"}
        if slot < 4:
            body.update(
                kind="threshold",
                device_id=device,
                field=field,
                operator=">",
                threshold=1e9,
                duration_s=30,
                hysteresis=1.0,
            )
        elif slot < 6:
            body.update(
                kind="rate_of_change", device_id=device, field=field, operator=">", threshold=1e9
            )
        elif slot < 8:
            body.update(
                kind="anomaly", device_id=device, field=field, k=50.0, half_life=100, warmup=50
            )
        elif slot < 9:
            body.update(kind="no_data", device_id=device, timeout_s=600)
        else:
            body.update(
                kind="threshold",
                device_type="bench",
                field=field,
                operator="outside",
                low=-1e9,
                high=1e9,
            )
        bodies.append(body)
    return bodies


class AlertProbe:
    """A device whose value crosses a rule's threshold every `interval` s (up, then down); a
    local webhook receiver notes when each `alert.fired` arrives: breach-to-webhook latency."""

    def __init__(
        self, mqtt_url: str, interval: float, identity: tuple[str, str | None] | None = None
    ) -> None:
        self.mqtt_url = mqtt_url
        self.identity = identity
        self.interval = interval
        self.fired_sent_at: dict[int, float] = {}
        """Device time (epoch us) of each breaching message -> when it was published."""
        self.arrived_at: dict[int, float] = {}
        self.webhooks = 0
        self.port = 0
        self._runner: Any = None

    async def serve(self) -> str:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            body = orjson.loads(await request.read())
            now = time.time()
            self.webhooks += 1
            data = body.get("data", {})
            if body.get("type") == "alert.fired" and data.get("device_id") == ALERT_DEVICE:
                first = data.get("first_breach_at")
                if first:
                    moment = datetime.fromisoformat(first.replace("Z", "+00:00"))
                    self.arrived_at.setdefault(round(moment.timestamp() * 1_000_000), now)
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook", handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return f"http://127.0.0.1:{self.port}/hook"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def publish(self, start: float, stop: float) -> None:
        import aiomqtt

        options = device_client_options(self.mqtt_url, self.identity, "bench-alert")
        async with aiomqtt.Client(**options, timeout=10) as client:
            await asyncio.sleep(max(0.0, start - time.time()))
            high = False
            while time.time() < stop:
                high = not high
                sent = time.time()
                ts = time.time_ns() // 1000
                payload = orjson.dumps(
                    {"ts": ts, "type": "bench", "metrics": {"v": 1.0 if high else 0.0}}
                )
                if high:
                    self.fired_sent_at[ts] = sent
                await client.publish(f"iot/{ALERT_DEVICE}/telemetry", payload, qos=1)
                await asyncio.sleep(max(0.0, sent + self.interval - time.time()))

    def summary(self, start: float, stop: float) -> dict[str, Any]:
        latencies = [
            (self.arrived_at[ts] - sent) * 1000
            for ts, sent in self.fired_sent_at.items()
            if start <= sent <= stop and ts in self.arrived_at
        ]
        sent = [ts for ts, at in self.fired_sent_at.items() if start <= at <= stop]
        return {
            "p50_ms": round_or_none(percentile(latencies, 0.50)),
            "p99_ms": round_or_none(percentile(latencies, 0.99)),
            "max_ms": round_or_none(max(latencies) if latencies else None),
            "breaches_sent": len(sent),
            "webhooks_received": sum(1 for ts in sent if ts in self.arrived_at),
            "webhooks_all": self.webhooks,
        }


async def create_alerting(
    run: Run, api: httpx.AsyncClient, probe: AlertProbe | None
) -> dict[str, Any]:
    """The rules (and the probe's rule and channel) through the API, before the load."""
    created = 0
    for body in alert_rule_bodies(run.args.alert_rules, run.args.devices):
        response = await api.post("/api/v1/alert-rules", json=body)
        if response.status_code != 201:
            raise HarnessError(f"creating an alert rule: {response.status_code} {response.text}")
        created += 1
    if probe is not None:
        url = await probe.serve()
        rule = await api.post(
            "/api/v1/alert-rules",
            json={
                "name": "bench probe",
                "kind": "threshold",
                "device_id": ALERT_DEVICE,
                "field": "v",
                "operator": ">",
                "threshold": 0.5,
                "severity": "critical",
            },
        )
        if rule.status_code != 201:
            raise HarnessError(f"creating the probe rule: {rule.status_code} {rule.text}")
        channel = await api.post(
            "/api/v1/channels",
            json={"name": "bench", "kind": "webhook", "url": url, "rule_ids": [rule.json()["id"]]},
        )
        if channel.status_code != 201:
            raise HarnessError(f"creating the channel: {channel.status_code} {channel.text}")
    return {"rules": created, "probe": probe is not None}


# --- the app -----------------------------------------------------------------------------------


def app_environment(args: argparse.Namespace, services: Services, workdir: Path) -> dict[str, str]:
    # Only what the harness sets: a developer's own IOTMETER_* must not leak into the run.
    env = {name: value for name, value in os.environ.items() if not name.startswith("IOTMETER_")}
    env.update(
        {
            "IOTMETER_DATABASE_URL": services.database_url,
            "IOTMETER_DATABASE_AUTO_MIGRATE": "false",
            "IOTMETER_MQTT_URL": services.mqtt_url,
            # The backlog mode starts the app twice: both starts get this same id (and spool
            # folder), so the second resumes the first one's persistent session.
            "IOTMETER_MQTT_CLIENT_ID": (
                f"iotmeter-bench-{'backlog-' if args.mode == 'backlog' else ''}"
                f"{uuid.uuid4().hex[:8]}"
            ),
            "IOTMETER_MQTT_MAX_INFLIGHT": "1000",
            "IOTMETER_SPOOL_DIR": str(workdir / "spool"),
            "IOTMETER_ARCHIVE_DIR": str(workdir / "archive"),
            "IOTMETER_ARCHIVE_LAYOUT": args.archive_layout,
            "IOTMETER_COLLECTOR_ENABLED": "true",
            "IOTMETER_SIMULATOR_ENABLED": "false",
            "IOTMETER_LOG_LEVEL": args.app_log_level,
            # The first start writes its admin key here (older commits ignore it).
            "IOTMETER_AUTH_BOOTSTRAP_FILE": str(workdir / "admin.key"),
            # The API phase measures capacity: no rate limit in the way.
            "IOTMETER_RATE_LIMIT_PER_KEY": "",
            "IOTMETER_RATE_LIMIT_PER_ADDRESS": "",
            # The alert latency probe's receiver listens on loopback.
            "IOTMETER_WEBHOOK_ALLOW_PRIVATE": "true",
        }
    )
    if args.device_auth or args.per_device_connections:
        env.update(
            {
                # Explicit either way: the two variants of a comparison differ in this alone
                # (and in the broker's plugin).
                "IOTMETER_MQTT_DEVICE_AUTH": "true" if args.device_auth else "false",
                # Passwords are derived from it: one per run, none left in a data folder.
                "IOTMETER_DEVICE_CREDENTIAL_SECRET": uuid.uuid4().hex,
            }
        )
    if services.s3 is not None:
        env.update(
            {
                "IOTMETER_S3_ENDPOINT_URL": services.s3["endpoint"],
                "IOTMETER_S3_ACCESS_KEY": services.s3["access_key"],
                "IOTMETER_S3_SECRET_KEY": services.s3["secret_key"],
                "IOTMETER_S3_BUCKET": services.s3["bucket"],
            }
        )
    if services.influx is not None:
        env.update(
            {
                "IOTMETER_INFLUX_URL": services.influx["url"],
                "IOTMETER_INFLUX_TOKEN": services.influx["token"],
                "IOTMETER_INFLUX_ORG": services.influx["org"],
                "IOTMETER_INFLUX_BUCKET": services.influx["bucket"],
            }
        )
    for assignment in args.app_env:
        name, _, value = assignment.partition("=")
        if not name.startswith("IOTMETER_"):
            raise HarnessError(f"--app-env {assignment!r}: expected IOTMETER_NAME=value")
        env[name] = value
    return env


async def export_app_source(ref: str, workdir: Path) -> Path:
    """The app's code at a git revision (`git archive`), so that edits in progress in the
    working tree do not change what is measured; returns the folder to put on PYTHONPATH."""
    target = workdir / "app-source"
    target.mkdir()
    archive = await asyncio.create_subprocess_exec(
        "git",
        "-C",
        str(ROOT),
        "archive",
        "--format=tar",
        ref,
        "src",
        "migrations",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    tar, error = await asyncio.wait_for(archive.communicate(), 60)
    if archive.returncode != 0:
        raise HarnessError(f"git archive {ref}: {error.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(tar)) as bundle:
        bundle.extractall(target, filter="data")
    return target / "src"


async def inspect_app(run: Run, env: dict[str, str]) -> dict[str, Any]:
    worker = await Worker.start("inspect", "inspect", [], run.workdir, 60, env)
    final = await worker.wait_done(60)
    return {
        "version": final["version"],
        "source": final["source"],
        "archive_layout_setting": final["archive_layout_setting"],
    }


async def migrate(env: dict[str, str], workdir: Path) -> None:
    """`iotmeter migrate`, with the app's own code and settings."""
    log = workdir / "migrate.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "iotmeter",
            "migrate",
            env=env,
            cwd=workdir,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        await asyncio.wait_for(process.wait(), 120)
    except TimeoutError:
        process.kill()
        await process.wait()
    if process.returncode != 0:
        raise HarnessError(f"iotmeter migrate failed ({process.returncode}):\n{tail(log)}")


@dataclass
class App:
    process: asyncio.subprocess.Process
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def key_file(self) -> Path | None:
        """The admin key the app wrote at its first start (None for commits without auth)."""
        path = self.log.parent / "admin.key"
        return path if path.exists() else None

    @property
    def headers(self) -> dict[str, str]:
        key_file = self.key_file
        return {"Authorization": f"Bearer {key_file.read_text().strip()}"} if key_file else {}

    def failure(self, what: str) -> HarnessError:
        return HarnessError(f"iotmeter {what}; the end of its log ({self.log}):\n{tail(self.log)}")


async def start_app(
    env: dict[str, str], workdir: Path, stack: AsyncExitStack, log_name: str = "iotmeter.log"
) -> App:
    app = await spawn_app(env, workdir, stack, log_name)
    await wait_ready(app)
    return app


async def spawn_app(
    env: dict[str, str], workdir: Path, stack: AsyncExitStack, log_name: str = "iotmeter.log"
) -> App:
    """`iotmeter serve` on a free port, not waiting for it; stopped when `stack` closes."""
    port = free_port()
    log = workdir / log_name
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "iotmeter",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env=env,
            cwd=workdir,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )
    app = App(process, port, log)
    stack.push_async_callback(stop_app, app)
    return app


async def wait_ready(app: App, within: float = 90) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=app.base_url, timeout=5, headers=app.headers) as client:
        while True:
            if app.process.returncode is not None:
                raise app.failure(f"exited with {app.process.returncode} while starting")
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get("/ready")
                if response.status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise app.failure(f"was not ready (GET /ready) within {within:.0f} s")
            await asyncio.sleep(0.2)


async def stop_app(app: App) -> str:
    """SIGTERM, as a service manager would; uvicorn shuts down, then re-raises the signal."""
    if app.process.returncode is not None:
        return f"had exited with {app.process.returncode}"
    app.process.terminate()
    try:
        await asyncio.wait_for(app.process.wait(), 30)
    except TimeoutError:
        app.process.kill()
        await app.process.wait()
        return "killed: no exit within 30 s of SIGTERM"
    return (
        "graceful"
        if app.process.returncode in (0, -signal.SIGTERM)
        else (f"exited with {app.process.returncode}")
    )


async def count_stored_rows(database_url: str, since_us: int) -> int:
    """Bench messages in the SQL time-series store (one `temperature` row each, keyed by
    device and time, so a redelivered duplicate is one row)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    scheme, _, rest = database_url.partition("://")
    if scheme in ("postgres", "postgresql"):
        scheme = "postgresql+asyncpg"
    elif scheme == "sqlite":
        scheme = "sqlite+aiosqlite"
    engine = create_async_engine(f"{scheme}://{rest}")
    try:
        async with engine.connect() as connection:
            sql = (
                "SELECT count(*) FROM telemetry WHERE field = 'temperature' "
                "AND epoch_us >= :since AND device_id LIKE 'bench-%'"
            )
            if (
                scheme.startswith("postgresql")
                and (
                    await connection.execute(text("SELECT to_regclass('telemetry_compact')"))
                ).scalar()
            ):
                # Hours compacted in the background are points too, read as the app reads
                # them (an app before compaction has no such table).
                from iotmeter.storage.timeseries.points import raw_and_compact

                points = raw_and_compact(
                    compact=True,
                    raw_where="r.field = 'temperature' AND r.epoch_us >= :since "
                    "AND r.device_id LIKE 'bench-%'",
                    compact_where="c.field = 'temperature' AND c.device_id LIKE 'bench-%'",
                    start=":since",
                    stop=str(2**62),
                )
                sql = f"SELECT count(*) FROM {points}"
            result = await connection.execute(text(sql), {"since": since_us})
            return int(result.scalar_one())
    finally:
        await engine.dispose()


# --- profiling ---------------------------------------------------------------------------------


def py_spy_path() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def profile_app(
    pid: int, seconds: float, output: Path, start_at: float, meter: Meter
) -> dict[str, Any]:
    binary = py_spy_path()
    if binary is None:
        return {"error": "py-spy not installed: pip install py-spy (it is in the dev extra)"}
    await asyncio.sleep(max(0.0, start_at - time.time()))
    log = output.with_suffix(".log")
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            binary,
            "record",
            "--pid",
            str(pid),
            "--duration",
            f"{seconds:.0f}",
            "--rate",
            "100",
            "--nonblocking",
            "--format",
            "speedscope",
            "--output",
            str(output),
            stdout=stderr,
            stderr=stderr,
        )
    meter.add("profiler", process.pid)
    try:
        await asyncio.wait_for(process.wait(), seconds + 60)
    except TimeoutError:
        process.kill()
        await process.wait()
    if process.returncode != 0 or not output.exists():
        return {"error": f"py-spy exited with {process.returncode}: {tail(log, 5)}"}
    return summarise_profile(output, seconds)


def short_file(path: str) -> str:
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


STACK_ROOT_FILES = (
    "<frozen runpy>",
    "/threading.py",
    "/concurrent/futures/thread.py",
    "/asyncio/runners.py",
    "/asyncio/events.py",
    "/asyncio/base_events.py",
    "uvicorn/main.py",
    "uvicorn/server.py",
    "uvicorn/_compat.py",
)


def summarise_profile(path: Path, seconds: float, top: int = 15) -> dict[str, Any]:
    """Top functions by self and inclusive time, from py-spy's speedscope output (stacks root
    first, leaf last, weights in seconds; idle samples are not recorded, so the shares are of
    busy time). The event loop runs on the main thread; `asyncio.to_thread` work (file writes)
    runs on the executor's threads, named uvloop_N or asyncio_N."""
    document = json.loads(path.read_text())
    frames = document["shared"]["frames"]
    names = [f"{frame['name']} ({short_file(frame.get('file', ''))})" for frame in frames]
    # Frames every stack passes through (interpreter start, uvicorn, the loop, thread pools)
    # would top the inclusive ranking and say nothing.
    is_root = [
        any(part in frame.get("file", "") for part in STACK_ROOT_FILES)
        or frame.get("file", "").endswith("iotmeter/__main__.py")
        for frame in frames
    ]
    scopes: dict[str, tuple[dict[str, float], dict[str, float]]] = {
        "main_thread": ({}, {}),
        "all_threads": ({}, {}),
    }
    busy_by_thread: dict[str, float] = {}
    for profile in document["profiles"]:
        thread = profile.get("name", "?")
        weights = profile.get("weights") or [0.01] * len(profile["samples"])
        in_scopes = [scopes["all_threads"]]
        if '"MainThread"' in thread:
            in_scopes.append(scopes["main_thread"])
        for stack, weight in zip(profile["samples"], weights, strict=True):
            if not stack:
                continue
            busy_by_thread[thread] = busy_by_thread.get(thread, 0.0) + weight
            leaf = names[stack[-1]]
            for self_time, inclusive in in_scopes:
                self_time[leaf] = self_time.get(leaf, 0.0) + weight
                for name in {names[index] for index in stack if not is_root[index]}:
                    inclusive[name] = inclusive.get(name, 0.0) + weight

    def ranked(counts: dict[str, float], busy: float) -> list[dict[str, Any]]:
        best = sorted(counts.items(), key=lambda item: item[1], reverse=True)[:top]
        return [
            {"function": name, "seconds": round(value, 2), "percent": round(100 * value / busy, 1)}
            for name, value in best
        ]

    result: dict[str, Any] = {
        "file": str(path),
        "seconds": seconds,
        "rate_hz": 100,
        # 100 % = the thread was busy (not waiting) the whole time.
        "busy_percent_by_thread": {
            name: round(100 * busy / seconds, 1)
            for name, busy in sorted(busy_by_thread.items(), key=lambda item: -item[1])
        },
    }
    for scope, (self_time, inclusive) in scopes.items():
        busy = sum(self_time.values()) or 1.0
        result[scope] = {
            "busy_s": round(busy, 2),
            "top_self": ranked(self_time, busy),
            "top_inclusive": ranked(inclusive, busy),
        }
    return result


# --- phases ------------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    workdir: Path
    services: Services
    meter: Meter
    kill_after: float
    alert_probe: AlertProbe | None = None
    passwords_file: Path | None = None
    """Per-device connections: device id -> password (JSON), written by `provision_devices`."""
    passwords: dict[str, str | None] | None = None

    @property
    def per_device(self) -> bool:
        return bool(self.args.device_auth or self.args.per_device_connections)

    def identity(self, device: str) -> tuple[str, str | None] | None:
        """How probe `device` connects: as itself with per-device connections, else None."""
        if self.passwords is None:
            return None
        return device, self.passwords.get(device)

    @property
    def device_url(self) -> str:
        """The broker as devices reach it (per-device connections bring their own password)."""
        return self.services.device_url if self.per_device else self.services.mqtt_url

    def probe(self) -> Probe:
        return Probe(
            self.device_url,
            self.args.probe_interval,
            self.args.poll_interval,
            self.identity(PROBE_DEVICE),
        )


def publisher_options(run: Run, index: int, messages: int = 0) -> list[str]:
    """Options of publisher `index`; with `messages`, a backlog: that many in all, as fast as
    the broker acks them."""
    args = run.args
    per_process = args.rate / args.publishers if args.rate and not messages else 0
    duration = backlog_publish_bound(args) if messages else args.duration
    per_device = []
    if run.per_device:
        assert run.passwords_file is not None
        per_device = ["--passwords-file", str(run.passwords_file)]
    return [
        *per_device,
        "--mqtt-url",
        run.device_url,
        "--index",
        str(index),
        "--count",
        str(args.publishers),
        "--devices",
        str(args.devices),
        "--duration",
        str(duration),
        "--rate",
        str(per_process),
        "--ack-timeout",
        str(args.ack_timeout),
        "--messages",
        str(messages),
    ]


async def start_publishers(run: Run, phase: str, messages: int = 0) -> list[Worker]:
    """`--publishers` processes: `load.py publish` (one connection each), or with per-device
    connections this file's `publish-per-device` role (one connection per device)."""
    role, script = (
        (PER_DEVICE_ROLE, HARNESS_WORKER) if run.per_device else ("publish", (str(LOAD),))
    )
    publishers = [
        await Worker.start(
            f"{phase}-publisher-{index}",
            role,
            publisher_options(run, index, messages),
            run.workdir,
            run.kill_after,
            script=script,
        )
        for index in range(run.args.publishers)
    ]
    for publisher in publishers:
        run.meter.add("publishers", publisher.pid)
    # Connecting one socket per device (and the broker checking each password) takes longer.
    within = 30 + (run.args.devices / 20 if run.per_device else 0)
    await asyncio.gather(*(publisher.wait_ready(within) for publisher in publishers))
    return publishers


async def relay_consumed(
    publishers: Sequence[Worker], consumed: Callable[[], Awaitable[int]]
) -> None:
    """Tell the publishers what the consumer has taken, so that `--rate 0` offers as much as it
    takes and no more: the broker acks a publish when it is queued, not when it is delivered,
    so without this a fast publisher only grows the broker's queue."""
    while True:
        total = await consumed()
        for publisher in publishers:
            with contextlib.suppress(Exception):
                publisher.send(f"consumed {total}")
        await asyncio.sleep(0.25)


def acked_series(publishers: Sequence[Worker]) -> list[list[tuple[float, float]]]:
    return [series_of(publisher, "acked") for publisher in publishers]


def summed_rate(
    series: Sequence[Sequence[tuple[float, float]]], start: float, stop: float
) -> float:
    return sum(rate_between(one, start, stop) or 0.0 for one in series)


async def drain(
    consumed: Callable[[], Awaitable[int]],
    target: int,
    idle_s: float,
    timeout_s: float,
    activity: Callable[[], object] | None = None,
) -> tuple[str, float]:
    """Wait until `consumed()` reaches `target` ("complete"), stops moving for `idle_s`
    ("stalled": what is missing is lost) or `timeout_s` passes while it still moves
    ("timeout": undecided). Returns how it ended and the seconds waited. With `activity`, a
    change of what it returns also counts as moving (work under way before `consumed` grows)."""
    started = time.monotonic()
    last_value = await consumed()
    last_seen = activity() if activity else last_value
    last_change = started
    while True:
        now = time.monotonic()
        if last_value >= target:
            return "complete", now - started
        if now - last_change > idle_s:
            return "stalled", now - started
        if now - started > timeout_s:
            return "timeout", now - started
        await asyncio.sleep(SAMPLE_INTERVAL_S)
        last_value = await consumed()
        seen = activity() if activity else last_value
        if seen != last_seen:
            last_seen, last_change = seen, time.monotonic()


async def s3_put_phase(run: Run) -> dict[str, Any] | None:
    """The object store's own small-PUT rate: what the per-message layout cannot beat."""
    s3 = run.services.s3
    seconds = run.args.s3_put_seconds
    if seconds is None:
        seconds = run.args.s3_put_default if run.services.owned_s3 else 0
    if s3 is None or seconds <= 0:
        return None
    worker = await Worker.start(
        "s3-put",
        "s3-put",
        [
            "--endpoint",
            s3["endpoint"],
            "--bucket",
            f"{s3['bucket']}-puts",
            "--access-key",
            s3["access_key"],
            "--secret-key",
            s3["secret_key"],
            "--concurrency",
            str(run.args.s3_put_concurrency),
            "--duration",
            str(seconds),
        ],
        run.workdir,
        run.kill_after,
    )
    final = await worker.wait_done(seconds + 60)
    # A fresh SeaweedFS grows its first volumes during the first seconds: leave them out.
    series = series_of(worker, "puts")
    steady = None
    if series:
        begin, end = series[0][0], series[-1][0]
        steady = rate_between(series, begin + 0.2 * (end - begin), end)
    return {
        "puts_per_s": round(steady if steady is not None else final["puts_per_s"], 1),
        "puts_per_s_whole_run": round(final["puts_per_s"], 1),
        "puts": final["puts"],
        "failures": final["failures"],
        "seconds": round(final["seconds"], 2),
        "concurrency": final["concurrency"],
        "body_bytes": final["body_bytes"],
        "client_cpu_percent": round(100 * final["cpu_s"] / final["seconds"], 1),
    }


async def ceiling_phase(run: Run) -> dict[str, Any]:
    """The publishers' load into a bare aiomqtt subscriber that only counts: the ceiling."""
    args = run.args
    subscriber = await Worker.start(
        "ceiling-subscriber",
        "subscribe",
        ["--mqtt-url", run.services.mqtt_url, "--timeout", str(run.kill_after)],
        run.workdir,
        run.kill_after,
    )
    run.meter.add("subscriber", subscriber.pid)
    await subscriber.wait_ready()
    publishers = await start_publishers(run, "ceiling")
    sampler = Sampler(run.meter, None, None)
    sampler.start()
    probe = run.probe()
    go = time.time() + 1.0
    for publisher in publishers:
        publisher.send(f"go {go}")
    steady = (go + args.warmup, go + args.duration)
    snapshot_task = asyncio.create_task(snapshots(*steady))
    probe_task = asyncio.create_task(probe.publish(go, go + args.duration))

    async def received() -> int:
        return int(subscriber.progress[-1]["received"]) if subscriber.progress else 0

    relay_task = asyncio.create_task(relay_consumed(publishers, received))
    finals = [await p.wait_done(args.duration + args.ack_timeout + 30) for p in publishers]
    relay_task.cancel()
    await probe_task
    acked = sum(final["acked"] for final in finals) + probe.acked
    drained, drain_s = await drain(received, acked, args.drain_idle, args.drain_timeout)
    subscriber.send("stop")
    sub_final = await subscriber.wait_done(30)
    await sampler.stop()
    before, after = await snapshot_task
    return {
        "msg_per_s": round_or_none(rate_between(series_of(subscriber, "received"), *steady)),
        "offered_msg_per_s": round(summed_rate(acked_series(publishers), *steady), 1),
        "published": sum(final["published"] for final in finals) + len(probe.sent_at),
        "acked": acked,
        "received": sub_final["received"],
        "drained": drained,
        "drain_s": round(drain_s, 1),
        "subscriber_loop": subscriber.info.get("loop"),
        "cpu_percent": cpu_breakdown(sampler, *steady),
        "top_outside_processes": top_outside(
            before, after, steady[1] - steady[0], run.meter.known_pids()
        ),
    }


async def snapshots(start: float, stop: float) -> tuple[dict[int, Any], dict[int, Any]]:
    """Every process's CPU at the start and at the end of the steady state."""
    await asyncio.sleep(max(0.0, start - time.time()))
    before = await asyncio.to_thread(process_snapshot)
    await asyncio.sleep(max(0.0, stop - time.time()))
    return before, await asyncio.to_thread(process_snapshot)


def cpu_breakdown(sampler: Sampler, start: float, stop: float) -> dict[str, float | None]:
    """Mean CPU % (100 = one core) of each group over the window, the whole machine's busy
    CPU, and what neither the bench's processes nor PostgreSQL took (other work on the host)."""
    groups = sorted({group for sample in sampler.samples for group in sample.cpu})
    result = {group: round_or_none(sampler.cpu_percent(group, start, stop)) for group in groups}
    ours = sum(value or 0.0 for group, value in result.items() if group not in MACHINE_KEYS)
    busy = result.get("machine_busy")
    kernel = (result.get("machine_irq") or 0.0) + (result.get("machine_steal") or 0.0)
    result["outside_bench"] = None if busy is None else round(max(0.0, busy - ours - kernel), 1)
    result["machine_capacity"] = 100.0 * (psutil.cpu_count() or 1)
    return result


class LiveWatchers:
    """Open event streams on `/api/v1/live`, as dashboard tabs on busy devices: each watches
    its own bench devices and asks for the ingest figures. They count what arrives without
    parsing it (the question is the app's cost, not the client's)."""

    def __init__(self, base_url: str, headers: dict[str, str], streams: int) -> None:
        self.client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(10, read=None),
            limits=httpx.Limits(max_connections=streams + 1),
        )
        self.streams = streams
        self.tasks: list[asyncio.Task[None]] = []
        self.counts = {"opened": 0, "bytes": 0, "readings_events": 0, "readings": 0, "gaps": 0}
        self.errors: list[str] = []

    def start(self, devices: int, per_stream: int) -> None:
        for n in range(self.streams):
            watched = [f"bench-{(n * per_stream + i) % devices:05d}" for i in range(per_stream)]
            self.tasks.append(asyncio.create_task(self._watch(watched)))

    async def _watch(self, devices: list[str]) -> None:
        params = [("device_id", device) for device in devices] + [("stats", "true")]
        try:
            async with self.client.stream("GET", "/api/v1/live", params=params) as response:
                if response.status_code != 200:
                    self.errors.append(
                        f"{response.status_code}: {(await response.aread())[:200]!r}"
                    )
                    return
                self.counts["opened"] += 1
                async for chunk in response.aiter_raw():
                    self.counts["bytes"] += len(chunk)
                    self.counts["readings_events"] += chunk.count(b"event: readings")
                    self.counts["readings"] += chunk.count(b'"device_id"')
                    self.counts["gaps"] += chunk.count(b"event: gap")
        except httpx.HTTPError as exc:
            self.errors.append(repr(exc))

    async def stop(self) -> dict[str, Any]:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.aclose()
        return {"streams": self.streams, **self.counts, "errors": self.errors[:5]}


async def iotmeter_phase(run: Run, app: App, api: httpx.AsyncClient) -> dict[str, Any]:
    """The same load into iotmeter, with the latency probe and (optionally) a profile."""
    args = run.args
    run.meter.add("app", app.process.pid)
    publishers = await start_publishers(run, "iotmeter")
    sampler = Sampler(run.meter, app.process.pid, api)
    sampler.start()
    probe = run.probe()
    stop_polling = asyncio.Event()
    go = time.time() + 1.0
    steady = (go + args.warmup, go + args.duration)
    for publisher in publishers:
        publisher.send(f"go {go}")
    snapshot_task = asyncio.create_task(snapshots(*steady))
    probe_task = asyncio.create_task(probe.publish(go, go + args.duration))
    poll_task = asyncio.create_task(probe.poll(api, stop_polling))
    alert_task = None
    if run.alert_probe is not None:
        alert_task = asyncio.create_task(run.alert_probe.publish(go, go + args.duration))
    profile_task = None
    if args.profile:
        seconds = min(args.profile, max(1.0, args.duration - args.warmup))
        output = run.workdir / "profile.speedscope.json"
        profile_task = asyncio.create_task(
            profile_app(app.process.pid, seconds, output, steady[0], run.meter)
        )

    async def received() -> int:
        for sample in reversed(sampler.samples):
            if sample.received is not None:
                return sample.received
        return 0

    relay_task = asyncio.create_task(relay_consumed(publishers, received))
    watchers = None
    if args.live_streams:
        watchers = LiveWatchers(app.base_url, app.headers, args.live_streams)
        watchers.start(args.devices, args.live_devices_per_stream)
    finals = [await p.wait_done(args.duration + args.ack_timeout + 30) for p in publishers]
    relay_task.cancel()
    await probe_task
    if alert_task is not None:
        await alert_task
    acked = sum(final["acked"] for final in finals) + probe.acked
    published = sum(final["published"] for final in finals) + len(probe.sent_at)

    async def stored() -> int:
        for sample in reversed(sampler.samples):
            if sample.stored is not None:
                return sample.stored
        return 0

    drained, drain_s = await drain(stored, acked, args.drain_idle, args.drain_timeout)
    # The probes' last polls and the final counters, after the drain.
    await asyncio.sleep(2 * max(args.poll_interval, SAMPLE_INTERVAL_S))
    stop_polling.set()
    await poll_task
    last = await sampler.take()
    await sampler.stop()
    sampler.samples.append(last)
    profile = await profile_task if profile_task is not None else None
    before, after = await snapshot_task
    final_stored = last.stored if last.stored is not None else await stored()
    if final_stored >= acked:
        drained = "complete"  # caught up in the last moments
    rows = None
    if run.services.influx is None:
        rows = await count_stored_rows(run.services.database_url, int((go - 5) * 1_000_000))
    live = await watchers.stop() if watchers is not None else None
    stored_series = sampler.series("stored")
    rss = [sample.rss_mb for sample in sampler.samples if sample.rss_mb is not None]
    spool = [sample.spool_depth for sample in sampler.samples if sample.spool_depth is not None]
    bench_acked = acked - probe.acked
    return {
        "stored_msg_per_s": round_or_none(rate_between(stored_series, *steady)),
        "received_msg_per_s": round_or_none(rate_between(sampler.series("received"), *steady)),
        "offered_msg_per_s": round(summed_rate(acked_series(publishers), *steady), 1),
        "published": published,
        "acked": acked,
        "stored": final_stored,
        "received": last.received,
        "rejected": last.rejected,
        # Only a finished drain decides: after a timeout the rest may still be on its way.
        "loss": None if drained == "timeout" else max(0, acked - final_stored),
        "pending_at_timeout": acked - final_stored if drained == "timeout" else None,
        "duplicates": max(0, final_stored - acked),
        "live": live,
        "drained": drained,
        "drain_s": round(drain_s, 1),
        "sql_rows_check": None
        if rows is None
        else {"bench_messages_acked": bench_acked, "rows": rows, "missing": bench_acked - rows},
        "latency": probe.summary(*steady),
        "latency_all_probes": probe.summary(go, go + args.duration),
        "alerting": None
        if run.alert_probe is None and not args.alert_rules
        else {
            "rules": args.alert_rules,
            "breach_to_webhook": run.alert_probe.summary(*steady) if run.alert_probe else None,
        },
        "app_cpu_percent": round_or_none(sampler.cpu_percent("app", *steady)),
        "app_rss_peak_mb": round_or_none(max(rss) if rss else None),
        "app_rss_hwm_mb": round_or_none(peak_rss_mb(app.process.pid)),
        "app_rss_end_mb": round_or_none(rss[-1] if rss else None),
        "spool_depth_max": max(spool) if spool else None,
        # Messages each sink still has to take from the spool when the drain ended: the
        # registry sink (devices, last_seen) is not part of `stored`.
        "spool_lag_by_sink_at_end": last.lag_by_sink,
        "app_cpu_percent_drain": round_or_none(
            sampler.cpu_percent("app", go + args.duration, last.t)
        ),
        "cpu_percent_drain": cpu_breakdown(sampler, go + args.duration, last.t),
        "cpu_percent": cpu_breakdown(sampler, *steady),
        "top_outside_processes": top_outside(
            before, after, steady[1] - steady[0], run.meter.known_pids()
        ),
        "profile": profile,
        "timeline": [
            {
                "t": round(sample.t - go, 2),
                "stored": sample.stored,
                "received": sample.received,
                "spool_depth": sample.spool_depth,
                "lag_by_sink": sample.lag_by_sink,
                "rss_mb": round_or_none(sample.rss_mb),
                "app_cpu_s": round_or_none(sample.cpu.get("app"), 2),
            }
            for sample in sampler.samples
        ],
    }


# --- backlog mode ------------------------------------------------------------------------------


def backlog_publish_bound(args: argparse.Namespace) -> float:
    """Seconds the publishers may take to publish the backlog (at 1,000 msg/s or more)."""
    return 120 + args.backlog / 1000


def per_second(count: float, start: float | None, stop: float | None) -> float | None:
    if start is None or stop is None or stop <= start:
        return None
    return round(count / (stop - start), 1)


def crossing_time(series: Sequence[tuple[float, float]], level: float) -> float | None:
    """The first instant a sampled counter reached `level`, interpolated linearly between the
    samples around it; None if it never did."""
    previous: tuple[float, float] | None = None
    for instant, value in series:
        if value >= level:
            if previous is None or value == previous[1]:
                return instant
            (t0, v0) = previous
            return t0 + (instant - t0) * (level - v0) / (value - v0)
        previous = (instant, value)
    return None


def pauses(
    series: Sequence[tuple[float, float]], start: float, stop: float, minimum_s: float = 1.0
) -> list[dict[str, float]]:
    """Stretches of at least `minimum_s` between `start` and `stop` in which a sampled counter
    did not grow (at least: from the first to the last sample showing the same value)."""
    found = []
    inside = [(t, v) for t, v in series if start <= t <= stop]
    flat_from = 0
    for index in range(1, len(inside) + 1):
        if index < len(inside) and inside[index][1] == inside[flat_from][1]:
            continue
        seconds = inside[index - 1][0] - inside[flat_from][0]
        if seconds >= minimum_s:
            found.append(
                {
                    "from_s": round(inside[flat_from][0] - start, 1),
                    "seconds": round(seconds, 1),
                    "at": inside[flat_from][1],
                }
            )
        flat_from = index
    return found


def mqtt_text(payload: Any) -> str:
    if isinstance(payload, bytes | bytearray):
        return payload.decode(errors="replace")
    return str(payload)


class BrokerCounters:
    """The broker's `$SYS` counters, followed over a connection of the harness's own: messages
    dropped (a full session queue: Mosquitto drops them without a word), messages it received
    and messages in its store (the backlog it holds)."""

    TOPICS: ClassVar[dict[str, str]] = {
        "$SYS/broker/uptime": "uptime",
        "$SYS/broker/publish/messages/dropped": "dropped",
        "$SYS/broker/publish/messages/received": "received",
        "$SYS/broker/store/messages/count": "store",
    }

    def __init__(self, mqtt_url: str) -> None:
        self.mqtt_url = mqtt_url
        self.series: dict[str, list[tuple[float, int]]] = {
            name: [] for name in self.TOPICS.values()
        }
        self.updates: list[float] = []  # arrival of each live `uptime`: one per `$SYS` update
        self.error: str | None = None
        self.heard = asyncio.Event()  # set once the dropped counter came, or the client failed
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        import aiomqtt

        host, port, username, password = broker_address(self.mqtt_url)
        try:
            async with aiomqtt.Client(
                host,
                port,
                username=username,
                password=password,
                identifier=f"bench-sys-{uuid.uuid4().hex[:8]}",
                keepalive=60,
                timeout=10,
            ) as client:
                for topic in self.TOPICS:
                    await client.subscribe(topic)
                async for message in client.messages:
                    name = self.TOPICS.get(str(message.topic))
                    words = mqtt_text(message.payload).split()
                    if name is None or not words or not words[0].isdigit():
                        continue
                    now = time.time()
                    self.series[name].append((now, int(words[0])))
                    if name == "uptime" and not message.retain:
                        self.updates.append(now)
                    elif name == "dropped":
                        self.heard.set()
        except aiomqtt.MqttError as exc:
            self.error = str(exc)
            self.heard.set()

    def latest(self, name: str) -> int | None:
        values = self.series[name]
        return values[-1][1] if values else None

    async def first_values(self, within: float = 10.0) -> None:
        """Wait for the retained values the broker sends on subscribing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.heard.wait(), within)

    async def dropped_after(self, instant: float, within: float = 30.0) -> int | None:
        """The dropped counter as the broker saw it after `instant`: from the `$SYS` update
        whose `uptime` arrived first after it, once the next update shows that one arrived
        whole. None when `$SYS` told nothing within `within` s (not readable on this broker)."""
        deadline = time.time() + within
        while time.time() < deadline and self.error is None:
            if sum(1 for arrived in self.updates if arrived > instant) >= 2:
                return self.latest("dropped")
            await asyncio.sleep(0.1)
        return None

    def first_below(self, name: str, level: float, after: float) -> float | None:
        """When a counter was first seen at or below `level` after `after`."""
        return next((t for t, v in self.series[name] if t > after and v <= level), None)

    def timeline(self, name: str, origin: float, stop: float) -> list[tuple[float, int]]:
        return [(round(t - origin, 2), v) for t, v in self.series[name] if origin - 1 <= t <= stop]


def dropped_between(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


async def publish_backlog(run: Run, phase: str) -> dict[str, Any]:
    """Publish `--backlog` messages while nobody takes them, as fast as the broker acks them,
    and wait for every ack (the broker queues them for the offline session)."""
    args = run.args
    publishers = await start_publishers(run, phase, messages=args.backlog)
    go = time.time() + 0.2
    for publisher in publishers:
        publisher.send(f"go {go}")
    within = backlog_publish_bound(args) + args.ack_timeout + 30
    finals = [await publisher.wait_done(within) for publisher in publishers]
    acked = sum(final["acked"] for final in finals)
    acked_at = max(final["acked_at"] for final in finals)
    return {
        "published": sum(final["published"] for final in finals),
        "acked": acked,
        "seconds": round(acked_at - go, 2),
        "msg_per_s": per_second(acked, go, acked_at),
        "publisher_cpu_s": round(sum(final["publish_cpu_s"] for final in finals), 2),
        "started_at": go,
        "acked_at": acked_at,
    }


async def bare_drain_phase(run: Run, counters: BrokerCounters) -> dict[str, Any]:
    """The reference: a bare aiomqtt subscriber's persistent session takes the same backlog."""
    args = run.args
    client_id = f"bench-backlog-bare-{uuid.uuid4().hex[:8]}"
    options = [
        "--mqtt-url",
        run.services.mqtt_url,
        "--timeout",
        str(args.drain_timeout + 60),
        "--client-id",
        client_id,
        "--persistent",
    ]
    session = await Worker.start(
        "bare-session", "subscribe", [*options, "--session-only"], run.workdir, run.kill_after
    )
    await session.wait_done(30)
    dropped_before = counters.latest("dropped")
    published = await publish_backlog(run, "bare")
    dropped_task = asyncio.create_task(counters.dropped_after(published["acked_at"]))
    backlog = published["acked"]
    sampler = Sampler(run.meter, None, None)
    sampler.start()
    before = await asyncio.to_thread(process_snapshot)
    spawned_at = time.time()
    subscriber = await Worker.start(
        "bare-drain",
        "subscribe",
        [*options, "--expect", str(backlog), "--forget"],
        run.workdir,
        run.kill_after,
    )
    run.meter.add("subscriber", subscriber.pid)

    async def received() -> int:
        return int(subscriber.progress[-1]["received"]) if subscriber.progress else 0

    drained, _ = await drain(received, backlog, args.drain_idle, args.drain_timeout)
    subscriber.send("stop")
    final = await subscriber.wait_done(60)
    await sampler.stop()
    after = await asyncio.to_thread(process_snapshot)
    dropped = dropped_between(dropped_before, await dropped_task)
    connect_at, first_at = final["connect_at"], final["first_message_at"]
    done_at = final["all_received_at"]
    end = done_at or time.time()
    return {
        "client_id": client_id,
        "messages": backlog,
        "publish": published,
        "broker_dropped": dropped,
        "received": final["received"],
        "drained": drained,
        "drain_s": round_or_none(done_at - connect_at if done_at else None, 2),
        "msg_per_s": per_second(backlog, connect_at, done_at),
        "msg_per_s_from_first_message": per_second(backlog, first_at, done_at),
        "msg_per_s_from_process_start": per_second(backlog, spawned_at, done_at),
        "connected_s": round(final["connected_at"] - spawned_at, 3),
        "first_message_s": round_or_none(first_at - spawned_at if first_at else None, 3),
        "loss": None if drained == "timeout" else max(0, backlog - final["received"]),
        "duplicates": max(0, final["received"] - backlog),
        "subscriber_loop": final.get("loop"),
        "subscriber_cpu_percent": round_or_none(100 * final["cpu_s"] / max(end - connect_at, 1e-9)),
        "cpu_percent": cpu_breakdown(sampler, connect_at, end),
        "top_outside_processes": top_outside(
            before, after, max(end - spawned_at, 1e-9), run.meter.known_pids()
        ),
        "timeline": [
            {"t": round(t - spawned_at, 2), "received": int(value)}
            for t, value in series_of(subscriber, "received")
        ],
        "broker_store_timeline": counters.timeline("store", spawned_at, end),
    }


def backlog_drain_idle(args: argparse.Namespace, env: dict[str, str]) -> float:
    """`--drain-idle`, but longer than the segment layout's age limit: an open segment holds
    its messages (received, not yet stored) up to that long, and stored stands still meanwhile.
    10 s is the app's default (`IOTMETER_ARCHIVE_SEGMENT_MAX_AGE_S`)."""
    if args.archive_layout != "segment":
        return float(args.drain_idle)
    return max(args.drain_idle, float(env.get("IOTMETER_ARCHIVE_SEGMENT_MAX_AGE_S", "10")) + 5)


async def stats_messages(app: App) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=app.base_url, timeout=10, headers=app.headers) as api:
        response = await api.get("/api/v1/stats")
    if response.status_code != 200:
        raise app.failure(f"answered {response.status_code} to GET /api/v1/stats")
    messages: dict[str, Any] = response.json().get("messages", {})
    return messages


async def backlog_app_phase(
    run: Run, env: dict[str, str], stack: AsyncExitStack, counters: BrokerCounters
) -> tuple[dict[str, Any], App]:
    """The backlog into iotmeter: a first start creates its collector's persistent session,
    the backlog is published while it is down, and the second start (same client id, same
    spool) is timed until `/api/v1/stats` counts the whole backlog as stored. Returns the
    result and the running app."""
    args = run.args
    spawned_first = time.time()
    first = await start_app(env, run.workdir, stack, "iotmeter-first-start.log")
    first_ready_s = time.time() - spawned_first
    # Counters since start in the app's code as committed (0 here: nothing was published to
    # the first start); a later version may keep them across starts.
    first_counts = await stats_messages(first)
    first_stop = await stop_app(first)
    baseline = int(first_counts.get("stored") or 0)

    dropped_before = counters.latest("dropped")
    published = await publish_backlog(run, "iotmeter")
    # Before the start (a few seconds: the backlog waits in the broker meanwhile), so that
    # `$SYS` shows the whole backlog in the broker's store.
    dropped = dropped_between(dropped_before, await counters.dropped_after(published["acked_at"]))
    backlog = published["acked"]
    target = baseline + backlog

    before = await asyncio.to_thread(process_snapshot)
    held = counters.latest("store")
    spawned_at = time.time()
    app = await spawn_app(env, run.workdir, stack)
    run.meter.add("app", app.process.pid)
    async with httpx.AsyncClient(base_url=app.base_url, timeout=10, headers=app.headers) as api:
        sampler = Sampler(run.meter, app.process.pid, api)
        sampler.start()
        profile_task = None
        if args.profile:
            # From the start: the collector takes messages before the API answers (lifespan),
            # and the drain is timed from the start. py-spy needs the interpreter running.
            output = run.workdir / "profile-backlog.speedscope.json"
            profile_task = asyncio.create_task(
                profile_app(app.process.pid, args.profile, output, spawned_at + 0.5, run.meter)
            )

        async def stored() -> int:
            if app.process.returncode is not None:
                raise app.failure(f"exited with {app.process.returncode} during the drain")
            for sample in reversed(sampler.samples):
                if sample.stored is not None:
                    return sample.stored
            return 0

        def activity() -> object:
            # Taking messages into the spool moves too, while stored waits for a segment.
            answered = [sample for sample in sampler.samples if sample.stored is not None]
            if not answered:
                return None
            sample = answered[-1]
            lag = tuple(sorted((sample.lag_by_sink or {}).items()))
            return sample.stored, sample.received, sample.spool_depth, lag

        idle_s = backlog_drain_idle(args, env)
        drained, drain_s = await drain(stored, target, idle_s, args.drain_timeout, activity)
        last = await sampler.take()
        await sampler.stop()
        sampler.samples.append(last)
    after = await asyncio.to_thread(process_snapshot)
    await wait_ready(app)  # the API phase may follow
    profile = await profile_task if profile_task is not None else None

    final_stored = last.stored if last.stored is not None else await stored()
    if final_stored >= target:
        drained = "complete"  # caught up in the last moments
    stored_now = final_stored - baseline
    series = sampler.series("stored")
    api_up_at = next((s.t for s in sampler.samples if s.stored is not None), None)
    first_at = crossing_time(series, baseline + 1)
    done_at = crossing_time(series, target)
    # Received: taken from the broker into the spool (and acked); counted since start.
    received_series = sampler.series("received")
    api_first_received_at = crossing_time(received_series, 1)
    all_received_at = crossing_time(received_series, backlog)
    # Both are upper bounds of when the collector got its first message: the API's counter
    # as first seen (late when the app answers late), and the broker's store shrinking (its
    # `$SYS` comes every 2 s); the earlier is the closer.
    broker_delivered_at = (
        None
        if held is None
        else counters.first_below("store", held - max(1, backlog // 100), spawned_at)
    )
    first_received_at = min(
        (at for at in (api_first_received_at, broker_delivered_at) if at is not None),
        default=None,
    )
    end = done_at or last.t
    rows = None
    if run.services.influx is None:
        since_us = int((published["started_at"] - 5) * 1_000_000)
        rows = await count_stored_rows(run.services.database_url, since_us)
    rss = [sample.rss_mb for sample in sampler.samples if sample.rss_mb is not None]
    spool = [sample.spool_depth for sample in sampler.samples if sample.spool_depth is not None]
    # Stored grows in steps when the archive writes segments: rates between two points of its
    # curve say something only when it grew in several sampled steps.
    steps = sum(1 for (_, v0), (_, v1) in itertools.pairwise(series) if baseline <= v0 < v1)
    curve = steps >= 3

    def since_start(instant: float | None) -> float | None:
        return None if instant is None else round(instant - spawned_at, 2)

    result = {
        "client_id": env["IOTMETER_MQTT_CLIENT_ID"],
        "spool_dir": env["IOTMETER_SPOOL_DIR"],
        "messages": backlog,
        "publish": published,
        "broker_dropped": dropped,
        "first_start": {
            "ready_s": round(first_ready_s, 2),
            "stop": first_stop,
            "received": first_counts.get("received"),
            "stored": baseline,
        },
        "stored": stored_now,
        "received": last.received,
        "rejected": last.rejected,
        "drained": drained,
        "drain_s": round(drain_s, 1),
        "drain_idle_s": idle_s,
        "api_up_s": since_start(api_up_at),
        # The API shares the event loop with the collector: a slow answer is a busy loop.
        "stats_request_max_s": round_or_none(
            max((s.stats_request_s or 0.0 for s in sampler.samples), default=None), 2
        ),
        "first_received_s": since_start(first_received_at),
        "first_received_s_by_api": since_start(api_first_received_at),
        "first_received_s_by_broker": since_start(broker_delivered_at),
        "all_received_s": since_start(all_received_at),
        "first_stored_s": since_start(first_at),
        "all_stored_s": since_start(done_at),
        "received_msg_per_s_from_first_received": per_second(
            backlog, first_received_at, all_received_at
        ),
        "msg_per_s_from_process_start": per_second(backlog, spawned_at, done_at),
        # From the collector's first message to the last stored: the drain without the app's
        # start-up, as the bare subscriber's is timed from its CONNECT.
        "msg_per_s_from_first_received": per_second(backlog, first_received_at, done_at),
        "stored_steps": steps,
        "msg_per_s_from_first_stored": per_second(backlog, first_at, done_at) if curve else None,
        "msg_per_s_10_to_90_percent": per_second(
            0.8 * backlog,
            crossing_time(series, baseline + 0.1 * backlog),
            crossing_time(series, baseline + 0.9 * backlog),
        )
        if curve
        else None,
        # Only a finished drain decides: after a timeout the rest may still be on its way.
        "loss": None if drained == "timeout" else max(0, backlog - stored_now),
        "pending_at_timeout": backlog - stored_now if drained == "timeout" else None,
        "duplicates": max(0, stored_now - backlog),
        "sql_rows_check": None
        if rows is None
        else {"bench_messages_acked": backlog, "rows": rows, "missing": backlog - rows},
        "app_cpu_percent": round_or_none(sampler.cpu_percent("app", spawned_at, end)),
        "app_cpu_percent_from_first_received": round_or_none(
            sampler.cpu_percent("app", first_received_at, end) if first_received_at else None
        ),
        "postgres_cpu_percent": round_or_none(sampler.cpu_percent("postgres", spawned_at, end)),
        "postgres_cpu_percent_from_first_received": round_or_none(
            sampler.cpu_percent("postgres", first_received_at, end) if first_received_at else None
        ),
        "app_rss_peak_mb": round_or_none(max(rss) if rss else None),
        "app_rss_hwm_mb": round_or_none(peak_rss_mb(app.process.pid)),
        "app_rss_end_mb": round_or_none(rss[-1] if rss else None),
        "spool_depth_max": max(spool) if spool else None,
        "spool_lag_by_sink_at_end": last.lag_by_sink,
        "intake_held_s_at_end": last.intake_held_s,
        # Where stored stood still once messages came: the app waiting on something.
        "stored_pauses": pauses(series, first_received_at or first_at or end, end),
        "cpu_percent": cpu_breakdown(sampler, spawned_at, end),
        "top_outside_processes": top_outside(
            before, after, max(end - spawned_at, 1e-9), run.meter.known_pids()
        ),
        "profile": profile,
        "first_start_log_tail": tail(first.log, 20),
        "timeline": [
            {
                "t": round(sample.t - spawned_at, 2),
                "stored": sample.stored,
                "received": sample.received,
                "spool_depth": sample.spool_depth,
                "lag_by_sink": sample.lag_by_sink,
                "intake_held_s": sample.intake_held_s,
                "stats_request_s": round_or_none(sample.stats_request_s, 3),
                "rss_mb": round_or_none(sample.rss_mb),
                "app_cpu_s": round_or_none(sample.cpu.get("app"), 2),
                "postgres_cpu_s": round_or_none(sample.cpu.get("postgres"), 2),
            }
            for sample in sampler.samples
        ],
        "broker_store_timeline": counters.timeline("store", spawned_at, last.t),
    }
    return result, app


def check_dropped(summary: dict[str, Any], phase: str, counters: BrokerCounters) -> None:
    """Fail the run when the broker dropped part of a backlog; note when it could not tell."""
    dropped = summary[phase]["broker_dropped"]
    if dropped is None:
        summary.setdefault("warnings", []).append(
            f"{phase}: the broker's $SYS/broker/publish/messages/dropped was not readable "
            f"({counters.error or 'no $SYS update within 30 s'}): loss to its queue limit "
            "not checked"
        )
    elif dropped > 0:
        raise HarnessError(
            f"{phase}: the broker dropped {dropped:,} messages ($SYS/broker/publish/messages/"
            "dropped): its queue limit (max_queued_messages, max_queued_bytes) is below the "
            "backlog"
        )


async def backlog_phases(
    run: Run, env: dict[str, str], stack: AsyncExitStack, summary: dict[str, Any]
) -> App:
    """Bare drain, then iotmeter's drain; returns the app that drained it, still running."""
    counters = BrokerCounters(run.services.mqtt_url)
    counters.start()
    stack.push_async_callback(counters.stop)
    await counters.first_values()
    if run.args.ceiling:
        print("bare drain phase ...", file=sys.stderr, flush=True)
        summary["bare_drain"] = await bare_drain_phase(run, counters)
        check_dropped(summary, "bare_drain", counters)
    await register_devices(run, env, summary)
    print("iotmeter backlog phase ...", file=sys.stderr, flush=True)
    summary["backlog"], app = await backlog_app_phase(run, env, stack, counters)
    check_dropped(summary, "backlog", counters)
    return app


async def http_phase(
    run: Run,
    app: App,
    endpoint: str,
    *,
    devices: int,
    concurrency: int,
    rate: float,
    duration: float,
    profile: float = 0,
) -> dict[str, Any]:
    """One endpoint under load from client processes; app and client CPU alongside, and a
    py-spy profile of the app when asked."""
    clients = run.args.api_open_processes if rate else run.args.api_processes
    client_kind = run.args.api_open_client if rate else run.args.api_client
    workers = []
    for index in range(clients):
        options = [
            *(["--api-key-file", str(app.key_file)] if app.key_file else []),
            "--base-url",
            app.base_url,
            "--endpoint",
            endpoint,
            "--devices",
            str(devices),
            "--duration",
            str(duration),
            "--concurrency",
            str(max(1, concurrency // clients)),
            "--rate",
            str(rate / clients if rate else 0),
            "--seed",
            str(index + 1),
            "--client",
            client_kind,
        ]
        workers.append(
            await Worker.start(
                f"api-{endpoint}-{index}", "http", options, run.workdir, run.kill_after
            )
        )
    await asyncio.gather(*(worker.wait_ready() for worker in workers))
    sampler = Sampler(run.meter, app.process.pid, None)
    before = await sampler.take()
    go = time.time() + 0.5
    for worker in workers:
        worker.send(f"go {go}")
    profile_task = None
    if profile:
        seconds = min(profile, max(1.0, duration - 1))
        output = run.workdir / f"profile-{endpoint}-{int(rate)}.speedscope.json"
        profile_task = asyncio.create_task(
            profile_app(app.process.pid, seconds, output, go + 0.5, run.meter)
        )
    finals = [await worker.wait_done(duration + 60) for worker in workers]
    after = await sampler.take()
    profiled = await profile_task if profile_task is not None else None
    latencies = [value for final in finals for value in final["latencies_ms"]]
    seconds = max(final["seconds"] for final in finals)
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for final in finals:
        for code, count in final["statuses"].items():
            statuses[code] = statuses.get(code, 0) + count
        for name, count in final["errors"].items():
            errors[name] = errors.get(name, 0) + count
    elapsed = after.t - before.t
    app_cpu = after.cpu.get("app", 0.0) - before.cpu.get("app", 0.0)
    busy = after.cpu["machine_busy"] - before.cpu["machine_busy"]
    return {
        "mode": (f"open {rate:.0f}/s" if rate else f"closed, {concurrency} conc.")
        + f", {clients} {client_kind}",
        "requests_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round_or_none(percentile(latencies, 0.50), 2),
        "p99_ms": round_or_none(percentile(latencies, 0.99), 2),
        "max_ms": round_or_none(max(latencies) if latencies else None, 2),
        "ok": len(latencies),
        "statuses": statuses,
        "errors": errors,
        "dropped": sum(final["dropped"] for final in finals),
        "seconds": round(seconds, 2),
        "app_cpu_percent": round(100 * app_cpu / elapsed, 1),
        "machine_busy_percent": round(100 * busy / elapsed, 1),
        "client_cpu_percent": round(100 * sum(f["cpu_s"] for f in finals) / seconds, 1),
        "profile": profiled,
        "client_processes": clients,
        "client": client_kind,
        "client_loop": finals[0].get("loop"),
    }


async def settle(app: App, device: str, within: float = 60.0) -> float:
    """Wait until the app answers a device get quickly again: requests a client gave up on
    may still hold the server (and its connection pool) after a test; the next test must not
    pay for them. Returns the seconds waited."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=app.base_url, timeout=10, headers=app.headers) as client:
        quick_in_a_row = 0
        while quick_in_a_row < 5 and time.monotonic() - started < within:
            before = time.perf_counter()
            try:
                response = await client.get(f"/api/v1/devices/{device}")
                quick = response.status_code == 200 and time.perf_counter() - before < 0.1
            except httpx.HTTPError:
                quick = False
            quick_in_a_row = quick_in_a_row + 1 if quick else 0
            await asyncio.sleep(0.2)
    return time.monotonic() - started


async def wait_for_rollups(database_url: str, within_s: float = 900.0) -> float | None:
    """Seconds until the app's rollups cover the seeded history (their coverage reaches back
    to the beginning of time and no minute is marked); None when the app keeps no rollups
    (disabled, an older `--app-ref`) or they did not catch up in time."""
    import asyncpg

    started = time.monotonic()
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        while time.monotonic() - started < within_s:
            try:
                start = await connection.fetchval(
                    "SELECT done_until_us FROM telemetry_rollup_state WHERE name = '1h:from'"
                )
                marked = await connection.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM telemetry_rollup_dirty)"
                )
            except asyncpg.UndefinedTableError:
                return None
            if start is not None and start <= -(2**62) and not marked:
                return round(time.monotonic() - started, 1)
            await asyncio.sleep(1)
    finally:
        await connection.close()
    return None


async def api_phase(run: Run, app: App) -> dict[str, Any]:
    args = run.args
    registered = max(args.devices, args.devices_registered)
    results: dict[str, Any] = {}
    for name, endpoint, devices in (
        ("device_get", "device_get", registered),
        ("device_list", "device_list", registered),
        ("telemetry_1h_1m", "telemetry", args.devices),
        ("telemetry_1h_1m_10s_device", "telemetry_history", HISTORY_DEVICES),
        ("telemetry_30d_1h_10s_device", "telemetry_history_30d", HISTORY_30D_DEVICES),
    ):
        if endpoint == "telemetry_history_30d" and args.smoke:
            continue  # not seeded in a smoke run (it takes minutes)
        if endpoint.startswith("telemetry_history") and run.services.influx is not None:
            continue
        await settle(app, device_id(0))
        results[name] = await http_phase(
            run,
            app,
            endpoint,
            devices=devices,
            concurrency=args.api_concurrency,
            rate=0,
            duration=args.api_duration,
            profile=args.profile_api,
        )
    if args.api_rate:
        await settle(app, device_id(0))
        results["device_get_open_loop"] = await http_phase(
            run,
            app,
            "device_get",
            devices=registered,
            concurrency=args.api_concurrency,
            rate=args.api_rate,
            duration=args.api_duration,
        )
    return results


# --- report ------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ",.0f", unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:{spec}}{unit}"


def row(label: str, value: str) -> str:
    return f"  {label:<46}{value:>22}"


def render_table(summary: dict[str, Any]) -> str:
    config = summary["config"]
    machine = summary["machine"]
    ingest = summary.get("iotmeter") or {}
    ceiling = summary.get("ceiling") or {}
    puts = summary.get("s3_put_ceiling")
    latency = ingest.get("latency") or {}
    offered = f"{config['rate']:,.0f} msg/s" if config["rate"] else "as fast as consumed"
    layout = config["archive_layout"]
    if not (summary.get("app") or {}).get("archive_layout_setting", True):
        layout += ", a setting the app ignores"
    lines = [
        f"iotmeter bench {summary['started_at']}; app {app_origin(summary)}",
        f"  {config['devices']:,} devices, 4 readings/msg, QoS 1, {config['duration']:.0f} s "
        f"({config['warmup']:.0f} s warm-up), {config['publishers']} publisher process(es), "
        f"offered {offered}",
        f"  archive {config['archive']} ({layout}), time series "
        f"{'InfluxDB' if config['influx'] else 'SQL on PostgreSQL'}",
        f"  {machine['cpus']} CPUs; load average {machine['load_average_start']} at start, "
        f"{machine['load_average_end']} at end",
        *render_device_auth(summary),
        "",
        row("ceiling: bare aiomqtt subscriber", fmt(ceiling.get("msg_per_s"), unit=" msg/s")),
        row("iotmeter: stored in both sinks", fmt(ingest.get("stored_msg_per_s"), unit=" msg/s")),
        row(
            "iotmeter: received (spooled, acked to broker)",
            fmt(ingest.get("received_msg_per_s"), unit=" msg/s"),
        ),
        row("ratio stored / ceiling", fmt(summary.get("ratio_stored_to_ceiling"), ".1%")),
        row(
            "offered (publisher acks) ceiling / iotmeter",
            f"{fmt(ceiling.get('offered_msg_per_s'))} / "
            f"{fmt(ingest.get('offered_msg_per_s'), unit=' msg/s')}",
        ),
    ]
    if puts:
        lines += [
            row(
                f"S3 small-PUT ceiling (concurrency {puts['concurrency']})",
                fmt(puts["puts_per_s"], unit=" PUT/s"),
            ),
        ]
        if config["archive_layout"] == "per-message":
            lines.append(
                row(
                    "ratio stored / S3 PUT rate", fmt(summary.get("ratio_stored_to_s3_puts"), ".1%")
                )
            )
    lines += [
        row(
            f"publish-to-queryable p50 / p99 (n={latency.get('samples', 0)})",
            f"{fmt(latency.get('p50_ms'))} / {fmt(latency.get('p99_ms'), unit=' ms')}",
        ),
        row("app CPU, mean over the steady state", fmt(ingest.get("app_cpu_percent"), unit=" %")),
    ]
    alerting = ingest.get("alerting") or {}
    webhook = alerting.get("breach_to_webhook") or {}
    if alerting:
        lines.append(row("alert rules evaluated", fmt(alerting.get("rules"))))
    if webhook:
        lines.append(
            row(
                f"breach-to-webhook p50 / p99 ({webhook.get('webhooks_received')} of "
                f"{webhook.get('breaches_sent')})",
                f"{fmt(webhook.get('p50_ms'))} / {fmt(webhook.get('p99_ms'), unit=' ms')}",
            )
        )
    lines += [
        row(
            "app peak RSS (sampled / kernel VmHWM)",
            f"{fmt(ingest.get('app_rss_peak_mb'))} / "
            f"{fmt(ingest.get('app_rss_hwm_mb'), unit=' MB')}",
        ),
        row(
            "loss (acked - stored)",
            fmt(ingest.get("loss"))
            if ingest.get("drained") != "timeout"
            else f"undecided: {ingest['pending_at_timeout']:,} pending",
        ),
        row("acked / stored", f"{fmt(ingest.get('acked'))} / {fmt(ingest.get('stored'))}"),
        row(
            "drain after the window",
            f"{ingest.get('drained', '-')} after {fmt(ingest.get('drain_s'), '.1f', ' s')}",
        ),
    ]
    lag = ingest.get("spool_lag_by_sink_at_end")
    if lag:
        lines.append(
            row(
                "spool lag by sink after the drain", ", ".join(f"{k} {v:,}" for k, v in lag.items())
            )
        )
    rows = ingest.get("sql_rows_check")
    if rows:
        lines.append(row("SQL check: acked messages without rows", fmt(rows["missing"])))
    cpu = ingest.get("cpu_percent") or {}
    shown = [
        f"{name} {value:.0f}" for name, value in cpu.items() if value and name != "machine_capacity"
    ]
    if shown:
        lines.append(
            f"  CPU % in the steady state (100 = one core; disk_busy: % of time): "
            f"{', '.join(shown)}"
        )
    for entry in ingest.get("top_outside_processes") or []:
        lines.append(f"    outside: {entry['cpu_percent']:.0f} %  {entry['command'][:90]}")
    return "\n".join(lines + render_api_and_profiles(summary))


def render_device_auth(summary: dict[str, Any]) -> list[str]:
    """The header lines of the per-device-connection modes."""
    config = summary["config"]
    if not config.get("per_device_connections"):
        return []
    if config.get("device_auth"):
        auth = (
            "device auth ON: Mosquitto dynamic security, accounts reconciled by iotmeter, "
            "bare subscriber as the plugin's admin"
        )
    else:
        auth = "device auth OFF: anonymous broker (the same connections and credentials)"
    lines = [f"  one MQTT connection per device (client id = username = device id); {auth}"]
    provisioning = summary.get("provisioning")
    if provisioning:
        lines.append(
            f"  provisioning: {provisioning['devices']} devices registered with credentials "
            f"in {provisioning['registered_with_credentials_s']:.1f} s"
            + (
                f", all on the broker {provisioning['all_on_broker_s']:.1f} s later"
                if provisioning.get("all_on_broker_s") is not None
                else ""
            )
        )
    return lines


def app_origin(summary: dict[str, Any]) -> str:
    if summary.get("app_ref"):
        return f"at git {summary['app_ref']} (--app-ref)"
    return f"from the working tree (git {summary.get('git') or '?'})"


def render_api_and_profiles(summary: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    api = summary.get("api")
    if summary.get("history_30d"):
        lines.append(
            row(
                "rollups caught up with 30 d of history",
                fmt(summary.get("rollups_backfill_s"), ",.1f", " s"),
            )
        )
    if api:
        lines += [
            "",
            f"  {'API':<28}{'mode':<26}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
            f"{'dropped':>8}{'app CPU':>9}{'client CPU':>12}{'machine':>9}",
        ]
        for name, result in api.items():
            failed = sum(result["errors"].values()) + sum(
                count for code, count in result["statuses"].items() if code != "200"
            )
            lines.append(
                f"  {name:<28}{result['mode']:<26}{fmt(result['requests_per_s']):>8}"
                f"{fmt(result['p50_ms'], '.1f'):>9}{fmt(result['p99_ms'], '.1f'):>9}"
                f"{failed:>8}{result['dropped']:>8}"
                f"{fmt(result['app_cpu_percent'], '.0f', '%'):>9}"
                f"{fmt(result['client_cpu_percent'], '.0f', '%'):>12}"
                f"{fmt(result.get('machine_busy_percent'), '.0f', '%'):>9}"
            )
    for label, profile in profiles(summary):
        lines += ["", *render_profile(label, profile)]
    return lines


def render_backlog_table(summary: dict[str, Any]) -> str:
    config = summary["config"]
    machine = summary["machine"]
    bare = summary.get("bare_drain") or {}
    drained = summary.get("backlog") or {}
    first = drained.get("first_start") or {}
    layout = config["archive_layout"]
    if not (summary.get("app") or {}).get("archive_layout_setting", True):
        layout += ", a setting the app ignores"
    lines = [
        f"iotmeter bench, backlog mode, {summary['started_at']}; app {app_origin(summary)}",
        f"  a backlog of {config['backlog']:,} QoS 1 messages (4 readings each) from "
        f"{config['devices']:,} devices, queued in the broker while the consumer was down; "
        f"{config['publishers']} publisher process(es)",
        f"  archive {config['archive']} ({layout}), time series "
        f"{'InfluxDB' if config['influx'] else 'SQL on PostgreSQL'}; collector client id "
        f"{summary.get('app_client_id', '-')}",
        f"  {machine['cpus']} CPUs; load average {machine['load_average_start']} at start, "
        f"{machine['load_average_end']} at end",
        "",
        row("bare aiomqtt subscriber: drain rate", fmt(bare.get("msg_per_s"), unit=" msg/s")),
        row(
            "bare: drain time / from process start",
            f"{fmt(bare.get('drain_s'), '.1f', ' s')} / "
            f"{fmt(bare.get('msg_per_s_from_process_start'), unit=' msg/s')}",
        ),
        row(
            "iotmeter: drain rate from first received",
            fmt(drained.get("msg_per_s_from_first_received"), unit=" msg/s"),
        ),
        row(
            "iotmeter: drain rate from process start",
            fmt(drained.get("msg_per_s_from_process_start"), unit=" msg/s"),
        ),
        row(
            f"iotmeter: from first stored ({fmt(drained.get('stored_steps'))} sampled steps)",
            fmt(drained.get("msg_per_s_from_first_stored"), unit=" msg/s"),
        ),
        row(
            "iotmeter: 10 % to 90 % of the backlog",
            fmt(drained.get("msg_per_s_10_to_90_percent"), unit=" msg/s"),
        ),
        row(
            "ratio iotmeter / bare (from first message)",
            fmt(summary.get("ratio_drain_to_bare"), ".1%"),
        ),
        row(
            "ratio iotmeter / bare (from process start)",
            fmt(summary.get("ratio_drain_to_bare_from_process_start"), ".1%"),
        ),
        row(
            "iotmeter: intake (received), first to all",
            fmt(drained.get("received_msg_per_s_from_first_received"), unit=" msg/s"),
        ),
        row(
            "iotmeter: API up after / slowest stats answer",
            f"{fmt(drained.get('api_up_s'), '.1f')} / "
            f"{fmt(drained.get('stats_request_max_s'), '.1f', ' s')}",
        ),
        row(
            "iotmeter: first received (API / broker $SYS)",
            f"{fmt(drained.get('first_received_s_by_api'), '.1f')} / "
            f"{fmt(drained.get('first_received_s_by_broker'), '.1f', ' s')}",
        ),
        row("iotmeter: all received after", fmt(drained.get("all_received_s"), ".1f", " s")),
        row(
            "iotmeter: first / all stored after",
            f"{fmt(drained.get('first_stored_s'), '.1f')} / "
            f"{fmt(drained.get('all_stored_s'), '.1f', ' s')}",
        ),
        row(
            "publish into the broker, bare / iotmeter",
            f"{fmt((bare.get('publish') or {}).get('msg_per_s'))} / "
            f"{fmt((drained.get('publish') or {}).get('msg_per_s'), unit=' msg/s')}",
        ),
        row(
            "broker dropped ($SYS), bare / iotmeter",
            f"{fmt(bare.get('broker_dropped'))} / {fmt(drained.get('broker_dropped'))}",
        ),
        row(
            "app CPU, process start / first received to all",
            f"{fmt(drained.get('app_cpu_percent'))} / "
            f"{fmt(drained.get('app_cpu_percent_from_first_received'), unit=' %')}",
        ),
        row(
            "PostgreSQL CPU (whole server), same windows",
            f"{fmt(drained.get('postgres_cpu_percent'))} / "
            f"{fmt(drained.get('postgres_cpu_percent_from_first_received'), unit=' %')}",
        ),
        row(
            "app peak RSS (sampled / kernel VmHWM)",
            f"{fmt(drained.get('app_rss_peak_mb'))} / "
            f"{fmt(drained.get('app_rss_hwm_mb'), unit=' MB')}",
        ),
        row(
            "loss (acked - stored), bare / iotmeter",
            f"{fmt(bare.get('loss'))} / "
            + (
                fmt(drained.get("loss"))
                if drained.get("drained") != "timeout"
                else f"undecided: {drained['pending_at_timeout']:,} pending"
            ),
        ),
        row(
            "iotmeter: acked / stored / duplicates",
            f"{fmt(drained.get('messages'))} / {fmt(drained.get('stored'))} / "
            f"{fmt(drained.get('duplicates'))}",
        ),
        row("iotmeter: drain", f"{drained.get('drained', '-')}"),
        row(
            "first start: ready after / stop",
            f"{fmt(first.get('ready_s'), '.1f', ' s')} / {first.get('stop', '-')}",
        ),
    ]
    rows = drained.get("sql_rows_check")
    if rows:
        lines.append(row("SQL check: acked messages without rows", fmt(rows["missing"])))
    lag = drained.get("spool_lag_by_sink_at_end")
    if lag:
        lines.append(
            row(
                "spool lag by sink after the drain", ", ".join(f"{k} {v:,}" for k, v in lag.items())
            )
        )
    if drained.get("intake_held_s_at_end"):
        lines.append(
            row("intake held (a sink lagged)", fmt(drained["intake_held_s_at_end"], ".1f", " s"))
        )
    stalls = drained.get("stored_pauses") or []
    if stalls:
        longest = max(stalls, key=lambda entry: entry["seconds"])
        lines.append(
            row(
                f"stored stood still {len(stalls)}x; longest",
                f"{longest['seconds']:.1f} s at {longest['at']:,.0f}",
            )
        )
    cpu = drained.get("cpu_percent") or {}
    shown = [
        f"{name} {value:.0f}" for name, value in cpu.items() if value and name != "machine_capacity"
    ]
    if shown:
        lines.append(
            f"  CPU % from the second start to all stored (100 = one core): {', '.join(shown)}"
        )
    for entry in drained.get("top_outside_processes") or []:
        lines.append(f"    outside: {entry['cpu_percent']:.0f} %  {entry['command'][:90]}")
    return "\n".join(lines + render_api_and_profiles(summary))


def profiles(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every py-spy profile of the run, labelled by the phase it was taken in."""
    found = []
    ingest_profile = (summary.get("iotmeter") or {}).get("profile")
    if ingest_profile:
        found.append(("ingest", ingest_profile))
    backlog_profile = (summary.get("backlog") or {}).get("profile")
    if backlog_profile:
        found.append(("backlog", backlog_profile))
    for name, result in (summary.get("api") or {}).items():
        if result.get("profile"):
            found.append((f"api-{name}", result["profile"]))
    return found


def render_profile(label: str, profile: dict[str, Any]) -> list[str]:
    if "main_thread" not in profile:
        return [f"  py-spy ({label}): {profile.get('error')}"]
    busy = ", ".join(
        f"{name} {value}%" for name, value in profile["busy_percent_by_thread"].items()
    )
    lines = [f"  py-spy {label}, {profile['seconds']:.0f} s; busy: {busy}"]
    for scope in ("main_thread", "all_threads"):
        lines.append(f"  top self time, {scope.replace('_', ' ')}:")
        lines += [
            f"    {entry['percent']:5.1f} %  {entry['function']}"
            for entry in profile[scope]["top_self"]
        ]
    return lines


# --- main --------------------------------------------------------------------------------------


def time_budget(args: argparse.Namespace) -> float:
    """An upper bound on the whole run: the harness gives up (and cleans up) after it."""
    load = args.duration + args.ack_timeout + args.drain_timeout + 120
    if args.mode == "backlog":
        # Publish, wait for the acks, drain (and the app's two starts and stop).
        load = backlog_publish_bound(args) + args.ack_timeout + args.drain_timeout + 240
    api = 4 * (args.api_duration + 90) if args.api else 0
    puts = (args.s3_put_seconds or args.s3_put_default) + 90
    # An app start of its own, registration, credentials and the broker's accounts.
    provision = 180 + args.devices / 10 if args.device_auth or args.per_device_connections else 0
    return 300 + (load if args.ceiling else 0) + load + api + puts + provision + (args.profile or 0)


async def kill_workers() -> None:
    await asyncio.gather(*(worker.kill() for worker in Worker.started))


async def execute(args: argparse.Namespace, summary: dict[str, Any], workdir: Path) -> None:
    async with AsyncExitStack() as stack:
        stack.push_async_callback(kill_workers)
        services = await open_services(args, workdir, stack)
        summary["services"] = services.describe
        meter = Meter()
        for group, pid in services.pids.items():
            meter.add(group, pid)
        meter.add("harness", os.getpid())
        run = Run(args, workdir, services, meter, time_budget(args))
        env = app_environment(args, services, workdir)
        if args.app_ref:
            env["PYTHONPATH"] = str(await export_app_source(args.app_ref, workdir))
            summary["app_ref"] = git_revision(args.app_ref)
        summary["app"] = await inspect_app(run, env)
        summary["app_client_id"] = env["IOTMETER_MQTT_CLIENT_ID"]
        await migrate(env, workdir)
        if args.seed_hours and services.influx is None:
            # Past hours written before the app starts, for its lifecycle task to work on
            # while ingest runs (compaction of closed hours, the rollups' backfill).
            print(f"seeding {args.seed_hours} h of history ...", file=sys.stderr, flush=True)
            seed = await Worker.start(
                "seed",
                "history",
                [
                    "--database-url",
                    services.database_url,
                    "--count",
                    str(args.seed_devices),
                    "--interval",
                    str(args.seed_interval),
                    "--hours",
                    str(args.seed_hours),
                    "--prefix",
                    "seed",
                ],
                workdir,
                run.kill_after,
                env,
            )
            summary["seed"] = await seed.wait_done(1800)
        if args.api and services.influx is None:
            # The ingest phase leaves far denser data than a device's (each bench device
            # sends several messages a second); this gives the telemetry queries one hour and
            # thirty days of devices reporting every 10 s. Written before the app starts, as
            # data from before its rollups: the app backfills them (the API phase waits).
            history = await Worker.start(
                "history",
                "history",
                [
                    "--database-url",
                    services.database_url,
                    "--count",
                    str(HISTORY_DEVICES),
                    "--interval",
                    "10",
                ],
                workdir,
                run.kill_after,
                env,
            )
            summary["history"] = await history.wait_done(600)
        if args.api and services.influx is None and not args.smoke:
            history_30d = await Worker.start(
                "history30",
                "history",
                [
                    "--database-url",
                    services.database_url,
                    "--count",
                    str(HISTORY_30D_DEVICES),
                    "--interval",
                    "10",
                    "--hours",
                    str(30 * 24),
                    "--prefix",
                    "hist30",
                ],
                workdir,
                run.kill_after,
                env,
            )
            summary["history_30d"] = await history_30d.wait_done(1800)
        summary["s3_put_ceiling"] = await s3_put_phase(run)
        if args.mode == "backlog":
            app = await backlog_phases(run, env, stack, summary)
        else:
            app = await steady_phases(run, env, stack, summary)
        if args.api:
            print("API phase ...", file=sys.stderr, flush=True)
            if services.influx is None and not args.smoke:
                summary["rollups_backfill_s"] = await wait_for_rollups(services.database_url)
            summary["api"] = await api_phase(run, app)
        summary["app_rss_hwm_mb_end"] = round_or_none(peak_rss_mb(app.process.pid))
        summary["app_stop"] = await stop_app(app)
        summary["app_log_tail"] = tail(app.log, 20)


async def steady_phases(
    run: Run, env: dict[str, str], stack: AsyncExitStack, summary: dict[str, Any]
) -> App:
    """Ceiling, then the same load into iotmeter; returns the app, still running. With
    per-device connections the devices get their credentials first (an app start of its own)."""
    if run.per_device:
        await register_devices(run, env, summary)
        print("provisioning devices through the API ...", file=sys.stderr, flush=True)
        await provision_devices(run, env, stack, summary)
    if run.args.ceiling:
        print("ceiling phase: bare subscriber ...", file=sys.stderr, flush=True)
        summary["ceiling"] = await ceiling_phase(run)
    if not run.per_device:
        await register_devices(run, env, summary)
    app = await start_app(env, run.workdir, stack)
    async with httpx.AsyncClient(base_url=app.base_url, timeout=10, headers=app.headers) as api:
        if run.args.alert_rules or run.args.alert_latency:
            if run.args.alert_latency:
                run.alert_probe = AlertProbe(
                    run.device_url, run.args.alert_latency, run.identity(ALERT_DEVICE)
                )
                stack.push_async_callback(run.alert_probe.close)
            summary["alerting"] = await create_alerting(run, api, run.alert_probe)
        print("iotmeter phase ...", file=sys.stderr, flush=True)
        summary["iotmeter"] = await iotmeter_phase(run, app, api)
    return app


async def register_devices(run: Run, env: dict[str, str], summary: dict[str, Any]) -> None:
    if not run.args.devices_registered:
        return
    registration = await Worker.start(
        "register",
        "register",
        [
            "--database-url",
            run.services.database_url,
            "--count",
            str(run.args.devices_registered),
        ],
        run.workdir,
        run.kill_after,
        env,
    )
    summary["registration_s"] = round((await registration.wait_done(600))["seconds"], 2)


async def provision_devices(
    run: Run, env: dict[str, str], stack: AsyncExitStack, summary: dict[str, Any]
) -> None:
    """Per-device connections: register every device (and the probes) and create its MQTT
    credential through the API, as an operator would, on an app started for this alone; with
    device auth, wait until `GET .../credentials` says `on_broker` for all (iotmeter puts the
    accounts on the broker itself). That app then stops and its collector's persistent session
    is ended: the broker would otherwise queue the ceiling's whole load for it."""
    args = run.args
    devices = [device_id(n) for n in range(args.devices)] + [PROBE_DEVICE]
    if args.alert_latency:
        devices.append(ALERT_DEVICE)
    client_id = env["IOTMETER_MQTT_CLIENT_ID"] + "-provision"
    provision_env = {
        **env,
        "IOTMETER_MQTT_CLIENT_ID": client_id,
        "IOTMETER_SPOOL_DIR": str(run.workdir / "spool-provision"),
    }
    spawned = time.time()
    app = await start_app(provision_env, run.workdir, stack, "iotmeter-provision.log")
    ready_s = time.time() - spawned
    limit = asyncio.Semaphore(8)
    passwords: dict[str, str | None] = {}
    post_once_committed = CommittedPost()
    async with httpx.AsyncClient(base_url=app.base_url, timeout=30, headers=app.headers) as api:

        async def create(device: str) -> None:
            async with limit:
                body = {"id": device, "name": device, "type": "bench"}
                response = await api.post("/api/v1/devices", json=body)
                # 409: registered already (--devices-registered).
                if response.status_code not in (201, 409):
                    raise HarnessError(
                        f"POST /api/v1/devices ({device}): {response.status_code} {response.text}"
                    )
                response = await post_once_committed(api, f"/api/v1/devices/{device}/credentials")
                if response.status_code != 201:
                    raise HarnessError(
                        f"POST /api/v1/devices/{device}/credentials: "
                        f"{response.status_code} {response.text}"
                    )
                passwords[device] = response.json()["password"]

        started = time.time()
        await asyncio.gather(*(create(device) for device in devices))
        created_s = time.time() - started
        late_commits = sum(post_once_committed.retried.values())
        on_broker_s = None
        if args.device_auth:
            on_broker_s = await wait_on_broker(app, api, devices, limit)
    stopped = await stop_app(app)
    await end_mqtt_session(run.services.mqtt_url, client_id)
    path = run.workdir / "device-passwords.json"
    path.touch(mode=0o600)
    path.write_bytes(orjson.dumps(passwords))
    run.passwords, run.passwords_file = passwords, path
    summary["provisioning"] = {
        "devices": len(devices),
        "app_ready_s": round(ready_s, 2),
        "registered_with_credentials_s": round(created_s, 2),
        "all_on_broker_s": round_or_none(on_broker_s, 2),
        # Credential POSTs answered 404 for a device whose POST had just answered 201.
        "device_not_yet_committed_404s": late_commits,
        "app_stop": stopped,
    }


class CommittedPost:
    """POST, again after a 404 for up to 5 s: the app answers a request before its session
    dependency commits (FastAPI runs a `yield` dependency's exit after the response), so the
    device a 201 just registered may not be visible yet to the next request."""

    def __init__(self) -> None:
        self.retried: dict[str, int] = {}

    async def __call__(self, api: httpx.AsyncClient, path: str) -> httpx.Response:
        deadline = time.monotonic() + 5
        while True:
            response = await api.post(path)
            if response.status_code != 404 or time.monotonic() > deadline:
                return response
            self.retried[path] = self.retried.get(path, 0) + 1
            await asyncio.sleep(0.05)


async def wait_on_broker(
    app: App, api: httpx.AsyncClient, devices: Sequence[str], limit: asyncio.Semaphore
) -> float:
    """Seconds until every device's credential is on the broker (`on_broker`: true)."""
    started = time.time()
    within = 60 + len(devices) / 20  # iotmeter puts ~74 accounts/s on Mosquitto 2.0.11
    pending = set(devices)

    async def on_broker(device: str) -> bool:
        async with limit:
            response = await api.get(f"/api/v1/devices/{device}/credentials")
        return response.status_code == 200 and response.json().get("on_broker") is True

    while pending:
        ordered = sorted(pending)
        answers = await asyncio.gather(*(on_broker(device) for device in ordered))
        pending -= {device for device, done in zip(ordered, answers, strict=True) if done}
        if not pending:
            break
        if time.time() - started > within:
            raise app.failure(
                f"had {len(pending)} of {len(devices)} device credentials not on the broker "
                f"after {within:.0f} s"
            )
        await asyncio.sleep(0.5)
    return time.time() - started


async def end_mqtt_session(mqtt_url: str, client_id: str) -> None:
    """End a stopped client's persistent session: connect under its id with a clean session."""
    import aiomqtt

    host, port, username, password = broker_address(mqtt_url)
    async with aiomqtt.Client(
        host,
        port,
        username=username,
        password=password,
        identifier=client_id,
        clean_session=True,
        timeout=10,
    ):
        pass


def finish(summary: dict[str, Any]) -> None:
    stored = (summary.get("iotmeter") or {}).get("stored_msg_per_s")
    ceiling = (summary.get("ceiling") or {}).get("msg_per_s")
    puts = (summary.get("s3_put_ceiling") or {}).get("puts_per_s")
    summary["ratio_stored_to_ceiling"] = (
        round(stored / ceiling, 4) if stored is not None and ceiling else None
    )
    summary["ratio_stored_to_s3_puts"] = round(stored / puts, 4) if stored and puts else None
    if summary["config"]["mode"] == "backlog":
        backlog = summary.get("backlog") or {}
        bare = summary.get("bare_drain") or {}
        for name, app_key, bare_key in (
            ("ratio_drain_to_bare", "msg_per_s_from_first_received", "msg_per_s"),
            (
                "ratio_drain_to_bare_from_process_start",
                "msg_per_s_from_process_start",
                "msg_per_s_from_process_start",
            ),
        ):
            app_rate, bare_rate = backlog.get(app_key), bare.get(bare_key)
            summary[name] = round(app_rate / bare_rate, 4) if app_rate and bare_rate else None
    summary["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    summary["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--mode",
        choices=["steady", "backlog"],
        default="steady",
        help="steady: a sustained load against the ceiling; backlog: drain a backlog queued "
        "in the broker while the app was down, against a bare subscriber's drain",
    )
    load.add_argument(
        "--backlog",
        type=int,
        default=400_000,
        metavar="MESSAGES",
        help="backlog mode: messages queued while the consumer is down (smoke: 5,000)",
    )
    load.add_argument(
        "--devices",
        type=int,
        help="publishing devices (default 1,000; 200 with per-device connections: iotmeter "
        "puts ~74 accounts/s on Mosquitto 2.0.11)",
    )
    load.add_argument("--duration", type=float, default=60, help="seconds of publishing")
    load.add_argument("--warmup", type=float, help="seconds excluded from the rates (20%%, ≤10)")
    load.add_argument(
        "--rate",
        type=float,
        default=0,
        help="total msg/s; 0: as fast as the consumer takes (publishers stay a window ahead)",
    )
    load.add_argument("--publishers", type=int, default=1, help="publisher processes")
    load.add_argument("--ack-timeout", type=float, default=60)
    load.add_argument(
        "--drain-idle",
        type=float,
        default=15,
        help="stop draining when stored has not moved for this long",
    )
    load.add_argument("--drain-timeout", type=float, default=300)
    load.add_argument("--probe-interval", type=float, default=0.1)
    load.add_argument("--poll-interval", type=float, default=0.02)
    load.add_argument(
        "--devices-registered", type=int, default=0, help="register N devices before the run"
    )
    load.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True)
    load.add_argument(
        "--alert-rules", type=int, default=0, help="create N alert rules before the load"
    )
    load.add_argument(
        "--alert-latency",
        type=float,
        default=0,
        help="every S seconds a device breaches a rule; measure breach-to-webhook latency",
    )

    auth = parser.add_argument_group(
        "device authentication (steady mode; one MQTT connection per device)"
    )
    auth.add_argument(
        "--device-auth",
        action="store_true",
        help="Mosquitto with the dynamic-security plugin (anonymous access off); the app runs "
        "with IOTMETER_MQTT_DEVICE_AUTH=true under the plugin's admin account and reconciles "
        "the device accounts; devices are registered and get their credentials through the "
        "API first; each device connects on its own (client id = username = device id); "
        "the bare subscriber uses the admin account",
    )
    auth.add_argument(
        "--per-device-connections",
        action="store_true",
        help="the same as --device-auth on an anonymous broker with device auth off: the "
        "like-for-like baseline",
    )
    auth.add_argument(
        "--device-auth-compare",
        action="store_true",
        help="run --per-device-connections, then --device-auth (each on fresh services), "
        "--repeat times alternating, and print both rates and their ratio; default --no-api "
        "and no S3 PUT phase",
    )
    auth.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="--device-auth-compare, --compare-env: pairs of runs (off, on)",
    )
    auth.add_argument(
        "--compare-env",
        action="append",
        default=[],
        metavar="IOTMETER_NAME=VALUE",
        help="run without (off) and with (on) these app settings, --repeat times alternating, "
        "each on fresh services, and print both rates and their ratio (e.g. "
        "--app-env IOTMETER_METRICS_ENABLED=false --compare-env IOTMETER_METRICS_ENABLED=true)",
    )
    auth.add_argument(
        "--compare-live-streams",
        type=int,
        default=0,
        metavar="N",
        help="run without (off) and with (on) N open live event streams (dashboard tabs on "
        "/api/v1/live), --repeat times alternating, each on fresh services",
    )

    app = parser.add_argument_group("iotmeter")
    app.add_argument("--archive", choices=["s3", "local"], default="s3")
    app.add_argument(
        "--live-streams",
        type=int,
        default=0,
        metavar="N",
        help="keep N live event streams open during the ingest phase, each watching "
        "--live-devices-per-stream bench devices (with stats), as dashboard tabs would",
    )
    app.add_argument("--live-devices-per-stream", type=int, default=5)
    app.add_argument(
        "--archive-layout",
        choices=["per-message", "segment"],
        help="default: per-message (steady mode), segment (backlog mode)",
    )
    app.add_argument(
        "--app-env",
        action="append",
        default=[],
        metavar="IOTMETER_NAME=VALUE",
        help="extra setting for the app (repeatable)",
    )
    app.add_argument("--app-log-level", default="WARNING")
    app.add_argument(
        "--app-ref",
        metavar="GIT_REF",
        help="run the app's code at this git revision (e.g. HEAD) instead of the working tree",
    )
    app.add_argument(
        "--profile",
        type=float,
        default=0,
        metavar="SECONDS",
        help="py-spy the app for this long during the steady state (backlog mode: from the "
        "second start)",
    )

    api = parser.add_argument_group("API load")
    api.add_argument(
        "--seed-hours",
        type=float,
        default=0,
        help="write this many past hours of readings before the app starts (its lifecycle "
        "task compacts and rolls them up while ingest runs; compare with --compare-env "
        "IOTMETER_COMPACTION_ENABLED=true and --app-env IOTMETER_COMPACTION_ENABLED=false)",
    )
    api.add_argument("--seed-devices", type=int, default=500, help="devices of --seed-hours")
    api.add_argument("--seed-interval", type=float, default=2.0, help="seconds between readings")
    api.add_argument("--api", action=argparse.BooleanOptionalAction, default=True)
    api.add_argument("--api-concurrency", type=int, default=32)
    api.add_argument("--api-duration", type=float, default=10)
    api.add_argument("--api-rate", type=float, default=1000, help="open-loop device get req/s")
    api.add_argument(
        "--api-client",
        choices=["raw", "httpx"],
        default="raw",
        help="HTTP client, closed loop. raw (default): keep-alive HTTP/1.1 with hand-written "
        "framing, ~1/10 of httpx's CPU per request, so that on a small machine the client "
        "does not take the app's CPU; httpx: httpx.AsyncClient",
    )
    api.add_argument("--api-processes", type=int, default=1, help="client processes, closed loop")
    api.add_argument("--api-open-client", choices=["raw", "httpx"], default="raw")
    api.add_argument(
        "--profile-api",
        type=float,
        default=0,
        metavar="SECONDS",
        help="py-spy the app during each closed-loop API test",
    )
    api.add_argument(
        "--api-open-processes", type=int, default=1, help="client processes, open loop"
    )

    services = parser.add_argument_group("services (default: started by the harness)")
    services.add_argument("--mqtt-url")
    services.add_argument("--database-url")
    services.add_argument("--keep-database", action="store_true")
    services.add_argument("--s3-endpoint")
    services.add_argument("--s3-access-key")
    services.add_argument("--s3-secret-key")
    services.add_argument("--s3-bucket")
    services.add_argument(
        "--s3-put-seconds",
        type=float,
        help="S3 small-PUT ceiling phase (default 10 s on the own SeaweedFS in the steady "
        "mode; off on a given endpoint and in the backlog mode)",
    )
    services.add_argument("--s3-put-concurrency", type=int, default=64)
    services.add_argument("--influx-url")
    services.add_argument("--influx-token")
    services.add_argument("--influx-org", default="iot-org")
    services.add_argument("--influx-bucket", default="iot-metrics")

    output = parser.add_argument_group("output")
    output.add_argument("--json", type=Path, help="summary path (default bench/results/...)")
    output.add_argument("--keep-workdir", action="store_true", help="keep logs, spool, archive")
    output.add_argument(
        "--smoke",
        action="store_true",
        help="CI: 100 devices, 5 s at 500 msg/s, 2 s per API test at concurrency 8, a backlog "
        "of 5,000 (explicit options still apply)",
    )
    return parser


SMOKE_DEFAULTS: dict[str, Any] = {
    "devices": 100,
    "duration": 5.0,
    "rate": 500.0,
    "drain_timeout": 60.0,
    "drain_idle": 10.0,
    "api_duration": 2.0,
    "api_concurrency": 8,
    "api_rate": 100.0,
    "s3_put_default": 2.0,
    "backlog": 5000,
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    parser.set_defaults(s3_put_default=10.0)
    if "--smoke" in argv:
        # Smoke values replace the defaults only: options given explicitly still win.
        parser.set_defaults(**SMOKE_DEFAULTS)
    if (
        "--device-auth-compare" in argv
        or "--compare-env" in argv
        or any(arg.startswith("--compare-live-streams") for arg in argv)
    ):
        # The question is ingest with and without device auth: no API or S3 PUT phases
        # unless asked for.
        parser.set_defaults(api=False, s3_put_default=0.0)
    args = parser.parse_args(argv)
    per_device = args.device_auth or args.per_device_connections or args.device_auth_compare
    if args.devices is None:
        args.devices = 200 if per_device else 1000
    if per_device and args.mode == "backlog":
        raise SystemExit("the device-auth options apply to the steady mode only")
    if args.device_auth_compare and args.mqtt_url:
        raise SystemExit("--device-auth-compare starts its own brokers: no --mqtt-url")
    comparing = args.device_auth_compare or args.compare_env or args.compare_live_streams
    if args.repeat < 1 or (args.repeat > 1 and not comparing):
        raise SystemExit("--repeat goes with --device-auth-compare or --compare-env, at least 1")
    if sum(map(bool, (args.compare_env, args.device_auth_compare, args.compare_live_streams))) > 1:
        raise SystemExit("--compare-env and --device-auth-compare are two questions: one at a time")
    if per_device and args.devices > MAX_CONNECTIONS_PER_PUBLISHER * args.publishers:
        raise SystemExit(
            f"per-device connections: at most {MAX_CONNECTIONS_PER_PUBLISHER} devices per "
            "publisher process (raise --publishers)"
        )
    if args.archive_layout is None:
        args.archive_layout = "segment" if args.mode == "backlog" else "per-message"
    if args.mode == "backlog":
        args.s3_put_default = 0.0  # the per-message layout's ceiling: not this mode's question
        if not 0 < args.backlog <= BENCH_MAX_QUEUED_MESSAGES:
            raise SystemExit(f"--backlog must be between 1 and {BENCH_MAX_QUEUED_MESSAGES:,}")
    if args.warmup is None:
        args.warmup = min(10.0, args.duration * 0.2)
    if args.warmup >= args.duration:
        raise SystemExit("--warmup must be shorter than --duration")
    if args.devices < args.publishers:
        raise SystemExit("--devices must be at least --publishers")
    return args


async def main_async(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.device_auth_compare or args.compare_env or args.compare_live_streams:
        return await compare_device_auth(args, argv)
    _summary, status = await run_once(args, argv)
    return status


async def run_once(
    args: argparse.Namespace, argv: Sequence[str], path: Path | None = None
) -> tuple[dict[str, Any], int]:
    """One run on fresh services: its table on stdout, its summary in `path` (default
    `--json`, else bench/results/...)."""
    started = datetime.now(UTC)
    summary: dict[str, Any] = {
        "harness": "bench/harness.py",
        "command": " ".join(["bench/harness.py", *argv]),
        "started_at": started.isoformat(timespec="seconds"),
        "git": git_revision(),
        "machine": {
            "cpus": psutil.cpu_count(),
            "memory_mb": round(psutil.virtual_memory().total / MB),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "mode": args.mode,
            "backlog": args.backlog if args.mode == "backlog" else None,
            "devices": args.devices,
            "devices_registered": args.devices_registered,
            "duration": args.duration,
            "warmup": args.warmup,
            "rate": args.rate,
            "publishers": args.publishers,
            "readings_per_message": 4,
            "qos": 1,
            "archive": args.archive,
            "archive_layout": args.archive_layout,
            "influx": bool(args.influx_url),
            "app_env": args.app_env,
            "api_concurrency": args.api_concurrency,
            "api_duration": args.api_duration,
            "api_rate": args.api_rate,
            "smoke": args.smoke,
            "device_auth": args.device_auth,
            "per_device_connections": args.device_auth or args.per_device_connections,
        },
    }
    mode = "backlog-" if args.mode == "backlog" else ""
    if args.device_auth:
        mode += "device-auth-"
    elif args.per_device_connections:
        mode += "per-device-"
    path = (
        path
        or args.json
        or RESULTS / (f"{started:%Y%m%d-%H%M%S}-{mode}{args.archive_layout}-{args.archive}.json")
    )
    workdir = Path(tempfile.mkdtemp(prefix="iotmeter-bench-"))
    status = 0
    try:
        async with asyncio.timeout(time_budget(args)):
            await execute(args, summary, workdir)
    except (HarnessError, TimeoutError) as exc:
        summary["error"] = str(exc) or f"the run took longer than {time_budget(args):.0f} s"
        status = 1
    finally:
        finish(summary)
        path.parent.mkdir(parents=True, exist_ok=True)
        for label, profile in profiles(summary):
            if profile.get("file") and Path(profile["file"]).exists():
                kept = path.with_suffix(f".{label}.speedscope.json")
                shutil.copyfile(profile["file"], kept)
                profile["file"] = str(kept)
        path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        if args.keep_workdir:
            print(f"work folder kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render_backlog_table(summary) if args.mode == "backlog" else render_table(summary))
    for warning in summary.get("warnings", []):
        print(f"\nWARNING: {warning}", file=sys.stderr)
    if "error" in summary:
        print(f"\nERROR: {summary['error']}", file=sys.stderr)
    print(f"\nsummary: {path}", flush=True)
    return summary, status


# --- device auth on / off ------------------------------------------------------------------------

COMPARED_CPU = ("app", "subscriber", "broker", "publishers", "postgres", "s3", "harness")
CONTAMINATION = ("machine_busy", "machine_irq", "machine_steal", "outside_bench")


async def compare_device_auth(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """`--per-device-connections` (auth off) and `--device-auth` (on), `--repeat` pairs run
    alternately, each on fresh services; prints every run's table, then both rates and the
    ratio on / off. The combined summary goes to `--json` (default bench/results/...), each
    run's own beside it."""
    started = datetime.now(UTC)
    if args.compare_env:
        question, kind = f"without / with {' '.join(args.compare_env)}", "env-compare"
    elif args.compare_live_streams:
        question = f"without / with {args.compare_live_streams} live event streams"
        kind = "live-compare"
    else:
        question = "device auth off / on, one MQTT connection per device"
        kind = "device-auth-compare"
    base = args.json or RESULTS / (
        f"{started:%Y%m%d-%H%M%S}-{kind}-{args.archive_layout}-{args.archive}.json"
    )
    runs: list[dict[str, Any]] = []
    status = 0
    for repetition in range(1, args.repeat + 1):
        for variant in ("off", "on"):
            variant_args = argparse.Namespace(**vars(args))
            variant_args.device_auth_compare = False
            variant_args.compare_env = []
            variant_args.compare_live_streams = 0
            if args.compare_env:
                if variant == "on":
                    variant_args.app_env = [*args.app_env, *args.compare_env]
            elif args.compare_live_streams:
                variant_args.live_streams = args.compare_live_streams if variant == "on" else 0
            else:
                variant_args.device_auth = variant == "on"
                variant_args.per_device_connections = True
            path = base.with_suffix(f".{repetition}-auth-{variant}.json")
            print(
                f"{question}: run {len(runs) + 1} of {2 * args.repeat}: {variant} ...",
                file=sys.stderr,
                flush=True,
            )
            summary, run_status = await run_once(variant_args, argv, path)
            status = status or run_status
            runs.append(comparison_entry(summary, variant, repetition, path))
    document = {
        "harness": "bench/harness.py",
        "command": " ".join(["bench/harness.py", *argv]),
        "question": question,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "runs": runs,
        "comparison": compare_runs(runs),
    }
    base.parent.mkdir(parents=True, exist_ok=True)
    base.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    print(render_comparison(document))
    print(f"\ncomparison summary: {base}")
    return status


def comparison_entry(
    summary: dict[str, Any], variant: str, repetition: int, path: Path
) -> dict[str, Any]:
    """What the comparison keeps of one run: rates, loss, CPU by group and how much of the
    machine went to processes outside the bench (contamination)."""
    ingest = summary.get("iotmeter") or {}
    ceiling = summary.get("ceiling") or {}
    cpu = ingest.get("cpu_percent") or {}
    ceiling_cpu = ceiling.get("cpu_percent") or {}
    latency = ingest.get("latency") or {}
    stored = ingest.get("stored_msg_per_s")
    broker_cpu = cpu.get("broker")
    return {
        "variant": variant,
        "repetition": repetition,
        "summary_file": str(path),
        "error": summary.get("error"),
        "stored_msg_per_s": stored,
        "received_msg_per_s": ingest.get("received_msg_per_s"),
        # Acked by the broker over the whole window (the publishers stay a window ahead of
        # what the app took): smoother than stored, which the segment layout moves in steps.
        "acked_msg_per_s_whole_run": round(ingest["acked"] / summary["config"]["duration"], 1)
        if ingest.get("acked")
        else None,
        "ceiling_msg_per_s": ceiling.get("msg_per_s"),
        "ratio_stored_to_ceiling": summary.get("ratio_stored_to_ceiling"),
        "acked": ingest.get("acked"),
        "stored": ingest.get("stored"),
        "loss": ingest.get("loss"),
        "drained": ingest.get("drained"),
        "sql_missing": (ingest.get("sql_rows_check") or {}).get("missing"),
        "ceiling_loss": None
        if ceiling.get("drained") == "timeout" or "acked" not in ceiling
        else max(0, ceiling["acked"] - ceiling["received"]),
        "latency_p50_ms": latency.get("p50_ms"),
        "latency_p99_ms": latency.get("p99_ms"),
        # The broker's share per 1,000 msg/s: where the plugin's checks would show.
        "broker_cpu_per_1000_msg_s": round(1000 * broker_cpu / stored, 2)
        if broker_cpu is not None and stored
        else None,
        "cpu_percent": {key: cpu.get(key) for key in (*COMPARED_CPU, *CONTAMINATION)},
        "ceiling_cpu_percent": {
            key: ceiling_cpu.get(key) for key in (*COMPARED_CPU, *CONTAMINATION)
        },
        "top_outside_processes": ingest.get("top_outside_processes"),
        "ceiling_top_outside_processes": ceiling.get("top_outside_processes"),
        "load_average_start": summary["machine"].get("load_average_start"),
        "load_average_end": summary["machine"].get("load_average_end"),
        "provisioning": summary.get("provisioning"),
        "live": ingest.get("live"),
    }


def mean(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else round(numerator / denominator, 4)


def spread(values: Iterable[float | None]) -> float | None:
    """max / min - 1 of the values given (None with fewer than two)."""
    present = [value for value in values if value]
    if len(present) < 2:
        return None
    return round(max(present) / min(present) - 1, 4)


def compare_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means per variant, the ratio on / off (of the means, and of each off-on pair), and each
    variant's spread (max / min - 1): a difference smaller than the spread is not resolved."""
    result: dict[str, Any] = {}
    for key in (
        "stored_msg_per_s",
        "received_msg_per_s",
        "acked_msg_per_s_whole_run",
        "ceiling_msg_per_s",
        "ratio_stored_to_ceiling",
        "broker_cpu_per_1000_msg_s",
    ):
        by_variant = {
            variant: [run[key] for run in runs if run["variant"] == variant and not run["error"]]
            for variant in ("off", "on")
        }
        off, on = mean(by_variant["off"]), mean(by_variant["on"])
        result[key] = {
            "off_mean": round_or_none(off, 4),
            "on_mean": round_or_none(on, 4),
            "ratio_on_off": ratio(on, off),
            "spread_off": spread(by_variant["off"]),
            "spread_on": spread(by_variant["on"]),
        }
    pairs = []
    for repetition in sorted({run["repetition"] for run in runs}):
        pair = {run["variant"]: run for run in runs if run["repetition"] == repetition}
        if "off" in pair and "on" in pair:
            pairs.append(
                {
                    "repetition": repetition,
                    "stored_ratio_on_off": ratio(
                        pair["on"]["stored_msg_per_s"], pair["off"]["stored_msg_per_s"]
                    ),
                    "ceiling_ratio_on_off": ratio(
                        pair["on"]["ceiling_msg_per_s"], pair["off"]["ceiling_msg_per_s"]
                    ),
                }
            )
    result["pairs"] = pairs
    stored_ratio = result["stored_msg_per_s"]["ratio_on_off"]
    result["within_5_percent"] = None if stored_ratio is None else stored_ratio >= 0.95
    result["loss_total"] = {
        variant: sum(run["loss"] or 0 for run in runs if run["variant"] == variant)
        for variant in ("off", "on")
    }
    return result


def render_comparison(document: dict[str, Any]) -> str:
    comparison = document["comparison"]
    lines = [
        "",
        f"{document['question']} ({document['started_at']} to {document['finished_at']})",
        f"  {'run':<5}{'auth':<6}{'stored msg/s':>13}{'ceiling':>10}{'stored/ceil':>12}"
        f"{'loss':>7}{'app %':>7}{'broker %':>9}{'pub %':>7}{'pg %':>6}"
        f"{'outside % (ceil/app)':>22}{'busy %':>8}",
    ]
    for run in document["runs"]:
        cpu, ceiling_cpu = run["cpu_percent"], run["ceiling_cpu_percent"]
        lines.append(
            f"  {run['repetition']:<5}{run['variant']:<6}{fmt(run['stored_msg_per_s']):>13}"
            f"{fmt(run['ceiling_msg_per_s']):>10}{fmt(run['ratio_stored_to_ceiling'], '.1%'):>12}"
            f"{fmt(run['loss']):>7}{fmt(cpu.get('app')):>7}{fmt(cpu.get('broker')):>9}"
            f"{fmt(cpu.get('publishers')):>7}{fmt(cpu.get('postgres')):>6}"
            f"{fmt(ceiling_cpu.get('outside_bench'), '.1f') + ' / ':>15}"
            f"{fmt(cpu.get('outside_bench'), '.1f'):<7}"
            f"{fmt(cpu.get('machine_busy')):>8}"
            + (f"  ERROR: {run['error'][:60]}" if run["error"] else "")
        )
    stored = comparison["stored_msg_per_s"]
    ceiling = comparison["ceiling_msg_per_s"]
    lines += [
        "",
        row("stored msg/s, mean off / on", f"{fmt(stored['off_mean'])} / {fmt(stored['on_mean'])}"),
        row("ratio on / off (stored)", fmt(stored["ratio_on_off"], ".1%")),
        row(
            "ratio on / off (received; acked over the run)",
            f"{fmt(comparison['received_msg_per_s']['ratio_on_off'], '.1%')}; "
            f"{fmt(comparison['acked_msg_per_s_whole_run']['ratio_on_off'], '.1%')}",
        ),
        row(
            "ratio on / off per pair",
            ", ".join(fmt(pair["stored_ratio_on_off"], ".1%") for pair in comparison["pairs"])
            or "-",
        ),
        row(
            "spread between repeats, off / on",
            f"{fmt(stored['spread_off'], '.1%')} / {fmt(stored['spread_on'], '.1%')}",
        ),
        row(
            "ceiling msg/s, mean off / on",
            f"{fmt(ceiling['off_mean'])} / {fmt(ceiling['on_mean'])}",
        ),
        row("ratio on / off (ceiling)", fmt(ceiling["ratio_on_off"], ".1%")),
        row(
            "broker CPU % per 1,000 msg/s stored, off / on",
            f"{fmt(comparison['broker_cpu_per_1000_msg_s']['off_mean'], '.2f')} / "
            f"{fmt(comparison['broker_cpu_per_1000_msg_s']['on_mean'], '.2f')}",
        ),
        row(
            "loss, off / on",
            f"{comparison['loss_total']['off']:,} / {comparison['loss_total']['on']:,}",
        ),
        row("within 5 % (on >= 95 % of off)", fmt(comparison["within_5_percent"])),
    ]
    for run in document["runs"]:
        live = run.get("live")
        if live:
            lines.append(
                row(
                    f"live streams, run {run['repetition']} {run['variant']}",
                    f"{live['opened']}/{live['streams']} open, {live['readings']:,} readings "
                    f"in {live['readings_events']:,} events, {live['bytes'] / 1e6:.1f} MB, "
                    f"{live['gaps']} gaps"
                    + (f", errors: {live['errors']}" if live["errors"] else ""),
                )
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return run_worker(argv[1:])
    args = parse_args(argv)
    return asyncio.run(main_async(args, argv))


if __name__ == "__main__":
    sys.exit(main())
