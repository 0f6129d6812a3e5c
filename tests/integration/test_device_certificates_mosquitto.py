"""Device certificates against a real Mosquitto 2.0.11: mutual TLS with the device CA, the
certificate's CN as the MQTT username, and revocation through the CRL iotmeter writes.

What these tests pin down about Mosquitto 2.0.11 (linked to OpenSSL 3):
- it reads `crlfile` at start and on SIGHUP, never on its own: a rewritten CRL takes effect from
  the first connection after a SIGHUP (or a restart), and replaces the list read before;
- revocation is checked in the TLS handshake only: an open connection of a revoked device stays
  open until the device reconnects;
- a CRL past its nextUpdate locks out every device;
- a CRL file missing or damaged at a SIGHUP turns revocation checking off (Mosquitto logs an
  error and runs on); at start it stops Mosquitto.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from iotmeter.devicelink.certificates import DeviceCA, IssuedCertificate
from tests.fixtures.services import free_port, stop_process, wait_for_port, writable_by_mosquitto

CONNECTED = "connected"


@dataclass
class Device:
    device_id: str
    cert_file: Path
    key_file: Path
    issued: IssuedCertificate


@dataclass
class Pki:
    folder: Path
    server_ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    device_ca: DeviceCA
    device_ca_file: Path
    devices: dict[str, Device] = field(default_factory=dict)


def write_ca(folder: Path, name: str) -> DeviceCA:
    authority = trustme.CA(organization_name=name)
    authority.cert_pem.write_to_path(str(folder / f"{name}.pem"))
    authority.private_key_pem.write_to_path(str(folder / f"{name}.key"))
    (folder / f"{name}.key").chmod(0o600)
    return DeviceCA.load(folder / f"{name}.pem", folder / f"{name}.key")


def enrol(folder: Path, authority: DeviceCA, device_id: str, label: str) -> Device:
    """What a device does: make a key, send a CSR, keep the certificate it gets back."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    issued = authority.sign_request(
        request.public_bytes(serialization.Encoding.PEM), device_id, days=30
    )
    cert_file, key_file = folder / f"{label}.pem", folder / f"{label}.key"
    cert_file.write_text(issued.pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Device(device_id, cert_file, key_file, issued)


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    # Under /tmp and owned by the mosquitto user: on SIGHUP Mosquitto rereads its files after
    # dropping root, so they must be readable by that user (pytest's tmp_path is not).
    with tempfile.TemporaryDirectory(prefix="iotmeter-device-pki-") as name:
        folder = Path(name)
        writable_by_mosquitto(folder)
        server_ca = trustme.CA(organization_name="iotmeter test broker CA")
        server = server_ca.issue_cert("127.0.0.1", "localhost")
        server_ca.cert_pem.write_to_path(str(folder / "server-ca.pem"))
        server.private_key_and_cert_chain_pem.write_to_path(str(folder / "server.pem"))
        device_ca = write_ca(folder, "device-ca")
        other_ca = write_ca(folder, "other-ca")
        pki = Pki(
            folder=folder,
            server_ca_file=folder / "server-ca.pem",
            server_cert_file=folder / "server.pem",
            server_key_file=folder / "server.pem",
            device_ca=device_ca,
            device_ca_file=folder / "device-ca.pem",
        )
        for device_id in ("meter-a", "meter-b", "meter-c"):
            pki.devices[device_id] = enrol(folder, device_ca, device_id, device_id)
        # Same device id, same shape, signed by a CA the broker does not trust.
        pki.devices["stranger"] = enrol(folder, other_ca, "meter-a", "stranger")
        yield pki


@dataclass
class TlsBroker:
    """Mosquitto with one mutual-TLS listener that trusts the device CA and checks its CRL."""

    port: int
    workdir: Path
    pki: Pki
    process: subprocess.Popen[bytes] | None = None

    @property
    def crl_file(self) -> Path:
        return self.workdir / "device-ca.crl"

    @property
    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text() if path.exists() else ""

    def write_config(self) -> Path:
        config = self.workdir / "mosquitto.conf"
        (self.workdir / "acl").write_text("pattern readwrite iot/%u/#\n")
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"cafile {self.pki.device_ca_file}",
            f"certfile {self.pki.server_cert_file}",
            f"keyfile {self.pki.server_key_file}",
            "require_certificate true",
            "use_identity_as_username true",
            f"crlfile {self.crl_file}",
            "allow_anonymous false",
            f"acl_file {self.workdir / 'acl'}",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type all",
        ]
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self) -> None:
        config = self.write_config()
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, 10, self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def sighup(self) -> None:
        """Send SIGHUP and wait until Mosquitto has handled it. It reloads in its main loop
        between two rounds of network events, so a connection made after the log line is
        accepted after the reload."""
        assert self.process is not None
        before = self.log.count("Reloading config.")
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while self.log.count("Reloading config.") == before:
            assert time.monotonic() < deadline, "Mosquitto did not reload on SIGHUP"
            time.sleep(0.02)

    def revoke(self, *devices: Device) -> None:
        self.pki.device_ca.write_crl(
            self.crl_file, [(device.issued.serial_hex, datetime.now(UTC)) for device in devices]
        )


@pytest.fixture
def broker(pki: Pki) -> Iterator[TlsBroker]:
    with tempfile.TemporaryDirectory(prefix="iotmeter-mosquitto-tls-") as workdir:
        writable_by_mosquitto(Path(workdir))
        tls_broker = TlsBroker(port=free_port(), workdir=Path(workdir), pki=pki)
        tls_broker.revoke()  # Mosquitto does not start without its CRL: an empty one
        try:
            tls_broker.start()
            yield tls_broker
        finally:
            tls_broker.stop()


def client_for(broker: TlsBroker, device: Device, problems: list[str]) -> mqtt.Client:
    context = ssl.create_default_context(cafile=str(broker.pki.server_ca_file))
    context.load_cert_chain(str(device.cert_file), str(device.key_file))
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{device.device_id}-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
    )
    client.tls_set_context(context)
    # With TLS 1.3 the broker's verdict on the client certificate arrives after the client's
    # handshake is done, as an alert on the first read: paho logs it, it does not raise it.
    client.on_log = lambda _client, _userdata, level, text: (
        problems.append(text) if level == mqtt.MQTT_LOG_ERR else None
    )
    return client


def connect(broker: TlsBroker, device: Device) -> str:
    """`CONNECTED` when the broker accepts the device (CONNACK 0), else what the client saw."""
    problems: list[str] = []
    client = client_for(broker, device, problems)
    replies: list[str] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: replies.append(str(reason))
    client.on_disconnect = lambda _c, _u, _f, reason, _p: replies.append(f"closed: {reason}")
    try:
        client.connect("127.0.0.1", broker.port, keepalive=10)
        deadline = time.monotonic() + 5
        while not replies and time.monotonic() < deadline:
            client.loop(0.05)
    except (OSError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.disconnect()
    if replies[:1] == ["Success"]:
        return CONNECTED
    return "; ".join([*problems, *replies]) or "no answer"


def test_a_device_certificate_connects_with_its_id_as_username(broker: TlsBroker) -> None:
    device = broker.pki.devices["meter-a"]
    problems: list[str] = []
    client = client_for(broker, device, problems)
    received: list[str] = []
    client.on_message = lambda _c, _u, message: received.append(message.topic)
    client.connect("127.0.0.1", broker.port, keepalive=10)
    client.loop_start()
    try:
        # The ACL is `pattern readwrite iot/%u/#`: only the username `meter-a` reaches its own
        # topics, and no other device's. Messages of one connection arrive in order: once its
        # own is back, the other one would have come first.
        client.subscribe([("iot/meter-a/config", 1), ("iot/meter-b/config", 1)])
        client.publish("iot/meter-b/config", b"{}", qos=1).wait_for_publish(5)
        client.publish("iot/meter-a/config", b"{}", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not problems
    finally:
        client.disconnect()
        client.loop_stop()

    assert received == ["iot/meter-a/config"]
    assert "u'meter-a'" in broker.log


def tls12_handshake(broker: TlsBroker, device: Device) -> str:
    """`CONNECTED` when a TLS 1.2 handshake succeeds, else the broker's alert. Over TLS 1.2
    the broker checks the client certificate before the handshake ends, so its alert always
    reaches the client (over TLS 1.3 it often loses the race with the client's first write)."""
    context = ssl.create_default_context(cafile=str(broker.pki.server_ca_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(device.cert_file), str(device.key_file))
    try:
        with (
            socket.create_connection(("127.0.0.1", broker.port), timeout=5) as plain,
            context.wrap_socket(plain, server_hostname="127.0.0.1"),
        ):
            return CONNECTED
    except ssl.SSLError as exc:
        return str(exc.reason)


def verdict(broker: TlsBroker, device: Device) -> str:
    """`CONNECTED`, or the TLS alert the broker refuses the device with. An MQTT connection
    over TLS 1.3 (paho) must get the same answer."""
    over_mqtt = connect(broker, device)
    over_tls12 = tls12_handshake(broker, device)
    assert (over_mqtt == CONNECTED) == (over_tls12 == CONNECTED), (over_mqtt, over_tls12)
    return over_tls12


REVOKED = "SSLV3_ALERT_CERTIFICATE_REVOKED"


def test_a_certificate_from_another_ca_is_refused(broker: TlsBroker) -> None:
    assert verdict(broker, broker.pki.devices["stranger"]) == "TLSV1_ALERT_UNKNOWN_CA"
    assert verdict(broker, broker.pki.devices["meter-a"]) == CONNECTED


def test_a_revoked_certificate_is_refused_from_the_first_connect_after_a_sighup(
    broker: TlsBroker,
) -> None:
    revoked, kept = broker.pki.devices["meter-a"], broker.pki.devices["meter-b"]
    assert verdict(broker, revoked) == CONNECTED

    broker.revoke(revoked)
    # The file alone changes nothing: Mosquitto read it at start.
    assert verdict(broker, revoked) == CONNECTED

    broker.sighup()

    assert verdict(broker, revoked) == REVOKED
    assert verdict(broker, kept) == CONNECTED
    assert broker.process is not None
    assert broker.process.poll() is None, "SIGHUP must not stop Mosquitto"


def test_each_sighup_replaces_the_list_read_before(broker: TlsBroker) -> None:
    # So every CRL written must list every revoked certificate (still valid), not only new ones.
    first, second = broker.pki.devices["meter-a"], broker.pki.devices["meter-b"]
    broker.revoke(first)
    broker.sighup()
    assert verdict(broker, first) == REVOKED

    broker.revoke(second)
    broker.sighup()

    assert verdict(broker, second) == REVOKED
    assert verdict(broker, first) == CONNECTED
    assert verdict(broker, broker.pki.devices["meter-c"]) == CONNECTED


def test_an_open_connection_of_a_revoked_device_stays_open(broker: TlsBroker) -> None:
    device = broker.pki.devices["meter-a"]
    problems: list[str] = []
    client = client_for(broker, device, problems)
    client.connect("127.0.0.1", broker.port, keepalive=10)
    client.loop_start()
    try:
        deadline = time.monotonic() + 5
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.is_connected()
        broker.revoke(device)
        broker.sighup()

        assert verdict(broker, device) == REVOKED
        # Revocation is checked in the handshake only: the session opened before goes on.
        sent = client.publish("iot/meter-a/telemetry", b"{}", qos=1)
        sent.wait_for_publish(5)
        assert sent.is_published()
        assert client.is_connected()
        assert not problems
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_restart_reads_the_crl_too(broker: TlsBroker) -> None:
    revoked = broker.pki.devices["meter-a"]
    broker.revoke(revoked)

    broker.restart()

    assert verdict(broker, revoked) == REVOKED
    assert verdict(broker, broker.pki.devices["meter-b"]) == CONNECTED


def test_a_crl_past_its_next_update_locks_out_every_device(broker: TlsBroker) -> None:
    device = broker.pki.devices["meter-b"]
    stale = broker.pki.device_ca.build_crl(
        [], next_update_days=1, now=datetime.now(UTC) - timedelta(days=2)
    )
    broker.crl_file.write_bytes(stale)
    broker.sighup()

    assert verdict(broker, device) == "SSLV3_ALERT_CERTIFICATE_EXPIRED"

    broker.revoke()
    broker.sighup()
    assert verdict(broker, device) == CONNECTED


@pytest.mark.parametrize("damage", ["missing", "half-written", "garbage"])
def test_a_crl_mosquitto_cannot_read_at_a_sighup_turns_revocation_off(
    broker: TlsBroker, damage: str
) -> None:
    # The reason iotmeter writes the CRL atomically, and must never leave it damaged.
    revoked = broker.pki.devices["meter-a"]
    broker.revoke(revoked)
    broker.sighup()
    assert verdict(broker, revoked) == REVOKED
    if damage == "missing":
        broker.crl_file.unlink()
    elif damage == "half-written":
        whole = broker.crl_file.read_bytes()
        broker.crl_file.write_bytes(whole[: len(whole) // 2])
    else:
        broker.crl_file.write_bytes(b"garbage\n")

    broker.sighup()

    assert verdict(broker, revoked) == CONNECTED
    assert broker.process is not None
    assert broker.process.poll() is None
    assert "Unable to load certificate revocation file" in broker.log
    # A readable CRL and another SIGHUP bring the check back.
    broker.revoke(revoked)
    broker.sighup()
    assert verdict(broker, revoked) == REVOKED


def test_mosquitto_does_not_start_without_its_crl(broker: TlsBroker) -> None:
    broker.stop()
    broker.crl_file.unlink()

    config = broker.write_config()
    process = subprocess.run(["mosquitto", "-c", str(config)], timeout=10, check=False)

    assert process.returncode != 0
    assert "Unable to load certificate revocation file" in broker.log
