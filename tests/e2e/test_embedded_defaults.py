"""Zero-config mode: embedded broker, SQLite, local archive — and the `auto` broker choice."""

from __future__ import annotations

import socket
from pathlib import Path

import aiomqtt
import orjson
import pytest
from asgi_lifespan import LifespanManager

from iotmeter.app import create_app
from iotmeter.config import Settings
from iotmeter.errors import SettingsInvalid
from tests.e2e.conftest import start_app
from tests.fixtures.services import free_port, running_mosquitto
from tests.fixtures.waiting import eventually


def embedded_settings(tmp_path: Path, port: int, **overrides: object) -> Settings:
    """The zero-config defaults, except the files live in tmp_path and the port is free."""
    values: dict[str, object] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path}/iotmeter.db",
        "archive_dir": tmp_path / "archive",
        "spool_dir": tmp_path / "spool",
        "auth_bootstrap_file": tmp_path / "admin.key",
        "mqtt_embedded_port": port,
        # 9001 (the default) may be taken, or used by a test running alongside.
        "mqtt_embedded_ws_port": 0,
        "batch_max_delay_s": 0.05,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def device_publishes(port: int, device_id: str, reading: dict[str, float]) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"dev-{device_id}") as client:
        await client.publish(f"iot/{device_id}/telemetry", orjson.dumps(reading), qos=1)


async def test_embedded_defaults_ingest_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    settings = embedded_settings(tmp_path, port, mqtt_url="embedded")
    async with start_app(settings) as api:
        stats = (await api.get("/api/v1/stats")).json()
        assert stats["backends"]["mqtt"] == f"embedded broker at 127.0.0.1:{port}"
        assert stats["backends"]["timeseries"] == "sql (sqlite)"
        assert stats["backends"]["archive"] == "local"

        await device_publishes(port, "boiler-7", {"pressure": 1.8, "flow": 12})
        response = await eventually(
            lambda: api.get("/api/v1/devices/boiler-7/latest"),
            lambda r: r.status_code == 200 and len(r.json()["fields"]) == 2,
            what="boiler-7 readings",
        )
        assert response.json()["fields"]["pressure"]["value"] == 1.8
        raw = (await api.get("/api/v1/devices/boiler-7/raw")).json()
        assert raw["items"][0]["document"]["payload"] == {"pressure": 1.8, "flow": 12}
    # The local archive is a plain folder a user can look into.
    assert len(list((tmp_path / "archive" / "boiler-7").glob("*.json"))) == 1


async def test_simulator_devices_of_every_kind_appear(tmp_path: Path) -> None:
    port = free_port()
    settings = embedded_settings(
        tmp_path, port, simulator_enabled=True, simulator_interval_s=0.2, simulator_devices=3
    )
    async with start_app(settings) as api:
        devices = await eventually(
            lambda: api.get("/api/v1/devices"),
            lambda r: r.json()["total"] == 3,
            what="three simulated devices",
        )
        kinds = sorted(device["type"] for device in devices.json()["items"])
        assert kinds == ["humidity", "power_meter", "temperature"]
        ids = ",".join(device["id"] for device in devices.json()["items"])
        latest = await eventually(
            lambda: api.get("/api/v1/telemetry/latest", params={"device_ids": ids}),
            lambda r: len(r.json()["devices"]) == 3,
            what="latest values of the simulated devices",
        )
        fields = {name for values in latest.json()["devices"].values() for name in values}
        assert {"temperature", "humidity", "voltage", "energy_kwh"} <= fields


async def test_auto_uses_a_broker_that_already_answers(tmp_path: Path) -> None:
    with running_mosquitto() as mosquitto:
        settings = embedded_settings(tmp_path, mosquitto.port)  # mqtt_url stays "auto"
        async with start_app(settings) as api:
            stats = (await api.get("/api/v1/stats")).json()
            assert stats["backends"]["mqtt"] == f"local broker at 127.0.0.1:{mosquitto.port}"
            await device_publishes(mosquitto.port, "via-mosquitto", {"t": 1.0})
            await eventually(
                lambda: api.get("/api/v1/devices/via-mosquitto/latest"),
                lambda r: r.status_code == 200 and r.json()["fields"],
                what="reading through the existing broker",
            )


async def test_auto_starts_the_embedded_broker_when_none_answers(tmp_path: Path) -> None:
    port = free_port()
    async with start_app(embedded_settings(tmp_path, port)) as api:
        stats = (await api.get("/api/v1/stats")).json()
        assert stats["backends"]["mqtt"] == f"embedded broker at 127.0.0.1:{port}"


async def test_embedded_broker_on_a_taken_port_is_a_clear_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = create_app(embedded_settings(tmp_path, port, mqtt_url="embedded"))
        with pytest.raises(SettingsInvalid, match="IOTMETER_MQTT_EMBEDDED_PORT"):
            async with LifespanManager(app):
                pass


async def test_ready_reports_mqtt_down_when_the_broker_goes_away(tmp_path: Path) -> None:
    with running_mosquitto() as mosquitto:
        settings = embedded_settings(tmp_path, free_port(), mqtt_url=mosquitto.url)
        async with start_app(settings) as api:
            mosquitto.stop()
            response = await eventually(
                lambda: api.get("/ready"),
                lambda r: r.status_code == 503,
                what="/ready to notice the broker is gone",
            )
            assert response.json()["backends"]["mqtt"]["status"] == "down"
            mosquitto.start()
            await eventually(
                lambda: api.get("/ready"),
                lambda r: r.status_code == 200,
                within=30,
                what="/ready to recover after the broker is back",
            )
