"""Shutdown and start-up failure with real processes: the app ends by itself, whatever it does.

Every test runs `python -m iotmeter serve` (or `uvicorn iotmeter.app:app`, the README's way) as
a subprocess against real brokers and checks what a user sees: the process exits, how fast, with
which code, and what it says in its log. Nothing is mocked.

The measured shutdown times are printed as `SHUTDOWN:` lines (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from tests.fixtures.delivery import AppProcess, app_environment
from tests.fixtures.services import Mosquitto, free_port
from tests.fixtures.waiting import eventually

SHUTDOWN_LIMIT_S = 5.0
"""The issue's promise (and `iotmeter.runtime.STOP_TIMEOUT_S`): every task stops within it."""
SHUTDOWN_MARGIN_S = 3.0
"""For what comes after the tasks: the HTTP server closing, interpreter teardown, a busy CI."""
STARTUP_FAILURE_LIMIT_S = 15.0
HANG_AFTER_S = 30.0
"""A process still running this long after its signal is hung: killed, and the test fails."""
TAKEOVER_ERROR = "IOTMETER_MQTT_CLIENT_ID"
TELEMETRY_TOPIC = "iot/dev-1/telemetry"
SIGNALS = [
    pytest.param(signal.SIGINT, id="SIGINT"),
    pytest.param(signal.SIGTERM, id="SIGTERM"),
]


# --- helpers ----------------------------------------------------------------------------------


def environment(
    workdir: Path, mqtt_url: str, *, client_id: str | None = None, **extra: str
) -> dict[str, str]:
    """`IOTMETER_*` for one app: its own SQLite file, spool and archive folder in `workdir`.

    Without `client_id` the variable is left unset: the app makes its default client id.
    """
    env = app_environment(
        database_url=f"sqlite+aiosqlite:///{workdir / 'iotmeter.db'}",
        mqtt_url=mqtt_url,
        workdir=workdir,
        client_id=client_id or "unset",
        **extra,
    )
    if client_id is None:
        del env["IOTMETER_MQTT_CLIENT_ID"]
    return env


def s3_down() -> dict[str, str]:
    """An S3 archive whose endpoint refuses every connection: the archive sink keeps retrying."""
    return {
        "IOTMETER_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "IOTMETER_S3_ACCESS_KEY": "dummy-access-key",
        "IOTMETER_S3_SECRET_KEY": "dummy-secret-key",
    }


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[Callable[..., AppProcess]]:
    """Makes `AppProcess`es in folders of `tmp_path`; any still running at the end is killed."""
    made: list[AppProcess] = []

    def make(name: str, env_of: Callable[[Path], dict[str, str]]) -> AppProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        app = AppProcess(env_of(workdir), workdir)
        made.append(app)
        return app

    yield make
    for app in made:
        app.close()


async def readiness(app: AppProcess) -> tuple[int, dict[str, Any]]:
    """`/ready`: (status code, body); (0, {}) while the app does not answer."""
    try:
        async with httpx.AsyncClient(
            base_url=app.base_url, timeout=5.0, headers=app.headers
        ) as client:
            response = await client.get("/ready")
    except httpx.HTTPError:
        return 0, {}
    return response.status_code, response.json()


async def stats(app: AppProcess) -> dict[str, Any]:
    body = await app.stats()
    return body or {}


def mqtt_detail(ready: tuple[int, dict[str, Any]]) -> str:
    return str(ready[1].get("backends", {}).get("mqtt", {}).get("detail", ""))


async def wait_ready_body(
    app: AppProcess, accept: Callable[[tuple[int, dict[str, Any]]], bool], what: str
) -> tuple[int, dict[str, Any]]:
    try:
        return await eventually(
            lambda: readiness(app), accept, within=30.0, interval=0.2, what=what
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlog:\n{app.log_tail()}") from None


async def signal_and_wait(app: AppProcess, signum: signal.Signals) -> tuple[int | None, float]:
    """Send `signum`; (exit code or None if still running after `HANG_AFTER_S`, seconds)."""
    process = app.process
    assert process is not None
    assert process.poll() is None, f"the app had exited already:\n{app.log_tail()}"
    started = time.monotonic()
    process.send_signal(signum)
    try:
        code: int | None = await asyncio.to_thread(process.wait, HANG_AFTER_S)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - started


def log_lines(app: AppProcess, needle: str) -> list[str]:
    if not app.log_path.exists():
        return []
    return [
        line for line in app.log_path.read_text(errors="replace").splitlines() if needle in line
    ]


def publish(port: int, payloads: list[bytes], topic: str = TELEMETRY_TOPIC) -> None:
    """Publish at QoS 1 and wait for every PUBACK from the broker (blocking: run in a thread)."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"shutdown-test-publisher-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
    )
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for payload in payloads]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published(), "the broker did not acknowledge a publish"
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.asynccontextmanager
async def silent_broker() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP server that accepts connections and never sends a byte: an MQTT CONNECT sent to
    it is never answered. Yields (port, first bytes read on each connection)."""
    received: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            received.append(await reader.read(1024))
            while await reader.read(1024):
                pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, received
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


def report(line: str) -> None:
    print(line, flush=True)


# --- 1. start-up fails: the HTTP port is taken --------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        yield sock.getsockname()[1]


async def wait_exit(process: subprocess.Popen[bytes], within: float) -> tuple[int | None, float]:
    started = time.monotonic()
    try:
        code: int | None = await asyncio.to_thread(process.wait, within)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - started


async def test_serve_exits_non_zero_when_the_http_port_is_taken(
    mosquitto: Mosquitto, apps: Callable[..., AppProcess], taken_port: int
) -> None:
    app = apps("serve", lambda workdir: environment(workdir, mosquitto.url))
    app.port = taken_port
    started = time.monotonic()
    await app.start(wait="none")
    assert app.process is not None
    code, _ = await wait_exit(app.process, STARTUP_FAILURE_LIMIT_S)
    took = time.monotonic() - started
    report(f"SHUTDOWN: start-up failed (port taken), iotmeter serve: exit {code} in {took:.2f} s")
    assert code is not None, (
        f"still running {STARTUP_FAILURE_LIMIT_S} s after failing to bind:\n{app.log_tail()}"
    )
    assert code != 0, f"exit code 0 after a failed start-up:\n{app.log_tail()}"
    assert log_lines(app, "address already in use"), app.log_tail()


async def test_uvicorn_exits_non_zero_when_the_http_port_is_taken(
    mosquitto: Mosquitto, tmp_path: Path, taken_port: int
) -> None:
    env = environment(tmp_path, mosquitto.url)
    base = {key: value for key, value in os.environ.items() if not key.startswith("IOTMETER_")}
    uvicorn = Path(sys.executable).parent / "uvicorn"
    log_path = tmp_path / "uvicorn.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = await asyncio.to_thread(
            subprocess.Popen,
            [str(uvicorn), "iotmeter.app:app", "--port", str(taken_port)],
            env={**base, **env, "PYTHONUNBUFFERED": "1"},
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        code, _ = await wait_exit(process, STARTUP_FAILURE_LIMIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            await asyncio.to_thread(process.wait, 10)
    took = time.monotonic() - started
    output = log_path.read_text(errors="replace")
    report(f"SHUTDOWN: start-up failed (port taken), uvicorn: exit {code} in {took:.2f} s")
    assert code is not None, f"still running {STARTUP_FAILURE_LIMIT_S} s after:\n{output}"
    assert code != 0, f"exit code 0 after a failed start-up:\n{output}"
    assert "address already in use" in output, output


# --- 2. a signal ends the app within 5 s, whatever it is doing ----------------------------------


async def assert_prompt_shutdown(app: AppProcess, signum: signal.Signals, state: str) -> None:
    code, took = await signal_and_wait(app, signum)
    report(f"SHUTDOWN: {state}, {signum.name}: exit {code} in {took:.2f} s")
    assert code is not None, (
        f"{state}: still running {HANG_AFTER_S:.0f} s after {signum.name}:\n{app.log_tail()}"
    )
    assert took < SHUTDOWN_LIMIT_S + SHUTDOWN_MARGIN_S, (
        f"{state}: {signum.name} took {took:.1f} s:\n{app.log_tail()}"
    )
    # The supervisor says so when a task ignores its cancellation (and leaves it behind).
    left_behind = log_lines(app, "did not stop within") + log_lines(app, "failed while stopping")
    assert not left_behind, left_behind
    assert log_lines(app, "Application shutdown complete"), app.log_tail()
    hint = ""
    if code == -signum:
        hint = (
            f" (the process ended by {signum.name} itself after its graceful shutdown: uvicorn "
            "re-raises the signal it caught once the server has stopped)"
        )
    assert code == 0, f"{state}: exit code {code} after {signum.name}{hint}:\n{app.log_tail()}"


@pytest.mark.parametrize("signum", SIGNALS)
async def test_signal_stops_a_connected_idle_app(
    signum: signal.Signals, mosquitto: Mosquitto, apps: Callable[..., AppProcess]
) -> None:
    app = apps("idle", lambda workdir: environment(workdir, mosquitto.url))
    await app.start()
    await wait_ready_body(
        app, lambda ready: ready[0] == 200, "ready (collector subscribed, all up)"
    )
    await assert_prompt_shutdown(app, signum, "connected and idle")


@pytest.mark.parametrize("signum", SIGNALS)
async def test_signal_stops_an_app_reconnecting_to_a_refusing_broker(
    signum: signal.Signals, apps: Callable[..., AppProcess]
) -> None:
    nobody = f"mqtt://127.0.0.1:{free_port()}"
    app = apps("reconnecting", lambda workdir: environment(workdir, nobody))
    await app.start()
    await wait_ready_body(
        app,
        lambda ready: "connection refused" in mqtt_detail(ready).lower(),
        "/ready mqtt says connection refused",
    )
    await assert_prompt_shutdown(app, signum, "reconnecting (connection refused)")


@pytest.mark.parametrize("signum", SIGNALS)
async def test_signal_stops_an_app_waiting_for_a_connack(
    signum: signal.Signals, apps: Callable[..., AppProcess]
) -> None:
    async with silent_broker() as (port, received):
        app = apps("connecting", lambda workdir: environment(workdir, f"mqtt://127.0.0.1:{port}"))

        async def seen() -> list[bytes]:
            return received

        await app.start()
        # The CONNECT reached the server and is not answered: the app is connecting.
        await eventually(
            seen,
            lambda first_bytes: any(data[:1] == b"\x10" for data in first_bytes),
            within=10.0,
            what="an MQTT CONNECT packet at the silent server",
        )
        ready = await readiness(app)
        assert "connecting" in mqtt_detail(ready), ready
        await assert_prompt_shutdown(app, signum, "connecting (CONNECT never answered)")


@pytest.mark.parametrize("signum", SIGNALS)
async def test_signal_stops_an_app_whose_sink_is_retrying(
    signum: signal.Signals, mosquitto: Mosquitto, apps: Callable[..., AppProcess]
) -> None:
    app = apps("sink-retrying", lambda workdir: environment(workdir, mosquitto.url, **s3_down()))
    await app.start()
    await wait_ready_body(
        app, lambda ready: "subscribed" in mqtt_detail(ready), "collector subscribed"
    )
    await asyncio.to_thread(publish, mosquitto.port, [b'{"t": 1}'] * 5)
    body = await eventually(
        lambda: stats(app),
        lambda body: (
            body.get("messages", {}).get("received") == 5
            and "archive" in (body.get("spool") or {}).get("failing_sinks", {})
        ),
        within=30.0,
        interval=0.2,
        what="5 messages received and the archive sink failing",
    )
    assert body["spool"]["depth"] > 0, body["spool"]
    await assert_prompt_shutdown(app, signum, "sink retrying (S3 down)")


@pytest.mark.parametrize("signum", SIGNALS)
async def test_signal_stops_an_app_whose_spool_is_full(
    signum: signal.Signals, mosquitto: Mosquitto, apps: Callable[..., AppProcess]
) -> None:
    app = apps(
        "spool-full",
        lambda workdir: environment(
            workdir, mosquitto.url, IOTMETER_SPOOL_MAX_BYTES=str(1 << 20), **s3_down()
        ),
    )
    await app.start()
    await wait_ready_body(
        app, lambda ready: "subscribed" in mqtt_detail(ready), "collector subscribed"
    )
    payloads = [json.dumps({"t": index, "pad": "x" * 1000}).encode() for index in range(2000)]
    await asyncio.to_thread(publish, mosquitto.port, payloads)
    await wait_ready_body(
        app, lambda ready: "spool full" in json.dumps(ready[1]), "/ready says spool full"
    )
    await assert_prompt_shutdown(app, signum, "spool full (S3 down)")


# --- 3. two apps, default client ids, one broker -------------------------------------------------


def client_id_of(body: dict[str, Any]) -> str:
    return str((body.get("spool") or {}).get("client_id"))


async def stays_ready(app: AppProcess, seconds: float) -> list[str]:
    """Poll `/ready` for `seconds`; every answer that was not 200 with the mqtt entry up."""
    problems: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        code, body = await readiness(app)
        mqtt_status = body.get("backends", {}).get("mqtt", {}).get("status")
        if code != 200 or mqtt_status != "up":
            problems.append(f"{code} mqtt={mqtt_status}: {mqtt_detail((code, body))}")
        await asyncio.sleep(0.2)
    return problems


async def test_two_apps_with_default_client_ids_share_a_broker(
    mosquitto: Mosquitto, apps: Callable[..., AppProcess]
) -> None:
    first = apps("first", lambda workdir: environment(workdir, mosquitto.url))
    second = apps("second", lambda workdir: environment(workdir, mosquitto.url))
    await asyncio.gather(first.start(), second.start())
    await asyncio.gather(first.wait_until("ready", 30), second.wait_until("ready", 30))
    first_id, second_id = [client_id_of(await stats(app)) for app in (first, second)]
    assert first_id != second_id
    for app, client_id in ((first, first_id), (second, second_id)):
        assert client_id.startswith("iotmeter-"), client_id
        kept = Path(app.env["IOTMETER_SPOOL_DIR"]) / "mqtt-client-id"
        assert kept.read_text().strip() == client_id

    # Neither takes the other's session: both stay subscribed.
    problems = await asyncio.gather(stays_ready(first, 5.0), stays_ready(second, 5.0))
    assert problems == [[], []], problems

    # Each has its own session, so each receives the message published once.
    await asyncio.to_thread(publish, mosquitto.port, [b'{"t": 1}'])
    for app in (first, second):
        await eventually(
            lambda app=app: stats(app),
            lambda body: body.get("messages", {}).get("received") == 1,
            what=f"{app.log_path.parent.name} received the message",
        )

    # Restarted on the same spool folder: the same client id, so the same persistent session
    # (what was published while it was down arrives after the restart).
    await first.terminate()
    await asyncio.to_thread(publish, mosquitto.port, [b'{"t": 2}'])
    await first.start()
    await first.wait_until("ready", 30)
    body = await eventually(
        lambda: stats(first),
        lambda body: body.get("messages", {}).get("received") == 1,
        what="the restarted app received what was published while it was down",
    )
    assert client_id_of(body) == first_id


# --- 4. two apps, one explicit client id: said once, then backed off ------------------------------


TAKEOVER_WATCH_S = 60.0
AFTER_ERROR_WATCH_S = 15.0


def subscriptions(app: AppProcess) -> int:
    return len(log_lines(app, "collector subscribed"))


async def test_two_apps_sharing_a_client_id_say_so_once(
    mosquitto: Mosquitto, apps: Callable[..., AppProcess]
) -> None:
    client_id = f"shared-{uuid.uuid4().hex[:8]}"
    both = [
        apps(name, lambda workdir: environment(workdir, mosquitto.url, client_id=client_id))
        for name in ("first", "second")
    ]
    await asyncio.gather(*(app.start() for app in both))

    def errors() -> list[list[str]]:
        return [
            [line for line in log_lines(app, TAKEOVER_ERROR) if "ERROR" in line] for app in both
        ]

    async def errors_so_far() -> list[list[str]]:
        return errors()

    started = time.monotonic()
    await eventually(
        errors_so_far,
        lambda found: any(found),
        within=TAKEOVER_WATCH_S,
        interval=0.5,
        what=f"an error naming {TAKEOVER_ERROR}",
    )
    first_error_s = time.monotonic() - started
    subscriptions_before = [subscriptions(app) for app in both]
    await asyncio.sleep(AFTER_ERROR_WATCH_S)
    found = errors()
    subscriptions_after = [subscriptions(app) for app in both]
    report(
        f"TAKEOVER: first error after {first_error_s:.1f} s; errors per app "
        f"{[len(lines) for lines in found]}; subscriptions per app at the first error "
        f"{subscriptions_before}, {AFTER_ERROR_WATCH_S:.0f} s later {subscriptions_after}"
    )
    for app, lines in zip(both, found, strict=True):
        assert len(lines) <= 1, f"{app.log_path.parent.name} said it {len(lines)} times: {lines}"
    assert client_id in "".join(line for lines in found for line in lines)
    # Backed off: fewer than one new subscription a second between the two (fighting over the
    # session every half second, as the issue describes, would be about four).
    flaps = sum(subscriptions_after) - sum(subscriptions_before)
    assert flaps < AFTER_ERROR_WATCH_S, (flaps, subscriptions_before, subscriptions_after)
