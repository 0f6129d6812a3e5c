"""deploy/mosquitto/mosquitto.production.conf runs on the real Mosquitto 2.0.11: its plugin, TLS
listener and persistence lines are accepted, anonymous clients are refused, and iotmeter's
dynamic-security admin can work through it. Only ports and paths are changed for the test (and
the WebSocket listener left out: 2.0.11 binds it on every interface, see SERVICES.md)."""

from __future__ import annotations

import re
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
import trustme

from tests.fixtures.services import free_port, stop_process, wait_for_port, writable_by_mosquitto

CONF = Path(__file__).parents[2] / "deploy" / "mosquitto" / "mosquitto.production.conf"
PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def adapted(text: str, folder: Path, ports: dict[int, int]) -> str:
    """The production file with this test's ports and paths."""
    lines = []
    skip_listener = False
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["listener"]:
            port = int(words[1])
            skip_listener = port == 9001
            if skip_listener:
                continue
            line = f"listener {ports[port]} 127.0.0.1"
        elif skip_listener and words[:1] == ["protocol"]:
            continue
        elif words[:1] in (["cafile"], ["certfile"], ["keyfile"]):
            line = f"{words[0]} {folder / Path(words[1]).name}"
        elif words[:1] == ["plugin_opt_config_file"]:
            line = f"plugin_opt_config_file {folder / 'dynamic-security.json'}"
        elif words[:1] == ["persistence_location"]:
            line = f"persistence_location {folder}/"
        elif words[:1] == ["log_dest"]:
            line = f"log_dest file {folder / 'mosquitto.log'}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture
def production_broker() -> Iterator[tuple[int, int, Path]]:
    """(plain port, TLS port, CA file) of Mosquitto running the production file."""
    with tempfile.TemporaryDirectory(prefix="iotmeter-mosquitto-prod-") as name:
        folder = Path(name)
        writable_by_mosquitto(folder)
        authority = trustme.CA()
        server = authority.issue_cert("127.0.0.1", "localhost")
        authority.cert_pem.write_to_path(str(folder / "ca.pem"))
        server.private_key_pem.write_to_path(str(folder / "broker.key"))
        server.cert_chain_pems[0].write_to_path(str(folder / "broker.pem"))
        for file in folder.iterdir():
            writable_by_mosquitto(file)
        subprocess.run(
            ["mosquitto_ctrl", "dynsec", "init", str(folder / "dynamic-security.json"), "iotmeter"],
            input=b"admin-secret\nadmin-secret\n",
            check=True,
            capture_output=True,
        )
        writable_by_mosquitto(folder / "dynamic-security.json")
        ports = {1883: free_port(), 8883: free_port()}
        text = CONF.read_text()
        assert f"plugin {PLUGIN}" in text
        config = folder / "mosquitto.conf"
        config.write_text(adapted(text, folder, ports))
        process = subprocess.Popen(
            ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_for_port(ports[8883], 10, process)
            yield ports[1883], ports[8883], folder / "ca.pem"
        finally:
            stop_process(process)
            if process.stderr is not None:
                process.stderr.close()


def test_the_file_names_the_plugin_and_refuses_anonymous_clients() -> None:
    text = CONF.read_text()
    options = [line.split(None, 1) for line in text.splitlines() if re.match(r"^[a-z]", line)]
    assert ["allow_anonymous", "false"] in options
    assert ["plugin", PLUGIN] in options
    listeners = [int(value.split()[0]) for key, value in options if key == "listener"]
    assert listeners == [1883, 8883, 9001]


async def test_production_file_runs_and_only_accounts_get_in(
    production_broker: tuple[int, int, Path],
) -> None:
    plain, tls, ca_file = production_broker
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", plain, identifier="anonymous"):
            pass
    context = ssl.create_default_context(cafile=str(ca_file))
    async with aiomqtt.Client(
        "127.0.0.1",
        tls,
        identifier="iotmeter-admin-check",
        username="iotmeter",
        password="admin-secret",
        tls_context=context,
    ) as admin:
        await admin.subscribe("$CONTROL/dynamic-security/v1/response", qos=1)
        await admin.publish(
            "$CONTROL/dynamic-security/v1",
            b'{"commands": [{"command": "listClients"}]}',
            qos=1,
        )
        async for message in admin.messages:
            assert b"iotmeter" in bytes(message.payload)  # type: ignore[arg-type]
            break
