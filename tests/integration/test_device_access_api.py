"""Device credentials, certificates and configuration versions through the API, on PostgreSQL
and SQLite (no broker here: tests/e2e/test_device_channel.py has the brokers)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import text

from iotmeter.config import Settings
from iotmeter.db.engine import Database, build_engine
from tests.conftest import make_settings

DEVICES = "/api/v1/devices"


@pytest.fixture
def device_ca(tmp_path: Path) -> tuple[Path, Path, x509.Certificate]:
    """A device CA on disk: (certificate file, key file, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iotmeter test device CA")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
    cert_file = tmp_path / "device-ca.pem"
    key_file = tmp_path / "device-ca.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, certificate


@pytest.fixture
def settings(
    database_url: str, tmp_path: Path, device_ca: tuple[Path, Path, x509.Certificate]
) -> Settings:
    return make_settings(
        database_url,
        tmp_path,
        device_ca_cert_file=device_ca[0],
        device_ca_key_file=device_ca[1],
        device_crl_file=tmp_path / "crl.pem",
        device_credential_secret_file=tmp_path / "credential.secret",
    )


@pytest.fixture
async def device(api: httpx.AsyncClient) -> str:
    response = await api.post(DEVICES, json={"id": "meter-7", "name": "Meter", "type": "power"})
    assert response.status_code == 201, response.text
    return "meter-7"


def csr_for(common_name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


async def every_text_in_the_registry(settings: Settings) -> str:
    """Every value of every credential row, as one text (to look for a password in it)."""
    database = Database(build_engine(settings.database_url))
    try:
        async with database.reader() as connection:
            rows = (await connection.execute(text("SELECT * FROM device_credentials"))).all()
    finally:
        await database.close()
    return " ".join(str(value) for row in rows for value in row)


async def test_a_credential_is_shown_once_and_the_registry_keeps_no_password(
    api: httpx.AsyncClient, device: str, settings: Settings
) -> None:
    response = await api.post(f"{DEVICES}/{device}/credentials")

    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    created = response.json()
    assert created["username"] == device
    assert created["client_id"] == device
    password = created["password"]
    assert isinstance(password, str)
    assert len(password) >= 40
    assert password not in await every_text_in_the_registry(settings)

    shown = (await api.get(f"{DEVICES}/{device}/credentials")).json()
    assert shown["password"] is None
    assert shown["created_at"] == created["created_at"]


async def test_rotating_gives_a_new_password_and_revoking_removes_it(
    api: httpx.AsyncClient, device: str
) -> None:
    first = (await api.post(f"{DEVICES}/{device}/credentials")).json()["password"]
    second = (await api.post(f"{DEVICES}/{device}/credentials")).json()["password"]
    assert first != second

    assert (await api.delete(f"{DEVICES}/{device}/credentials")).status_code == 204
    missing = await api.get(f"{DEVICES}/{device}/credentials")
    assert missing.status_code == 404
    assert "POST /api/v1/devices/meter-7/credentials" in missing.json()["error"]["message"]
    assert (await api.delete(f"{DEVICES}/{device}/credentials")).status_code == 404


async def test_credentials_of_an_unknown_device_are_404(api: httpx.AsyncClient) -> None:
    response = await api.post(f"{DEVICES}/nobody/credentials")
    assert response.status_code == 404
    assert "nobody" in response.json()["error"]["message"]


async def test_deleting_a_device_revokes_its_credential(
    api: httpx.AsyncClient, device: str
) -> None:
    await api.post(f"{DEVICES}/{device}/credentials")
    assert (await api.delete(f"{DEVICES}/{device}")).status_code == 204
    again = await api.post(DEVICES, json={"id": device, "name": "Meter", "type": "power"})
    assert again.status_code == 201

    assert (await api.get(f"{DEVICES}/{device}/credentials")).status_code == 404


@pytest.mark.parametrize("device_id", ["a+b", "a#b", "a/b", "+", "#", "$SYS", ".", ".."])
async def test_device_ids_that_could_widen_a_topic_never_register(
    api: httpx.AsyncClient, device_id: str
) -> None:
    response = await api.post(DEVICES, json={"id": device_id, "name": "x", "type": "power"})
    assert response.status_code == 422, response.text


async def configs(api: httpx.AsyncClient, device: str) -> dict[str, Any]:
    response = await api.get(f"{DEVICES}/{device}/configs")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_every_change_of_the_configuration_gets_a_new_version(
    api: httpx.AsyncClient, device: str
) -> None:
    assert (await configs(api, device))["desired_version"] == 0

    await api.put(f"{DEVICES}/{device}/configs/interval_s", json={"value": 10})
    state = await configs(api, device)
    assert state["desired"] == {"interval_s": 10}
    assert state["desired_version"] == 1
    assert state["in_sync"] is False  # sent, not reported

    await api.put(f"{DEVICES}/{device}/configs", json={"interval_s": 5, "enabled": True})
    assert (await configs(api, device))["desired_version"] == 2
    await api.delete(f"{DEVICES}/{device}/configs/enabled")
    state = await configs(api, device)
    assert state["desired_version"] == 3
    assert state["desired"] == {"interval_s": 5}

    # A refused change is no new version.
    refused = await api.put(f"{DEVICES}/{device}/configs", json={"k": "x\u0000"})
    assert refused.status_code == 422
    missing = await api.delete(f"{DEVICES}/{device}/configs/nope")
    assert missing.status_code == 404
    assert (await configs(api, device))["desired_version"] == 3

    device_read = (await api.get(f"{DEVICES}/{device}")).json()
    assert device_read["config_version"] == 3
    assert device_read["config_in_sync"] is False


async def test_the_device_list_filters_devices_out_of_sync(
    api: httpx.AsyncClient, device: str
) -> None:
    await api.post(DEVICES, json={"id": "quiet", "name": "Quiet", "type": "power"})
    await api.put(f"{DEVICES}/{device}/configs/interval_s", json={"value": 10})

    out = (await api.get(DEVICES, params={"config_in_sync": "false"})).json()
    inside = (await api.get(DEVICES, params={"config_in_sync": "true"})).json()
    assert [item["id"] for item in out["items"]] == [device]
    assert [item["id"] for item in inside["items"]] == ["quiet"]
    never = (await api.get(DEVICES, params={"connected": "false"})).json()
    assert never["total"] == 2
    assert (await api.get(DEVICES, params={"connected": "true"})).json()["total"] == 0


async def test_a_certificate_is_signed_for_the_device_and_revocation_reaches_the_list(
    api: httpx.AsyncClient,
    device: str,
    settings: Settings,
    device_ca: tuple[Path, Path, x509.Certificate],
) -> None:
    response = await api.post(f"{DEVICES}/{device}/certificate", json={"csr": csr_for(device)})

    assert response.status_code == 201, response.text
    issued = response.json()
    certificate = x509.load_pem_x509_certificate(issued["certificate"].encode())
    certificate.verify_directly_issued_by(device_ca[2])
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [name.value for name in common_names] == [device]
    assert format(certificate.serial_number, "x") == issued["serial"]
    listed = (await api.get(f"{DEVICES}/{device}/certificates")).json()
    assert [item["serial"] for item in listed] == [issued["serial"]]
    assert listed[0]["revoked_at"] is None

    revoked = await api.delete(f"{DEVICES}/{device}/certificates/{issued['serial']}")
    assert revoked.status_code == 204
    assert (await api.get(f"{DEVICES}/{device}/certificates")).json()[0]["revoked_at"]
    crl_file = settings.device_crl_file
    assert crl_file is not None
    for _ in range(100):
        if crl_file.exists():
            crl = x509.load_pem_x509_crl(crl_file.read_bytes())
            if crl.get_revoked_certificate_by_serial_number(certificate.serial_number):
                break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the revocation list never named the revoked certificate")


@pytest.mark.parametrize(
    ("csr", "what"),
    [
        (csr_for("someone-else"), "meter-7"),
        ("not a certificate request", "PEM"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", ""),
    ],
)
async def test_a_bad_certificate_request_is_refused_saying_why(
    api: httpx.AsyncClient, device: str, csr: str, what: str
) -> None:
    response = await api.post(f"{DEVICES}/{device}/certificate", json={"csr": csr})

    assert 400 <= response.status_code < 500, response.text
    assert what in response.json()["error"]["message"]
    assert (await api.get(f"{DEVICES}/{device}/certificates")).json() == []


async def test_without_a_device_ca_certificates_are_refused_naming_the_settings(
    database_url: str, tmp_path: Path
) -> None:
    from asgi_lifespan import LifespanManager

    from iotmeter.app import create_app
    from tests.conftest import auth_headers

    settings = make_settings(database_url, tmp_path)
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://iotmeter", headers=await auth_headers(settings)
        ) as api:
            await api.post(DEVICES, json={"id": "d1", "name": "D", "type": "power"})
            response = await api.post(f"{DEVICES}/d1/certificate", json={"csr": csr_for("d1")})
    assert response.status_code == 409
    assert "IOTMETER_DEVICE_CA_CERT_FILE" in response.json()["error"]["message"]


async def test_the_broker_service_account_name_is_no_device_id(api: httpx.AsyncClient) -> None:
    response = await api.post(DEVICES, json={"id": "iotmeter", "name": "x", "type": "power"})
    assert response.status_code == 409
    assert "broker account" in response.json()["error"]["message"]


async def test_a_certificate_brings_a_broker_account_and_serials_compare_as_numbers(
    api: httpx.AsyncClient, device: str
) -> None:
    assert (await api.get(f"{DEVICES}/{device}/credentials")).status_code == 404
    issued = (
        await api.post(f"{DEVICES}/{device}/certificate", json={"csr": csr_for(device)})
    ).json()
    account = await api.get(f"{DEVICES}/{device}/credentials")
    assert account.status_code == 200  # the broker account a certificate login needs
    assert account.json()["password"] is None

    padded = issued["serial"].upper().rjust(40, "0")  # as `openssl x509 -serial` prints it
    assert (await api.delete(f"{DEVICES}/{device}/certificates/{padded}")).status_code == 204
    listed = (await api.get(f"{DEVICES}/{device}/certificates")).json()
    assert listed[0]["revoked_at"] is not None
