"""Live readings over server-sent events (`/api/v1/live`), on a real uvicorn server with the
real lifespan, real Mosquitto, PostgreSQL and SQLite: what a dashboard tab sees."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson

from iotmeter.app import create_app
from iotmeter.config import Settings
from tests.conftest import auth_headers, make_settings
from tests.fixtures.devices import publish
from tests.fixtures.hostile import as_payload
from tests.fixtures.http_server import RunningServer, running_server
from tests.fixtures.services import Mosquitto
from tests.fixtures.waiting import eventually

Event = tuple[str, Any]


def live_settings(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto, **extra: Any
) -> Settings:
    return make_settings(
        database_url,
        tmp_path,
        mqtt_url=mosquitto.url,
        mqtt_client_id=f"iotmeter-live-{os.getpid()}-{time.monotonic_ns()}",
        collector_enabled=True,
        batch_max_delay_s=0.05,
        **extra,
    )


async def events(response: httpx.Response) -> AsyncIterator[Event]:
    """The stream's events as (name, decoded data); comments skipped."""
    name, data = "message", []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield name, orjson.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


async def collect(
    stream: httpx.Response | AsyncIterator[Event],
    wanted: int,
    *,
    event: str = "readings",
    timeout_s: float = 15.0,
) -> list[Any]:
    """The next `wanted` items of `event` events (readings are lists: flattened); pass the
    same `events(response)` iterator to read a stream more than once."""
    items: list[Any] = []
    source = events(stream) if isinstance(stream, httpx.Response) else stream
    async with asyncio.timeout(timeout_s):
        async for name, data in source:
            if name != event:
                continue
            items.extend(data if isinstance(data, list) else [data])
            if len(items) >= wanted:
                return items
    raise AssertionError(f"the stream ended after {len(items)} of {wanted} {event} items")


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[RunningServer, httpx.AsyncClient]]:
    """The app on a real server, and a client with an admin key once it is ready."""
    async with (
        running_server(create_app(settings)) as server,
        httpx.AsyncClient(
            base_url=server.url, headers=await auth_headers(settings), timeout=30
        ) as client,
    ):
        await eventually(
            lambda: client.get("/ready"), lambda r: r.status_code == 200, what="app ready"
        )
        yield server, client


def message(ts_ms: int, **values: float) -> bytes:
    return orjson.dumps({"ts": ts_ms, **values})


async def test_readings_reach_the_stream_once_stored_and_only_the_watched_devices(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = live_settings(database_url, tmp_path, mosquitto)
    async with served(settings) as (_server, api):
        base = int(time.time() * 1000) - 10_000
        # Register both devices first, so the stream opens on known devices.
        await asyncio.to_thread(
            publish,
            mosquitto.port,
            [
                ("iot/live-a/telemetry", message(base, t=1.0)),
                ("iot/live-b/telemetry", message(base, t=1.0)),
            ],
        )
        await eventually(lambda: api.get("/api/v1/devices/live-b"), lambda r: r.status_code == 200)
        async with api.stream("GET", "/api/v1/live", params={"device_id": "live-a"}) as live:
            assert live.status_code == 200
            assert live.headers["content-type"].startswith("text/event-stream")
            sent = [
                ("iot/live-b/telemetry", message(base + 500, t=99.0)),
                ("iot/live-a/telemetry", b"{not json"),
                ("iot/live-a/telemetry", message(base + 1000, t=20.5, on=True)),
                ("iot/live-a/telemetry", as_payload('{"ts": "yesterday", "t": 1}')),
                ("iot/live-a/telemetry", message(base + 2000, t=21.25)),
                ("iot/live-a/telemetry", message(base + 3000, t=-4.0)),
            ]
            await asyncio.to_thread(publish, mosquitto.port, sent)
            readings = await collect(live, 3)
            assert readings == [
                {
                    "device_id": "live-a",
                    "time": _iso(base + 1000),
                    "fields": {"t": 20.5, "on": True},
                },
                {"device_id": "live-a", "time": _iso(base + 2000), "fields": {"t": 21.25}},
                {"device_id": "live-a", "time": _iso(base + 3000), "fields": {"t": -4.0}},
            ]
            # Pushed once stored: the time-series store answers with every one of them.
            stored = await api.get(
                "/api/v1/devices/live-a/telemetry",
                params={"fields": "t", "start": _iso(base + 500), "stop": _iso(base + 3500)},
            )
            assert stored.status_code == 200
            (series,) = stored.json()["series"]
            assert [p["value"] for p in series["points"]] == [20.5, 21.25, -4.0]
        # The bad payloads went where they always go, not to the stream.
        letters = (await api.get("/api/v1/dead-letters", params={"device_id": "live-a"})).json()
        assert letters["total"] == 2


async def test_stats_events_follow_ingest(
    sqlite_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = live_settings(sqlite_url, tmp_path, mosquitto)
    async with (
        served(settings) as (_server, api),
        api.stream("GET", "/api/v1/live", params={"stats": "true"}) as live,
    ):
        stream = events(live)
        first = (await collect(stream, 1, event="stats"))[0]
        base = int(time.time() * 1000)
        await asyncio.to_thread(
            publish,
            mosquitto.port,
            [(f"iot/stat-{i}/telemetry", message(base, v=float(i))) for i in range(5)],
        )
        async with asyncio.timeout(15):
            while True:
                figures = (await collect(stream, 1, event="stats"))[0]
                if figures["readings_stored"] >= first["readings_stored"] + 5:
                    break
        assert figures["messages_received"] >= first["messages_received"] + 5
        assert figures["ingest_rate_per_s"] > 0
        assert set(figures["lag_by_sink"]) >= {"timeseries", "archive"}


async def test_a_viewer_may_watch_and_nobody_without_a_key(
    sqlite_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = live_settings(sqlite_url, tmp_path, mosquitto)
    async with served(settings) as (server, api):
        created = await api.post("/api/v1/keys", json={"name": "tab", "role": "viewer"})
        viewer = {"Authorization": f"Bearer {created.json()['key']}"}
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as anonymous:
            refused = await anonymous.get("/api/v1/live")
            assert refused.status_code == 401
            assert (await anonymous.get("/api/v1/whoami")).status_code == 401
            me = await anonymous.get("/api/v1/whoami", headers=viewer)
            assert me.json()["role"] == "viewer"
            async with anonymous.stream(
                "GET", "/api/v1/live", params={"stats": "true"}, headers=viewer
            ) as live:
                assert live.status_code == 200
                assert (await collect(live, 1, event="stats"))[0]["spool_depth"] is not None


async def test_bad_requests_and_the_stream_limit_say_what_to_do(
    sqlite_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = live_settings(sqlite_url, tmp_path, mosquitto, live_max_streams=2)
    async with served(settings) as (_server, api):
        too_many = [("device_id", f"d{i}") for i in range(101)]
        response = await api.get("/api/v1/live", params=too_many)
        assert response.status_code == 400
        assert "at most 100" in response.json()["error"]["message"]
        for bad in ("a/b", "", "x" * 65, "..", "dev\nice"):
            response = await api.get("/api/v1/live", params={"device_id": bad})
            assert response.status_code == 400, bad
            assert "not a device id" in response.json()["error"]["message"]
        async with (
            api.stream("GET", "/api/v1/live") as first,
            api.stream("GET", "/api/v1/live") as second,
        ):
            assert (first.status_code, second.status_code) == (200, 200)
            third = await api.get("/api/v1/live")
            assert third.status_code == 503
            assert "IOTMETER_LIVE_MAX_STREAMS" in third.json()["error"]["message"]
            assert third.headers["retry-after"] == "10"

        # Closed streams give their places back.
        async def reopened() -> int:
            async with api.stream("GET", "/api/v1/live") as again:
                return again.status_code

        await eventually(reopened, lambda status: status == 200, what="a place again")


async def test_open_streams_do_not_hold_up_a_shutdown(
    sqlite_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = live_settings(sqlite_url, tmp_path, mosquitto)
    async with served(settings) as (server, api):
        streams = [
            await api.send(api.build_request("GET", "/api/v1/live"), stream=True) for _ in range(3)
        ]
        try:
            assert all(stream.status_code == 200 for stream in streams)
            took = await server.stop(timeout_s=20)
            # Each stream ends cleanly (a complete chunked body), not by a reset.
            for stream in streams:
                await asyncio.wait_for(stream.aread(), 5)
        finally:
            for stream in streams:
                await stream.aclose()
    assert took < 10, f"shutdown took {took:.1f} s with open streams"


def _iso(epoch_ms: int) -> str:
    seconds, ms = divmod(epoch_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}000Z"
