"""The embedded (amqtt) broker with device authentication: who may connect, and to which topics.

Each test starts its own broker through `open_broker` on free loopback ports (plain, WebSocket
and TLS listeners), with an in-memory registry; certificates are made here (`trustme` for the
server, `cryptography` for a device CA and its device certificates).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.reasoncodes import ReasonCode

from iotmeter.config import Settings
from iotmeter.devicelink.acl import config_topic, status_topic, telemetry_topic
from iotmeter.devicelink.certificates import serial_hex
from iotmeter.devicelink.credentials import (
    SERVICE_USERNAME,
    new_credential,
    password_matches,
    service_password,
)
from iotmeter.errors import SettingsInvalid
from iotmeter.ingest.broker import BrokerAddress, open_broker
from tests.fixtures.services import free_port

SECRET = b"test secret for the embedded broker"
SETTLE_S = 0.3
"""How long to keep listening for a message that must not come, after one that must."""


# --- registry and certificates ---------------------------------------------------------------


@dataclass
class MemoryRegistry:
    """`CredentialCheck` over dicts: password hashes by device id, revoked serials."""

    hashes: dict[str, str] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    broken: bool = False

    def add(self, device_id: str) -> str:
        credential = new_credential(SECRET, device_id)
        self.hashes[device_id] = credential.password_hash
        return credential.password

    async def device_password_ok(self, device_id: str, password: str) -> bool:
        if self.broken:
            raise ConnectionError("registry unreachable")
        stored = self.hashes.get(device_id)
        return stored is not None and password_matches(password, stored)

    async def certificate_revoked(self, serial_hex: str) -> bool:
        if self.broken:
            raise ConnectionError("registry unreachable")
        return serial_hex in self.revoked


@dataclass(frozen=True)
class DeviceCertificate:
    cert_file: Path
    key_file: Path
    serial_hex: str


@dataclass
class Pki:
    folder: Path
    server_ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    device_ca_file: Path
    device_ca_key_file: Path
    device_ca_key: ec.EllipticCurvePrivateKey
    device_ca: x509.Certificate

    def device_certificate(
        self,
        common_name: str,
        *,
        issuer_key: ec.EllipticCurvePrivateKey | None = None,
        issuer: x509.Certificate | None = None,
    ) -> DeviceCertificate:
        """A client certificate for `common_name`, signed by the device CA unless told."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name((issuer or self.device_ca).subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .sign(issuer_key or self.device_ca_key, hashes.SHA256())
        )
        serial = serial_hex(certificate)
        cert_file = self.folder / f"device-{serial}.crt"
        key_file = self.folder / f"device-{serial}.key"
        cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return DeviceCertificate(cert_file, key_file, serial)


def self_signed_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    server_ca = trustme.CA()
    server = server_ca.issue_cert("127.0.0.1", "localhost")
    server_ca.cert_pem.write_to_path(str(folder / "server-ca.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(str(folder / "server.pem"), append=True)
    ca_key, ca = self_signed_ca("iotmeter test device CA")
    (folder / "device-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "device-ca.key").write_bytes(
        ca_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pki(
        folder=folder,
        server_ca_file=folder / "server-ca.pem",
        server_cert_file=folder / "server.pem",
        server_key_file=folder / "server.key",
        device_ca_file=folder / "device-ca.pem",
        device_ca_key_file=folder / "device-ca.key",
        device_ca_key=ca_key,
        device_ca=ca,
    )


# --- the broker under test ---------------------------------------------------------------------


@dataclass
class RunningBroker:
    address: BrokerAddress
    settings: Settings
    registry: MemoryRegistry
    pki: Pki

    @property
    def host(self) -> str:
        return self.settings.mqtt_embedded_host

    @property
    def ws_port(self) -> int:
        return self.settings.mqtt_embedded_ws_port

    @property
    def tls_port(self) -> int:
        return self.settings.mqtt_embedded_tls_port

    def service(self, identifier: str = "iotmeter-test-service", **options: Any) -> aiomqtt.Client:
        """A client of iotmeter's own account, as the address hands it to this process."""
        return aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=self.address.username,
            password=self.address.password,
            identifier=identifier,
            **options,
        )

    def client(
        self, identifier: str | None, username: str | None, password: str | None, **options: Any
    ) -> aiomqtt.Client:
        options.setdefault("port", self.address.port)
        return aiomqtt.Client(
            self.host, username=username, password=password, identifier=identifier, **options
        )

    def tls_context(self, certificate: DeviceCertificate | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.server_ca_file))
        if certificate is not None:
            context.load_cert_chain(certificate.cert_file, certificate.key_file)
        return context

    def tls_client(
        self, identifier: str, certificate: DeviceCertificate | None = None, **options: Any
    ) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.tls_port,
            identifier=identifier,
            tls_context=self.tls_context(certificate),
            **options,
        )


def broker_settings(pki: Pki, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "mqtt_url": "embedded",
        "mqtt_embedded_host": "127.0.0.1",
        "mqtt_embedded_port": free_port(),
        "mqtt_embedded_ws_port": free_port(),
        "mqtt_embedded_tls_port": free_port(),
        "mqtt_embedded_tls_cert_file": pki.server_cert_file,
        "mqtt_embedded_tls_key_file": pki.server_key_file,
        "device_ca_cert_file": pki.device_ca_file,
        "device_ca_key_file": pki.device_ca_key_file,
        "mqtt_device_auth": True,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_broker(
    pki: Pki, registry: MemoryRegistry | None = None, **overrides: Any
) -> AsyncIterator[RunningBroker]:
    settings = broker_settings(pki, **overrides)
    registry = registry or MemoryRegistry()
    async with open_broker(settings, check=registry, service_secret=SECRET) as address:
        yield RunningBroker(address, settings, registry, pki)


@pytest.fixture
async def broker(pki: Pki) -> AsyncIterator[RunningBroker]:
    async with running_broker(pki) as running:
        yield running


# --- helpers ---------------------------------------------------------------------------------


async def refused(client: aiomqtt.Client) -> aiomqtt.MqttError:
    """Connect `client`, expecting the broker to refuse it at CONNECT."""
    with pytest.raises(aiomqtt.MqttError) as info:
        async with client:
            pass
    return info.value


def not_authorized(error: aiomqtt.MqttError) -> bool:
    return isinstance(error, aiomqtt.MqttCodeError) and "authori" in str(error.rc).lower()


async def next_message(client: aiomqtt.Client, seconds: float = 5.0) -> aiomqtt.Message:
    async with asyncio.timeout(seconds):
        return await anext(aiter(client.messages))


async def messages_until(
    client: aiomqtt.Client, last_topic: str, seconds: float = 5.0
) -> list[aiomqtt.Message]:
    """Every message up to one on `last_topic`, and what comes within `SETTLE_S` after it."""
    received: list[aiomqtt.Message] = []
    async with asyncio.timeout(seconds):
        async for message in client.messages:
            received.append(message)
            if message.topic.value == last_topic:
                break
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SETTLE_S):
            async for message in client.messages:
                received.append(message)
    return received


def topics(messages: list[aiomqtt.Message]) -> list[str]:
    return [message.topic.value for message in messages]


def suback_codes(granted: Sequence[int | ReasonCode]) -> list[int]:
    return [code if isinstance(code, int) else code.value for code in granted]


# --- connect ---------------------------------------------------------------------------------


async def test_the_address_carries_the_service_account(broker: RunningBroker) -> None:
    assert broker.address.username == SERVICE_USERNAME
    assert broker.address.password == service_password(SECRET)
    assert broker.address.origin == "embedded"


async def test_device_with_its_password_publishes_its_telemetry(broker: RunningBroker) -> None:
    password = broker.registry.add("dev-a")
    async with broker.service() as service:
        await service.subscribe("iot/+/telemetry", qos=1)
        async with broker.client("dev-a", "dev-a", password) as device:
            await device.publish(telemetry_topic("dev-a"), b'{"t": 1}', qos=1)
        message = await next_message(service)
    assert message.topic.value == telemetry_topic("dev-a")
    assert message.payload == b'{"t": 1}'


async def test_wrong_password_unknown_device_and_anonymous_are_refused(
    broker: RunningBroker,
) -> None:
    password = broker.registry.add("dev-a")
    other_password = broker.registry.add("dev-b")
    cases = [
        broker.client("dev-a", "dev-a", password[:-1] + "x"),  # wrong password
        broker.client("dev-a", "dev-a", other_password),  # another device's password
        broker.client("dev-a", "dev-a", None),  # no password
        broker.client("ghost", "ghost", password),  # unknown device
        broker.client("dev-a", None, None),  # anonymous
        broker.client(None, None, None),  # anonymous, no client id
        broker.client("svc", SERVICE_USERNAME, password),  # service account, wrong password
        broker.client("dev-a", SERVICE_USERNAME, None),
    ]
    for client in cases:
        assert not_authorized(await refused(client))
    # The broker still serves.
    async with broker.client("dev-a", "dev-a", password):
        pass


async def test_client_id_must_equal_the_username(broker: RunningBroker) -> None:
    password = broker.registry.add("dev-a")
    assert not_authorized(await refused(broker.client("dev-a-2", "dev-a", password)))
    assert not_authorized(await refused(broker.client(None, "dev-a", password)))
    assert not_authorized(await refused(broker.client("dev-b", "dev-a", password)))


async def test_a_registry_failure_refuses_the_client_and_the_broker_keeps_serving(
    broker: RunningBroker,
) -> None:
    password = broker.registry.add("dev-a")
    broker.registry.broken = True
    assert not_authorized(await refused(broker.client("dev-a", "dev-a", password)))
    broker.registry.broken = False
    async with broker.client("dev-a", "dev-a", password):
        pass


async def test_will_message_outside_the_own_topics_is_refused(broker: RunningBroker) -> None:
    password = broker.registry.add("dev-a")
    hostile_will = aiomqtt.Will(telemetry_topic("dev-b"), b"forged", qos=1)
    assert not_authorized(
        await refused(broker.client("dev-a", "dev-a", password, will=hostile_will))
    )
    own_will = aiomqtt.Will(status_topic("dev-a"), b"offline", qos=1)
    async with broker.client("dev-a", "dev-a", password, will=own_will):
        pass


# --- topics ----------------------------------------------------------------------------------


async def test_device_cannot_publish_into_another_devices_topics(broker: RunningBroker) -> None:
    password = broker.registry.add("dev-a")
    broker.registry.add("dev-b")
    async with broker.service() as service:
        await service.subscribe("iot/#", qos=1)
        async with broker.client("dev-a", "dev-a", password) as device:
            for topic in (telemetry_topic("dev-b"), config_topic("dev-a"), "iot/other", "x/y"):
                await device.publish(topic, b"forged", qos=1)
            # amqtt drops a refused PUBLISH (and still acknowledges it): the client stays
            # connected and may go on with its own topics.
            await device.publish(telemetry_topic("dev-a"), b"mine", qos=1)
        received = await messages_until(service, telemetry_topic("dev-a"))
    assert topics(received) == [telemetry_topic("dev-a")]


async def test_device_cannot_subscribe_to_another_devices_config(broker: RunningBroker) -> None:
    password = broker.registry.add("dev-a")
    broker.registry.add("dev-b")
    async with broker.service() as service, broker.client("dev-a", "dev-a", password) as device:
        for topic_filter in (config_topic("dev-b"), "iot/+/config", "iot/#", "#"):
            granted = await device.subscribe(topic_filter, qos=1)
            assert suback_codes(granted) == [0x80], topic_filter
        granted = await device.subscribe(config_topic("dev-a"), qos=1)
        assert suback_codes(granted) == [1]
        await service.publish(config_topic("dev-b"), b"b's config", qos=1)
        await service.publish(config_topic("dev-a"), b"a's config", qos=1)
        received = await messages_until(device, config_topic("dev-a"))
    assert [(m.topic.value, m.payload) for m in received] == [
        (config_topic("dev-a"), b"a's config")
    ]


async def test_device_never_receives_another_devices_retained_config(
    broker: RunningBroker,
) -> None:
    password_a = broker.registry.add("dev-a")
    password_b = broker.registry.add("dev-b")
    async with (
        broker.service() as service,
        broker.client("dev-b", "dev-b", password_b) as device_b,
    ):
        await device_b.subscribe(config_topic("dev-b"), qos=1)
        await service.publish(config_topic("dev-b"), b"b's config", qos=1, retain=True)
        await next_message(device_b)
        async with broker.client("dev-a", "dev-a", password_a) as device_a:
            await device_a.subscribe(config_topic("dev-a"), qos=1)
            await service.publish(config_topic("dev-a"), b"a's config", qos=1)
            received = await messages_until(device_a, config_topic("dev-a"))
    assert topics(received) == [config_topic("dev-a")]


@pytest.mark.xfail(
    reason="amqtt 0.12.1 drops the subscriptions of a connected client id (clean session) or "
    "takes its connection over before it asks the auth plugins "
    "(Broker._initialize_client_session, _handle_client_session)",
)
async def test_a_refused_connect_leaves_the_connected_device_alone(broker: RunningBroker) -> None:
    password = broker.registry.add("dev-a")
    async with broker.service() as service, broker.client("dev-a", "dev-a", password) as device:
        await device.subscribe(config_topic("dev-a"), qos=1)
        assert not_authorized(await refused(broker.client("dev-a", "dev-a", "wrong")))
        await service.publish(config_topic("dev-a"), b"a's config", qos=1)
        assert (await next_message(device, seconds=2)).payload == b"a's config"


# --- listeners -------------------------------------------------------------------------------


async def test_websocket_listener(broker: RunningBroker) -> None:
    password = broker.registry.add("dev-a")
    async with broker.service() as service:
        await service.subscribe(telemetry_topic("dev-a"), qos=1)
        async with broker.client(
            "dev-a", "dev-a", password, port=broker.ws_port, transport="websockets"
        ) as device:
            await device.publish(telemetry_topic("dev-a"), b"over websocket", qos=1)
        assert (await next_message(service)).payload == b"over websocket"
        assert not_authorized(
            await refused(
                broker.client(
                    "dev-a", "dev-a", "wrong", port=broker.ws_port, transport="websockets"
                )
            )
        )


async def test_tls_listener_with_the_server_ca(broker: RunningBroker) -> None:
    password = broker.registry.add("dev-a")
    async with broker.service() as service:
        await service.subscribe(telemetry_topic("dev-a"), qos=1)
        async with broker.tls_client("dev-a", username="dev-a", password=password) as device:
            await device.publish(telemetry_topic("dev-a"), b"over tls", qos=1)
        assert (await next_message(service)).payload == b"over tls"
    # A client that trusts only the system's CAs does not accept the broker's certificate.
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            "127.0.0.1", broker.tls_port, ssl=ssl.create_default_context()
        )


async def test_device_certificate_login_and_revocation(broker: RunningBroker) -> None:
    certificate = broker.pki.device_certificate("dev-c")
    async with broker.service() as service:
        await service.subscribe("iot/#", qos=1)
        async with broker.tls_client("dev-c", certificate) as device:
            await device.publish(telemetry_topic("dev-c"), b"by certificate", qos=1)
        message = await next_message(service)
        assert (message.topic.value, message.payload) == (
            telemetry_topic("dev-c"),
            b"by certificate",
        )
    # Client id and username, when given, must be the certificate's common name.
    assert not_authorized(await refused(broker.tls_client("dev-d", certificate)))
    assert not_authorized(await refused(broker.tls_client("dev-c", certificate, username="dev-d")))
    # The same certificate on the plain listener proves nothing.
    assert not_authorized(await refused(broker.client("dev-c", "dev-c", None)))

    broker.registry.revoked.add(certificate.serial_hex)
    assert not_authorized(await refused(broker.tls_client("dev-c", certificate)))


async def test_certificate_of_another_device_cannot_publish_as_the_first(
    broker: RunningBroker,
) -> None:
    first = broker.pki.device_certificate("dev-a")
    other = broker.pki.device_certificate("dev-b")
    async with broker.service() as service:
        await service.subscribe("iot/#", qos=1)
        assert not_authorized(await refused(broker.tls_client("dev-a", other)))
        async with broker.tls_client("dev-b", other) as device:
            await device.publish(telemetry_topic("dev-a"), b"forged", qos=1)
            await device.publish(telemetry_topic("dev-b"), b"mine", qos=1)
        received = await messages_until(service, telemetry_topic("dev-b"))
        assert topics(received) == [telemetry_topic("dev-b")]
        async with broker.tls_client("dev-a", first):
            pass


async def test_certificate_from_another_ca_is_refused(broker: RunningBroker) -> None:
    rogue_key, rogue_ca = self_signed_ca("iotmeter test device CA")  # same name, other key
    forged = broker.pki.device_certificate("dev-a", issuer_key=rogue_key, issuer=rogue_ca)
    with pytest.raises(aiomqtt.MqttError):
        async with broker.tls_client("dev-a", forged):
            pass
    async with broker.tls_client("dev-a", broker.pki.device_certificate("dev-a")):
        pass


async def test_a_ca_bundle_accepts_certificates_of_each_ca(pki: Pki) -> None:
    next_key, next_ca = self_signed_ca("iotmeter test device CA (next)")
    bundle = pki.folder / "device-ca-bundle.pem"
    bundle.write_bytes(
        next_ca.public_bytes(serialization.Encoding.PEM) + pki.device_ca_file.read_bytes()
    )
    async with running_broker(pki, device_ca_cert_file=bundle) as broker:
        for certificate in (
            pki.device_certificate("dev-a"),
            pki.device_certificate("dev-a", issuer_key=next_key, issuer=next_ca),
        ):
            async with broker.tls_client("dev-a", certificate):
                pass


# --- device authentication off ---------------------------------------------------------------


async def test_anonymous_clients_are_allowed_when_device_auth_is_off(pki: Pki) -> None:
    async with running_broker(pki, mqtt_device_auth=False) as broker:
        assert broker.address.username is None
        assert broker.address.password is None
        async with broker.client(None, None, None) as listener:
            await listener.subscribe("iot/#", qos=1)
            # No client id or topic rules either: today's zero-config behaviour.
            async with broker.client("anything", "dev-a", "whatever") as device:
                await device.publish(telemetry_topic("dev-b"), b"x", qos=1)
            assert (await next_message(listener)).topic.value == telemetry_topic("dev-b")
        async with broker.client(None, None, None, port=broker.ws_port, transport="websockets"):
            pass


# --- start-up --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "variable"),
    [
        ("mqtt_embedded_port", "IOTMETER_MQTT_EMBEDDED_PORT"),
        ("mqtt_embedded_ws_port", "IOTMETER_MQTT_EMBEDDED_WS_PORT"),
        ("mqtt_embedded_tls_port", "IOTMETER_MQTT_EMBEDDED_TLS_PORT"),
    ],
)
async def test_a_taken_port_names_its_setting(pki: Pki, setting: str, variable: str) -> None:
    settings = broker_settings(pki)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", getattr(settings, setting)))
        taken.listen()
        with pytest.raises(SettingsInvalid, match=variable):
            async with open_broker(settings, check=MemoryRegistry(), service_secret=SECRET):
                pass
    # Nothing stays bound after the failed start: the same settings start a broker now.
    async with open_broker(settings, check=MemoryRegistry(), service_secret=SECRET):
        pass


async def test_listeners_need_a_port_each(pki: Pki) -> None:
    port = free_port()
    settings = broker_settings(pki, mqtt_embedded_ws_port=port, mqtt_embedded_tls_port=port)
    with pytest.raises(
        SettingsInvalid, match="IOTMETER_MQTT_EMBEDDED_WS_PORT and IOTMETER_MQTT_EMBEDDED_TLS_PORT"
    ):
        async with open_broker(settings, check=MemoryRegistry(), service_secret=SECRET):
            pass


async def test_unreadable_tls_files_name_their_setting(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(SettingsInvalid, match="IOTMETER_MQTT_EMBEDDED_TLS_CERT_FILE"):
        async with open_broker(
            broker_settings(pki, mqtt_embedded_tls_cert_file=tmp_path / "junk.pem"),
            check=MemoryRegistry(),
            service_secret=SECRET,
        ):
            pass
    with pytest.raises(SettingsInvalid, match="IOTMETER_DEVICE_CA_CERT_FILE"):
        async with open_broker(
            broker_settings(pki, device_ca_cert_file=tmp_path / "junk.pem"),
            check=MemoryRegistry(),
            service_secret=SECRET,
        ):
            pass


async def test_device_auth_needs_the_registry(pki: Pki) -> None:
    with pytest.raises(ValueError, match="check"):
        async with open_broker(broker_settings(pki)):
            pass


@pytest.mark.parametrize(
    ("device_auth", "expected"),
    [(None, "device authentication is on"), (False, "device authentication off")],
)
async def test_non_loopback_bind_warns(
    pki: Pki, caplog: pytest.LogCaptureFixture, device_auth: bool | None, expected: str
) -> None:
    # 127.0.0.2 is loopback to Linux but not to the settings' address check.
    with caplog.at_level(logging.WARNING, logger="iotmeter.ingest.broker"):
        async with running_broker(
            pki, mqtt_embedded_host="127.0.0.2", mqtt_device_auth=device_auth
        ) as broker:
            assert (broker.address.username is not None) == (device_auth is None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(expected in text and "IOTMETER_MQTT_DEVICE_AUTH" in text for text in warnings)


async def test_loopback_bind_does_not_warn(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="iotmeter.ingest.broker"):
        async with running_broker(pki, mqtt_device_auth=None) as broker:
            assert broker.address.username is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- hostile clients -------------------------------------------------------------------------


def _field(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        digit, length = length % 128, length // 128
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def connect_packet(client_id: bytes, username: bytes | None, password: bytes | None) -> bytes:
    """A raw MQTT 3.1.1 CONNECT with whatever bytes a client likes in its strings."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _field(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + _field(client_id)
    if username is not None:
        body += _field(username)
    if password is not None:
        body += _field(password)
    return bytes([0x10]) + _remaining_length(len(body)) + body


async def connack_code(host: str, port: int, packet: bytes) -> int | None:
    """The CONNACK return code for `packet` (None: the broker closed without one)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(packet)
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read(4)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if len(answer) < 4:
        return None
    assert answer[0] == 0x20, answer
    return answer[3]


def hostile_strings(
    device_id: str, password: str
) -> Iterator[tuple[bytes, bytes | None, bytes | None]]:
    rng = random.Random(20261129)
    valid_id, valid_password = device_id.encode(), password.encode()
    specials = [
        b"",
        b"\x00",
        b"\xff\xfe\xfd",
        b"\xed\xa0\x80",  # a UTF-8-encoded surrogate
        b"dev-a\x00",
        b"../dev-a",
        b"iot/+/#",
        b"'; DROP TABLE devices; --",
        b"iotmeter",
        "dév-a".encode(),
        b"b'" + valid_id + b"'",
        b"A" * 65535,
        valid_password + b"\x00",
    ]
    for special in specials:
        yield special, special, special
        yield valid_id, valid_id, special
        yield valid_id, special, valid_password
        yield special, valid_id, valid_password
        yield special, b"iotmeter", special
    for _ in range(40):
        blobs = [rng.randbytes(rng.randrange(0, 80)) for _ in range(3)]
        yield blobs[0], blobs[1], blobs[2]
        yield valid_id, valid_id, blobs[2]
    yield valid_id, None, valid_password
    yield valid_id, valid_id, None


async def test_hostile_connect_strings_are_refused_and_the_broker_keeps_serving(
    broker: RunningBroker,
) -> None:
    password = broker.registry.add("dev-a")
    for client_id, username, secret in hostile_strings("dev-a", password):
        packet = connect_packet(client_id, username, secret)
        code = await connack_code(broker.host, broker.address.port, packet)
        assert code != 0, (client_id[:40], (username or b"")[:40], (secret or b"")[:40])
    # A well-formed CONNECT from the same bytes is accepted, and the broker still relays.
    welcome = connect_packet(b"dev-a", b"dev-a", password.encode())
    assert await connack_code(broker.host, broker.address.port, welcome) == 0
    async with broker.service() as service:
        await service.subscribe(telemetry_topic("dev-a"), qos=1)
        async with broker.client("dev-a", "dev-a", password) as device:
            await device.publish(telemetry_topic("dev-a"), b"still here", qos=1)
        assert (await next_message(service)).payload == b"still here"
