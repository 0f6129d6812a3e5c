"""The device channel end to end on the embedded broker (zero-config, SQLite): credentials the
broker enforces, configuration pushed and reported, connection status from the last will.
(Mosquitto with its dynamic-security plugin: tests/e2e/test_device_channel_mosquitto.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import orjson

from iotmeter.config import Settings
from tests.e2e.conftest import start_app
from tests.e2e.test_embedded_defaults import embedded_settings
from tests.fixtures.services import free_port
from tests.fixtures.waiting import eventually

DEVICES = "/api/v1/devices"


def channel_settings(tmp_path: Path, port: int, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "mqtt_url": "embedded",
        "mqtt_device_auth": True,
        "mqtt_embedded_ws_port": 0,
        "device_credential_secret_file": tmp_path / "credential.secret",
    }
    values.update(overrides)
    return embedded_settings(tmp_path, port, **values)


async def register(api: httpx.AsyncClient, device_id: str) -> str:
    """Register a device and give it a credential; its password."""
    created = await api.post(DEVICES, json={"id": device_id, "name": device_id, "type": "power"})
    assert created.status_code == 201, created.text
    response = await api.post(f"{DEVICES}/{device_id}/credentials")
    assert response.status_code == 201, response.text
    password: str = response.json()["password"]
    return password


def device_client(
    port: int, device_id: str, password: str | None, **options: Any
) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=options.pop("identifier", device_id),
        username=options.pop("username", device_id),
        password=password,
        **options,
    )


async def refused(client: aiomqtt.Client) -> bool:
    """True when the broker refuses the CONNECT."""
    try:
        async with client:
            return False
    except aiomqtt.MqttError:
        return True


async def fields_of(api: httpx.AsyncClient, device_id: str) -> dict[str, Any]:
    response = await api.get(f"{DEVICES}/{device_id}/latest")
    if response.status_code != 200:
        return {}
    fields: dict[str, Any] = response.json()["fields"]
    return fields


async def test_devices_reach_only_their_own_topics_with_their_own_credentials(
    tmp_path: Path,
) -> None:
    port = free_port()
    async with start_app(channel_settings(tmp_path, port)) as api:
        password = await register(api, "meter-1")
        await register(api, "meter-2")

        async with device_client(port, "meter-1", password) as client:
            await client.publish("iot/meter-1/telemetry", orjson.dumps({"kwh": 1.5}), qos=1)
            # Into another device's topic: the broker drops it (MQTT 3.1.1 has no refusal).
            await client.publish("iot/meter-2/telemetry", orjson.dumps({"stolen": 9.0}), qos=1)
            await client.publish("iot/meter-1/telemetry", orjson.dumps({"kwh": 1.6}), qos=1)
        await eventually(
            lambda: fields_of(api, "meter-1"),
            lambda fields: fields.get("kwh", {}).get("value") == 1.6,
            what="meter-1's own readings stored",
        )
        assert await fields_of(api, "meter-2") == {}

        assert await refused(device_client(port, "meter-1", "wrong-password"))
        assert await refused(device_client(port, "meter-9", password))  # unknown device
        assert await refused(device_client(port, "meter-1", None))  # no password
        assert await refused(aiomqtt.Client("127.0.0.1", port, identifier="anonymous"))
        # Its own password, another's client id: it could take over that device's session.
        assert await refused(device_client(port, "meter-1", password, identifier="meter-2"))

        rotated = (await api.post(f"{DEVICES}/meter-1/credentials")).json()["password"]
        await asyncio.sleep(2.5)  # the embedded broker caches a password hash 2 s at most
        assert await refused(device_client(port, "meter-1", password))
        async with device_client(port, "meter-1", rotated):
            pass

        assert (await api.delete(f"{DEVICES}/meter-1")).status_code == 204
        await asyncio.sleep(2.5)
        assert await refused(device_client(port, "meter-1", rotated))


async def test_a_device_cannot_read_another_devices_configuration(tmp_path: Path) -> None:
    port = free_port()
    async with start_app(channel_settings(tmp_path, port)) as api:
        spy = await register(api, "spy")
        await register(api, "victim")
        await api.put(f"{DEVICES}/victim/configs/pin", json={"value": "1234"})
        await eventually(
            lambda: api.get(f"{DEVICES}/victim/configs"),
            lambda r: r.json()["published_version"] == 1,
            what="victim's configuration published",
        )
        async with device_client(port, "spy", spy) as client:
            await client.subscribe("iot/victim/config", qos=1)
            await client.subscribe("iot/+/config", qos=1)
            await client.subscribe("#", qos=1)
            received = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    async for message in client.messages:
                        received.append((message.topic.value, message.payload))
            assert received == []


async def test_configuration_reaches_a_device_that_connects_later_and_its_report_syncs(
    tmp_path: Path,
) -> None:
    port = free_port()
    async with start_app(channel_settings(tmp_path, port)) as api:
        password = await register(api, "late")
        await api.put(f"{DEVICES}/late/configs", json={"interval_s": 30, "mode": "eco"})
        await api.put(f"{DEVICES}/late/configs/interval_s", json={"value": 60})
        state = await eventually(
            lambda: api.get(f"{DEVICES}/late/configs"),
            lambda r: r.json()["published_version"] == 2,
            what="configuration published while the device is offline",
        )
        assert state.json()["in_sync"] is False

        async with device_client(port, "late", password) as client:
            await client.subscribe("iot/late/config", qos=1)
            async with asyncio.timeout(5):
                message = await anext(aiter(client.messages))
            assert message.retain
            pushed = orjson.loads(message.payload)  # type: ignore[arg-type]
            assert pushed == {"version": 2, "config": {"interval_s": 60, "mode": "eco"}}
            await client.publish(
                "iot/late/config/reported", orjson.dumps(pushed), qos=1, retain=True
            )
        synced = await eventually(
            lambda: api.get(f"{DEVICES}/late/configs"),
            lambda r: r.json()["in_sync"],
            what="the device's report recorded",
        )
        assert synced.json()["reported"] == {"interval_s": 60, "mode": "eco"}
        assert synced.json()["reported_version"] == 2
        listed = (await api.get(DEVICES, params={"config_in_sync": "false"})).json()
        assert listed["total"] == 0
        channel = (await api.get("/api/v1/stats")).json()["device_channel"]
        assert channel["device_auth"] is True
        assert channel["config_out_of_sync"] == 0
        assert channel["configs_published"] >= 1
        assert channel["reports"] >= 1
        assert channel["broker_accounts"] is None  # the embedded broker reads the registry


async def test_bad_reports_and_statuses_go_to_the_dead_letters(tmp_path: Path) -> None:
    port = free_port()
    async with start_app(channel_settings(tmp_path, port)) as api:
        password = await register(api, "noisy")
        hostile = [
            b"",
            b"\xff\xfe\x00garbage",
            b"[1,2,3]",
            b'{"version": "7", "config": {}}',
            b'{"version": 1, "config": [1]}',
            b'{"version": -1, "config": {}}',
            b'{"version": 1, "config": {"x": 1e999}}',
            b'{"version": 1' + b', "config": {"a": ' * 2000,
            os.urandom(512),
        ]
        async with device_client(port, "noisy", password) as client:
            for payload in hostile:
                await client.publish("iot/noisy/config/reported", payload, qos=1)
            await client.publish("iot/noisy/status", b"sleepy", qos=1)
            await client.publish("iot/noisy/status", os.urandom(64), qos=1)
            await client.publish("iot/noisy/telemetry", orjson.dumps({"v": 1.0}), qos=1)

        async def letters() -> dict[str, int]:
            response = await api.get("/api/v1/dead-letters", params={"limit": 100})
            counts: dict[str, int] = {}
            for item in response.json()["items"]:
                counts[item["reason"]] = counts.get(item["reason"], 0) + 1
            return counts

        # The empty one clears a retained report: not an error.
        found = await eventually(
            letters,
            lambda counts: counts.get("bad_reported_config") == len(hostile) - 1,
            what="bad reports in the dead letters",
        )
        assert found.get("bad_status") == 2
        await eventually(
            lambda: fields_of(api, "noisy"), lambda fields: "v" in fields, what="telemetry"
        )
        state = (await api.get(f"{DEVICES}/noisy/configs")).json()
        assert state["reported"] is None


def simulate_process(
    settings: Settings, port: int, devices: int, log: Path
) -> subprocess.Popen[bytes]:
    """`iotmeter simulate` in its own process, on the app's database and credential secret."""
    environment = {
        **os.environ,
        "IOTMETER_DATABASE_URL": settings.database_url,
        "IOTMETER_MQTT_DEVICE_AUTH": "true",
        "IOTMETER_DEVICE_CREDENTIAL_SECRET_FILE": str(settings.device_credential_secret_file),
        "IOTMETER_SIMULATOR_ID_PREFIX": "proc",
        "IOTMETER_SIMULATOR_KINDS": "power_meter",
    }
    with log.open("wb") as output:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "iotmeter",
                "simulate",
                "--broker",
                f"mqtt://127.0.0.1:{port}",
                "--devices",
                str(devices),
                "--interval",
                "0.2",
            ],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=output,
        )


async def test_status_follows_connects_and_the_last_will_after_a_sigkill(tmp_path: Path) -> None:
    port = free_port()
    settings = channel_settings(tmp_path, port)
    async with start_app(settings) as api:
        process = simulate_process(settings, port, devices=2, log=tmp_path / "simulate.log")
        try:
            online = await eventually(
                lambda: api.get(DEVICES, params={"connected": "true"}),
                lambda r: r.json()["total"] == 2,
                what="both simulated devices online",
                within=30,
            )
            device = online.json()["items"][0]
            assert device["last_connected_at"] is not None
            assert device["id"].startswith("proc-power_meter-")
            process.send_signal(signal.SIGKILL)
            process.wait()
            offline = await eventually(
                lambda: api.get(f"{DEVICES}/{device['id']}"),
                lambda r: r.json()["connected"] is False,
                what="the last will recorded",
                within=30,
            )
            assert offline.json()["last_disconnected_at"] >= device["last_connected_at"]
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


async def test_no_message_is_lost_while_devices_connect_and_leave(tmp_path: Path) -> None:
    """Devices subscribing and leaving while telemetry flows (a fleet reconnecting) must not
    cost the collector a message (amqtt 0.12.1 dropped broadcasts then: see broker.py)."""
    port = free_port()
    MESSAGES = 1000
    async with start_app(channel_settings(tmp_path, port)) as api:
        passwords = {f"churn-{n}": await register(api, f"churn-{n}") for n in range(60)}
        steady = await register(api, "steady")

        async def churn(device_id: str) -> None:
            for _ in range(8):
                async with device_client(port, device_id, passwords[device_id]) as client:
                    await client.subscribe(f"iot/{device_id}/config", qos=1)
                    await client.unsubscribe(f"iot/{device_id}/config")

        async def publish() -> None:
            async with device_client(port, "steady", steady) as client:
                for seq in range(MESSAGES):
                    await client.publish(
                        "iot/steady/telemetry", orjson.dumps({"seq": seq, "v": float(seq)}), qos=1
                    )

        await asyncio.gather(publish(), *(churn(device_id) for device_id in passwords))

        folder = tmp_path / "archive" / "steady"

        async def stored() -> int:
            return len(list(folder.glob("*.json"))) if folder.exists() else 0

        await eventually(stored, lambda count: count == MESSAGES, what="every message archived")
        stats = (await api.get("/api/v1/stats")).json()
        assert stats["messages"]["received"] == MESSAGES
