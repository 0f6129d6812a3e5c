"""The device channel in production shape: Mosquitto 2.0.11 with its dynamic-security plugin,
whose accounts iotmeter keeps equal to the registry; PostgreSQL. Credentials made through the
API are enforced by the broker, configuration goes round the simulator, and a broker that lost
its accounts is rebuilt."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import orjson
import pytest
import trustme

from iotmeter.config import Settings
from tests.conftest import make_settings
from tests.e2e.conftest import start_app
from tests.fixtures.services import (
    Mosquitto,
    free_port,
    running_mosquitto,
    writable_by_mosquitto,
)
from tests.fixtures.waiting import eventually

DEVICES = "/api/v1/devices"


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with running_mosquitto(dynsec_admin=("iotmeter-admin", "admin-password-for-tests")) as b:
        yield b


def settings_for(pg_url: str, tmp_path: Path, broker: Mosquitto, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "mqtt_url": broker.admin_url,
        "mqtt_client_id": f"iotmeter-channel-{tmp_path.name}"[:64],
        "mqtt_device_auth": True,
        "collector_enabled": True,
        "batch_max_delay_s": 0.05,
        "device_credential_secret": "a secret shared by the test's app processes",
    }
    values.update(extra)
    return make_settings(pg_url, tmp_path, **values)


async def on_broker(api: httpx.AsyncClient, device_id: str) -> None:
    await eventually(
        lambda: api.get(f"{DEVICES}/{device_id}/credentials"),
        lambda r: r.status_code == 200 and r.json()["on_broker"] is True,
        what=f"{device_id}'s credential on the broker",
    )


async def connects(port: int, device_id: str, password: str) -> bool:
    try:
        async with aiomqtt.Client(
            "127.0.0.1", port, identifier=device_id, username=device_id, password=password
        ):
            return True
    except aiomqtt.MqttError:
        return False


async def test_credentials_made_through_the_api_are_what_mosquitto_accepts(
    empty_pg_url: str, tmp_path: Path, broker: Mosquitto
) -> None:
    settings = settings_for(empty_pg_url, tmp_path, broker)
    async with start_app(settings) as api:
        await api.post(DEVICES, json={"id": "pump-1", "name": "Pump", "type": "power"})
        password = (await api.post(f"{DEVICES}/pump-1/credentials")).json()["password"]
        await on_broker(api, "pump-1")

        async with aiomqtt.Client(
            "127.0.0.1", broker.port, identifier="pump-1", username="pump-1", password=password
        ) as device:
            await device.publish("iot/pump-1/telemetry", orjson.dumps({"kw": 3.5}), qos=1)
            await device.publish("iot/pump-2/telemetry", orjson.dumps({"kw": 99.0}), qos=1)
        await eventually(
            lambda: api.get(f"{DEVICES}/pump-1/latest"),
            lambda r: r.status_code == 200 and r.json()["fields"].get("kw", {}).get("value") == 3.5,
            what="pump-1's reading stored",
        )
        assert (await api.get(f"{DEVICES}/pump-2")).status_code == 404  # never arrived
        assert not await connects(broker.port, "pump-1", password + "x")
        accounts = (await api.get("/api/v1/stats")).json()["device_channel"]["broker_accounts"]
        assert accounts["devices_on_broker"] == 1
        assert accounts["connected"] is True

        rotated = (await api.post(f"{DEVICES}/pump-1/credentials")).json()["password"]
        await on_broker(api, "pump-1")
        assert not await connects(broker.port, "pump-1", password)
        assert await connects(broker.port, "pump-1", rotated)

        assert (await api.delete(f"{DEVICES}/pump-1")).status_code == 204
        await eventually(
            lambda: connects(broker.port, "pump-1", rotated),
            lambda connected: not connected,
            what="the deleted device's account removed from the broker",
        )


async def test_a_broker_that_lost_its_accounts_is_rebuilt_from_the_registry(
    empty_pg_url: str, tmp_path: Path, broker: Mosquitto
) -> None:
    settings = settings_for(empty_pg_url, tmp_path, broker)
    passwords: dict[str, str] = {}
    async with start_app(settings) as api:
        for number in range(3):
            device_id = f"valve-{number}"
            await api.post(DEVICES, json={"id": device_id, "name": "V", "type": "power"})
            response = await api.post(f"{DEVICES}/{device_id}/credentials")
            passwords[device_id] = response.json()["password"]
        for device_id in passwords:
            await on_broker(api, device_id)
        broker.stop()
        broker.init_dynsec()  # the dynamic-security file lost: only the admin account left
        broker.start()
        # iotmeter reconnects and reconciles: every device can connect again.
        for device_id, password in passwords.items():
            await eventually(
                lambda d=device_id, p=password: connects(broker.port, d, p),  # type: ignore[misc]
                lambda connected: connected,
                what=f"{device_id} accepted by the rebuilt broker",
                within=30,
            )


async def test_configuration_goes_round_the_simulator_also_when_it_was_offline(
    empty_pg_url: str, tmp_path: Path, broker: Mosquitto
) -> None:
    simulated = {
        "simulator_enabled": True,
        "simulator_devices": 2,
        "simulator_kinds": ["humidity"],
        "simulator_interval_s": 0.5,
        "simulator_id_prefix": "room",
    }
    settings = settings_for(empty_pg_url, tmp_path, broker, **simulated)
    device = "room-humidity-0001"
    async with start_app(settings) as api:
        await eventually(
            lambda: api.get(DEVICES, params={"connected": "true"}),
            lambda r: r.json()["total"] == 2,
            what="both simulated devices online (their own accounts)",
            within=30,
        )
        await api.put(f"{DEVICES}/{device}/configs/interval_s", json={"value": 0.2})
        state = await eventually(
            lambda: api.get(f"{DEVICES}/{device}/configs"),
            lambda r: r.json()["in_sync"] and r.json()["desired_version"] == 1,
            what="the simulator applied and reported version 1",
        )
        assert state.json()["reported"] == {"interval_s": 0.2}

    # The simulator is off (a device offline) while its configuration changes.
    quiet = settings.model_copy(update={"simulator_enabled": False})
    async with start_app(quiet) as api:
        await eventually(
            lambda: api.get(f"{DEVICES}/{device}"),
            lambda r: r.json()["connected"] is False,
            what="the stopped simulator's devices offline",
        )
        await api.put(f"{DEVICES}/{device}/configs", json={"interval_s": 0.3, "enabled": True})
        await eventually(
            lambda: api.get(f"{DEVICES}/{device}/configs"),
            lambda r: r.json()["published_version"] == 2 and not r.json()["in_sync"],
            what="version 2 published while the device is offline",
        )

    async with start_app(settings) as api:
        state = await eventually(
            lambda: api.get(f"{DEVICES}/{device}/configs"),
            lambda r: r.json()["in_sync"] and r.json()["reported_version"] == 2,
            what="the device got version 2 from the broker on connecting, and reported it",
            within=30,
        )
        assert state.json()["reported"] == {"interval_s": 0.3, "enabled": True}


async def test_collector_and_simulator_over_tls_verify_the_broker_with_the_ca_file(
    empty_pg_url: str, tmp_path: Path
) -> None:
    # Not in tmp_path: Mosquitto runs as its own user and cannot enter pytest's folders.
    certs = Path(tempfile.mkdtemp(prefix="iotmeter-tls-"))
    authority = trustme.CA()
    server = authority.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = certs / "ca.pem", certs / "b.pem", certs / "b.key"
    authority.cert_pem.write_to_path(str(ca_file))
    server.cert_chain_pems[0].write_to_path(str(cert_file))
    server.private_key_pem.write_to_path(str(key_file))
    tls_port = free_port()
    tls_listener = (
        f"listener {tls_port} 127.0.0.1",
        f"cafile {ca_file}",
        f"certfile {cert_file}",
        f"keyfile {key_file}",
    )
    for path in (certs, ca_file, cert_file, key_file):
        writable_by_mosquitto(path)
    with running_mosquitto(extra_config=tls_listener) as broker:
        url = f"mqtts://127.0.0.1:{tls_port}"
        settings = make_settings(
            empty_pg_url,
            tmp_path,
            mqtt_url=url,
            mqtt_ca_file=ca_file,
            mqtt_client_id=f"iotmeter-tls-{tmp_path.name}"[:64],
            collector_enabled=True,
            simulator_enabled=True,
            simulator_devices=1,
            simulator_kinds=["temperature"],
            simulator_interval_s=0.2,
            simulator_id_prefix="tls",
            batch_max_delay_s=0.05,
        )
        async with start_app(settings) as api:
            latest = await eventually(
                lambda: api.get(f"{DEVICES}/tls-temperature-0001/latest"),
                lambda r: r.status_code == 200 and bool(r.json()["fields"]),
                what="a reading that went over TLS both ways",
            )
            assert latest.json()["fields"]
            # And the configuration channel works over it too.
            await api.put(f"{DEVICES}/tls-temperature-0001/configs/interval_s", json={"value": 1})
            await eventually(
                lambda: api.get(f"{DEVICES}/tls-temperature-0001/configs"),
                lambda r: r.json()["in_sync"] and r.json()["reported_version"] == 1,
                what="configuration applied over TLS",
            )
        assert broker.port != tls_port
    shutil.rmtree(certs)


def test_a_broker_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    from iotmeter.ingest.broker import BrokerAddress

    other = trustme.CA()
    ca_file = tmp_path / "other-ca.pem"
    other.cert_pem.write_to_path(str(ca_file))
    address = BrokerAddress.from_url("mqtts://127.0.0.1:8883")
    assert address.tls_context() is not None
    context = BrokerAddress("127.0.0.1", 1, tls=True, ca_file=str(ca_file)).tls_context()
    assert context is not None
    assert context.verify_mode.name == "CERT_REQUIRED"
    assert len(context.get_ca_certs()) == 1


async def test_a_device_registered_again_starts_from_nothing(
    empty_pg_url: str, tmp_path: Path, broker: Mosquitto
) -> None:
    """Deleting a device clears what the broker retains for it (configuration, status,
    report): after a restart (the channel subscribes again and the broker replays what it
    retains) a new device with the same id has none of its predecessor's state."""
    settings = settings_for(empty_pg_url, tmp_path, broker)
    async with start_app(settings) as api:
        await api.post(DEVICES, json={"id": "reused", "name": "R", "type": "power"})
        password = (await api.post(f"{DEVICES}/reused/credentials")).json()["password"]
        await on_broker(api, "reused")
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, identifier="reused", username="reused", password=password
        ) as device:
            await device.publish("iot/reused/status", b"online", qos=1, retain=True)
            report = orjson.dumps({"version": 1, "config": {"a": 1}})
            await device.publish("iot/reused/config/reported", report, qos=1, retain=True)
        await eventually(
            lambda: api.get(f"{DEVICES}/reused"),
            lambda r: r.json()["connected"] is True and r.json()["reported_config_version"] == 1,
            what="the first device's status and report recorded",
        )
        assert (await api.delete(f"{DEVICES}/reused")).status_code == 204
        await asyncio.sleep(1.0)  # the channel clears the retained topics
        await api.post(DEVICES, json={"id": "reused", "name": "R", "type": "power"})
    async with start_app(settings) as api:
        await asyncio.sleep(1.5)  # subscribed again; anything retained would be back
        device = (await api.get(f"{DEVICES}/reused")).json()
        assert device["connected"] is None
        assert device["reported_config_version"] is None
