"""A device logging in with its certificate on Mosquitto 2.0.11 with the dynamic-security plugin
(`require_certificate` + `use_identity_as_username`): the broker account iotmeter keeps for the
device (client and role) is what lets it publish its telemetry, and only its own."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiomqtt
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iotmeter.devicelink.certificates import DeviceCA
from iotmeter.devicelink.credentials import derive_password
from iotmeter.devicelink.dynsec import BrokerAccounts
from iotmeter.ingest.broker import BrokerAddress
from tests.fixtures.services import Mosquitto, free_port, running_mosquitto, writable_by_mosquitto
from tests.integration.test_dynsec import ADMIN_PASSWORD, SECRET, MemorySource

ADMIN = "iotmeter"


@dataclass
class TlsSetup:
    broker: Mosquitto
    tls_port: int
    folder: Path
    server_ca: trustme.CA
    device_ca: DeviceCA

    def device_context(self, device_id: str) -> ssl.SSLContext:
        """A client TLS context holding a certificate for `device_id` signed by the device CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
        )
        issued = self.device_ca.sign_request(
            request.public_bytes(serialization.Encoding.PEM), device_id, 1
        )
        cert_file = self.folder / f"{device_id}.pem"
        key_file = self.folder / f"{device_id}.key"
        cert_file.write_text(issued.pem)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.create_default_context()
        self.server_ca.configure_trust(context)
        context.load_cert_chain(cert_file, key_file)
        return context


@pytest.fixture
def setup() -> Iterator[TlsSetup]:
    # Not in pytest's tmp_path: Mosquitto runs as its own user and cannot enter it.
    folder = Path(tempfile.mkdtemp(prefix="iotmeter-dynsec-tls-"))
    try:
        writable_by_mosquitto(folder)
        server_ca = trustme.CA()
        server = server_ca.issue_cert("127.0.0.1")
        server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
        server.private_key_pem.write_to_path(str(folder / "server.key"))
        device_authority = trustme.CA(organization_name="iotmeter device CA")
        device_authority.cert_pem.write_to_path(str(folder / "device-ca.pem"))
        device_authority.private_key_pem.write_to_path(str(folder / "device-ca.key"))
        for file in folder.iterdir():
            writable_by_mosquitto(file)
        device_ca = DeviceCA.load(folder / "device-ca.pem", folder / "device-ca.key")
        tls_port = free_port()
        listener = (
            f"listener {tls_port} 127.0.0.1",
            f"cafile {folder / 'device-ca.pem'}",
            f"certfile {folder / 'server.pem'}",
            f"keyfile {folder / 'server.key'}",
            "require_certificate true",
            "use_identity_as_username true",
        )
        with running_mosquitto(
            dynsec_admin=(ADMIN, ADMIN_PASSWORD), extra_config=listener
        ) as broker:
            yield TlsSetup(broker, tls_port, folder, server_ca, device_ca)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def received(setup: TlsSetup, device_id: str, context: ssl.SSLContext) -> list[str]:
    """Topics an admin subscriber gets while the device publishes to its own and another's."""
    async with aiomqtt.Client(
        "127.0.0.1", setup.broker.port, username=ADMIN, password=ADMIN_PASSWORD
    ) as admin:
        await admin.subscribe("iot/#", qos=1)
        async with aiomqtt.Client(
            "127.0.0.1", setup.tls_port, identifier=device_id, tls_context=context
        ) as device:
            await device.publish("iot/someone-else/telemetry", b'{"v": 1}', qos=1)
            await device.publish(f"iot/{device_id}/telemetry", b'{"v": 2}', qos=1)
        topics: list[str] = []
        try:
            async with asyncio.timeout(1.5):
                async for message in admin.messages:
                    topics.append(message.topic.value)
        except TimeoutError:
            pass
        return topics


async def test_a_certificate_login_gets_the_device_role_iotmeter_keeps(setup: TlsSetup) -> None:
    # The credential a certificate brings (`issue_certificate`): a broker account and role.
    source = MemorySource({"cert-dev": "n1"})
    accounts = BrokerAccounts(
        BrokerAddress.from_url(setup.broker.admin_url), source, partial(derive_password, SECRET)
    )
    await accounts.reconcile_once()

    topics = await received(setup, "cert-dev", setup.device_context("cert-dev"))

    assert topics == ["iot/cert-dev/telemetry"]


async def test_without_its_broker_account_a_certificate_login_reaches_nothing(
    setup: TlsSetup,
) -> None:
    """Why a certificate brings a credential: the plugin denies what no role allows."""
    accounts = BrokerAccounts(
        BrokerAddress.from_url(setup.broker.admin_url),
        MemorySource({}),
        partial(derive_password, SECRET),
    )
    await accounts.reconcile_once()  # default access: deny

    try:
        topics = await received(setup, "lonely", setup.device_context("lonely"))
    except aiomqtt.MqttError:
        topics = []  # refused at CONNECT: also nothing

    assert topics == []
