"""`iotmeter serve` as a client meets it: slow clients cut off, HTTPS, secrets from files,
allowed hosts. Real processes on real sockets."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from iotmeter.app import create_app
from iotmeter.config import load_settings
from iotmeter.errors import SettingsInvalid
from tests.conftest import auth_headers, make_settings
from tests.fixtures.services import free_port
from tests.fixtures.waiting import eventually


class Served:
    def __init__(self, process: subprocess.Popen[bytes], port: int, scheme: str) -> None:
        self.process = process
        self.port = port
        self.base_url = f"{scheme}://127.0.0.1:{port}"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    started: list[subprocess.Popen[bytes]] = []

    async def start(scheme: str = "http", **env: str) -> Served:
        port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("IOTMETER_")}
        environment.update(
            IOTMETER_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}",
            IOTMETER_COLLECTOR_ENABLED="false",
            IOTMETER_ARCHIVE_DIR=str(tmp_path / "archive"),
            IOTMETER_SPOOL_DIR=str(tmp_path / "spool"),
            IOTMETER_AUTH_BOOTSTRAP_FILE=str(tmp_path / "admin.key"),
            **env,
        )
        with (tmp_path / f"serve-{port}.log").open("wb") as log:
            process = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, "-m", "iotmeter", "serve", "--port", str(port)],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        served = Served(process, port, scheme)
        async with httpx.AsyncClient(base_url=served.base_url, verify=False, timeout=2) as client:

            async def health() -> int:
                try:
                    return (await client.get("/health")).status_code
                except httpx.HTTPError:
                    return 0

            await eventually(health, lambda status: status == 200, within=30, what="serving")
        return served

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


async def test_a_client_that_trickles_its_request_head_is_cut_off(serve: object) -> None:
    served: Served = await serve(IOTMETER_HTTP_HEADER_TIMEOUT_S="1")  # type: ignore[operator]
    slow = []
    for _ in range(20):
        connection = socket.create_connection(("127.0.0.1", served.port))
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        slow.append(connection)
    silent = socket.create_connection(("127.0.0.1", served.port))  # sends nothing at all
    slow.append(silent)
    started = time.monotonic()

    def closed(connection: socket.socket) -> bool:
        connection.settimeout(10)
        try:
            return connection.recv(1) == b""
        except OSError:
            return True

    results = await asyncio.gather(*(asyncio.to_thread(closed, c) for c in slow))
    elapsed = time.monotonic() - started
    assert all(results)
    assert elapsed < 8, f"slow connections were held {elapsed:.1f} s"
    for connection in slow:
        connection.close()
    # A client that sends its request whole is served as ever.
    async with httpx.AsyncClient(base_url=served.base_url) as client:
        assert (await client.get("/health")).status_code == 200


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_serve_speaks_https_with_the_configured_certificate(
    serve: object, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    served: Served = await serve(  # type: ignore[operator]
        "https", IOTMETER_HTTP_TLS_CERT_FILE=str(cert), IOTMETER_HTTP_TLS_KEY_FILE=str(key)
    )
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert)) as client:
        response = await client.get(f"{served.base_url}/health")
    assert response.status_code == 200
    with pytest.raises(httpx.HTTPError):
        async with httpx.AsyncClient() as plain:
            await plain.get(f"http://127.0.0.1:{served.port}/health")


def test_half_a_tls_setting_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IOTMETER_HTTP_TLS_CERT_FILE", str(tmp_path / "cert.pem"))
    with pytest.raises(SettingsInvalid, match="IOTMETER_HTTP_TLS_KEY_FILE"):
        load_settings()


def test_secrets_come_from_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "s3-secret").write_text("from-a-file\n")
    monkeypatch.setenv("IOTMETER_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("IOTMETER_S3_ACCESS_KEY", "access")
    monkeypatch.setenv("IOTMETER_S3_SECRET_KEY_FILE", str(tmp_path / "s3-secret"))
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "iotmeter_auth_jwt_secret").write_text("jwt-secret-from-the-secrets-folder")
    monkeypatch.setenv("IOTMETER_SECRETS_DIR", str(secrets))
    settings = load_settings()
    assert settings.s3_secret_key is not None
    assert settings.s3_secret_key.get_secret_value() == "from-a-file"
    assert settings.auth_jwt_secret is not None
    assert settings.auth_jwt_secret.get_secret_value() == "jwt-secret-from-the-secrets-folder"


def test_a_secret_file_that_cannot_be_read_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("IOTMETER_INFLUX_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsInvalid, match="IOTMETER_INFLUX_TOKEN_FILE"):
        load_settings()


async def test_only_the_allowed_hosts_are_answered(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path, http_allowed_hosts=["iot.example.com"])
    async with LifespanManager(create_app(settings)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        headers = await auth_headers(settings)
        async with httpx.AsyncClient(transport=transport, headers=headers) as client:
            good = await client.get("http://iot.example.com/api/v1/devices")
            bad = await client.get("http://evil.example.com/api/v1/devices")
    assert good.status_code == 200
    assert bad.status_code == 400
