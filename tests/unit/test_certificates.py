"""The device CA: which CSRs it signs, what the certificates say, the CRL, and its settings."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotmeter.devicelink.certificates import (
    MAX_CSR_BYTES,
    DeviceCA,
    IssuedCertificate,
    device_id_from_certificate,
    serial_hex,
)
from iotmeter.errors import SettingsInvalid, ValidationFailed

DEVICE = "meter-7.a_b"

CAKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
SigningKey = CAKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem_of_key(key: CAKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca_certificate(
    key: CAKey,
    *,
    ca: bool = True,
    key_usage: x509.KeyUsage | None = None,
    subject_key_identifier: bool = True,
    not_after: datetime | None = None,
) -> x509.Certificate:
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iotmeter test device CA")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(not_after or now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if subject_key_identifier:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    return builder.sign(key, hashes.SHA256())


def write_ca(folder: Path, certificate: x509.Certificate, key: CAKey) -> tuple[Path, Path]:
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(pem_of_key(key))
    key_path.chmod(0o600)
    return cert_path, key_path


def load_ca(folder: Path, key: CAKey, **options: object) -> DeviceCA:
    return DeviceCA.load(*write_ca(folder, make_ca_certificate(key, **options), key))  # type: ignore[arg-type]


def csr(
    key: SigningKey, subject: x509.Name | str = DEVICE, **extensions: x509.ExtensionType
) -> bytes:
    name = (
        subject
        if isinstance(subject, x509.Name)
        else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    )
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    for extension in extensions.values():
        builder = builder.add_extension(extension, critical=False)
    algorithm = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def ca_key() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture(scope="module")
def device_key() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture
def ca(tmp_path: Path, ca_key: rsa.RSAPrivateKey) -> DeviceCA:
    return load_ca(tmp_path, ca_key)


def issued(certificate: IssuedCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(certificate.pem.encode())


# --- signing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_key",
    [
        pytest.param(lambda: rsa_key(2048), id="rsa-2048"),
        pytest.param(lambda: rsa_key(3072), id="rsa-3072"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()), id="ec-p256"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="ec-p384"),
        pytest.param(ed25519.Ed25519PrivateKey.generate, id="ed25519"),
    ],
)
@pytest.mark.parametrize(
    "make_ca_key",
    [
        pytest.param(lambda: rsa_key(2048), id="rsa-ca"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="ec-ca"),
    ],
)
def test_signs_a_good_csr_as_a_client_certificate_of_the_ca(
    tmp_path: Path, make_key: object, make_ca_key: object
) -> None:
    key = make_key()  # type: ignore[operator]
    authority = load_ca(tmp_path, make_ca_key())  # type: ignore[operator]

    result = authority.sign_request(csr(key), DEVICE, 30)

    certificate = issued(result)
    certificate.verify_directly_issued_by(authority.certificate)
    assert certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    extensions = certificate.extensions
    assert extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == (
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    )
    constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.key_encipherment is isinstance(key, rsa.RSAPrivateKey)
    assert not usage.value.key_cert_sign
    assert extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    )
    ca_identifier = authority.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    assert (
        extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        == ca_identifier.digest
    )


def test_the_certificate_names_the_device_only_and_its_fields_are_reported(
    ca: DeviceCA, device_key: rsa.RSAPrivateKey
) -> None:
    # Other subject fields and requested extensions (a SAN, CA:TRUE) are not carried over.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp"),
            x509.NameAttribute(NameOID.COMMON_NAME, DEVICE),
        ]
    )
    request = csr(
        device_key,
        subject,
        san=x509.SubjectAlternativeName([x509.DNSName("iotmeter.example.com")]),
        constraints=x509.BasicConstraints(ca=True, path_length=None),
    )
    before = datetime.now(UTC).replace(microsecond=0)

    result = ca.sign_request(request, DEVICE, 30)

    certificate = issued(result)
    assert certificate.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    assert certificate.issuer == ca.certificate.subject
    assert {extension.oid for extension in certificate.extensions} == {
        x509.BasicConstraints.oid,
        x509.KeyUsage.oid,
        x509.ExtendedKeyUsage.oid,
        x509.SubjectKeyIdentifier.oid,
        x509.AuthorityKeyIdentifier.oid,
    }
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert result.serial_hex == format(certificate.serial_number, "x") == serial_hex(certificate)
    assert 0 < certificate.serial_number < 2**159
    assert result.fingerprint_sha256 == certificate.fingerprint(hashes.SHA256()).hex()
    assert result.not_before == certificate.not_valid_before_utc
    assert result.not_after == certificate.not_valid_after_utc
    assert before - timedelta(minutes=5, seconds=1) <= result.not_before <= before
    assert result.not_after - result.not_before == timedelta(days=30, minutes=5)


def test_serials_are_random(ca: DeviceCA, device_key: rsa.RSAPrivateKey) -> None:
    request = csr(device_key)
    serials = {ca.sign_request(request, DEVICE, 1).serial_hex for _ in range(20)}
    assert len(serials) == 20
    # 159 random bits: most serials use the top bits (a counter would not).
    assert max(int(serial, 16) for serial in serials).bit_length() >= 150


def test_validity_stops_at_the_ca_expiry(tmp_path: Path, ca_key: rsa.RSAPrivateKey) -> None:
    ca_not_after = datetime.now(UTC).replace(microsecond=0) + timedelta(days=10)
    authority = load_ca(tmp_path, ca_key, not_after=ca_not_after)

    result = authority.sign_request(csr(ec.generate_private_key(ec.SECP256R1())), DEVICE, 365)

    assert result.not_after == ca_not_after


def test_a_ca_without_subject_key_identifier_still_gives_an_authority_key_identifier(
    tmp_path: Path, ca_key: rsa.RSAPrivateKey, device_key: rsa.RSAPrivateKey
) -> None:
    authority = load_ca(tmp_path, ca_key, subject_key_identifier=False)

    certificate = issued(authority.sign_request(csr(device_key), DEVICE, 1))

    assert certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value == (
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    )
    certificate.verify_directly_issued_by(authority.certificate)


# --- refusals -------------------------------------------------------------------------------


def cn(value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


@pytest.mark.parametrize(
    ("subject", "says"),
    [
        pytest.param("other-device", "must be exactly the device id", id="other-device"),
        pytest.param(DEVICE.upper(), "must be exactly the device id", id="case"),
        pytest.param(f"{DEVICE} ", "must be exactly the device id", id="trailing-space"),
        pytest.param(f"{DEVICE}/CN=admin", "must be exactly", id="slash"),
        pytest.param(f"{DEVICE}+CN=admin", "must be exactly", id="plus-in-value"),
        pytest.param(f"{DEVICE}/#", "must be exactly", id="wildcard"),
        pytest.param(f"{DEVICE}\x00admin", "must be exactly", id="nul"),
        pytest.param(x509.Name([cn(DEVICE), cn("admin")]), "2 common names", id="two-cns"),
        pytest.param(x509.Name([cn(DEVICE), cn(DEVICE)]), "2 common names", id="same-cn-twice"),
        pytest.param(
            x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVICE)]),
            "0 common names",
            id="no-cn",
        ),
        pytest.param(
            x509.Name(
                [
                    x509.RelativeDistinguishedName(
                        [cn(DEVICE), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]
                    )
                ]
            ),
            "multi-valued",
            id="multi-valued-rdn",
        ),
    ],
)
def test_refuses_a_csr_that_does_not_name_exactly_the_device(
    ca: DeviceCA, device_key: rsa.RSAPrivateKey, subject: x509.Name | str, says: str
) -> None:
    with pytest.raises(ValidationFailed, match="common name") as raised:
        ca.sign_request(csr(device_key, subject), DEVICE, 30)
    assert says in raised.value.message


@pytest.mark.parametrize(
    "device_id", ["meter+1", "meter/1", "meter#", "..", "", "x" * 65, f"{DEVICE}\n"]
)
def test_refuses_a_device_id_that_is_no_valid_name(
    ca: DeviceCA, device_key: rsa.RSAPrivateKey, device_id: str
) -> None:
    # A CSR that names exactly this id must not get through either (MQTT wildcards, paths).
    request = csr(device_key, device_id) if 0 < len(device_id) <= 64 else csr(device_key)
    with pytest.raises(ValidationFailed, match="cannot be a certificate's name"):
        ca.sign_request(request, device_id, 30)


@pytest.mark.parametrize(
    ("make_key", "says"),
    [
        pytest.param(lambda: rsa_key(1024), "RSA key has 1024 bits", id="rsa-1024"),
        pytest.param(
            lambda: ec.generate_private_key(ec.SECP521R1()), "curve secp521r1", id="ec-p521"
        ),
        pytest.param(
            lambda: ec.generate_private_key(ec.SECP256K1()), "curve secp256k1", id="ec-k256"
        ),
        pytest.param(ed448.Ed448PrivateKey.generate, "key type is not accepted", id="ed448"),
    ],
)
def test_refuses_weak_or_unknown_keys(ca: DeviceCA, make_key: object, says: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        ca.sign_request(csr(make_key()), DEVICE, 30)  # type: ignore[operator]
    assert says in raised.value.message


def test_refuses_a_csr_whose_signature_does_not_match(
    ca: DeviceCA, device_key: rsa.RSAPrivateKey
) -> None:
    der = bytearray(
        x509.load_pem_x509_csr(csr(device_key)).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # the last byte of the RSA signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)

    with pytest.raises(ValidationFailed, match="signature does not match"):
        ca.sign_request(tampered, DEVICE, 30)


def test_refuses_an_oversized_csr_before_reading_it(
    ca: DeviceCA, device_key: rsa.RSAPrivateKey
) -> None:
    padded = csr(device_key) + b"\n" * MAX_CSR_BYTES

    with pytest.raises(ValidationFailed, match=f"at most {MAX_CSR_BYTES} bytes"):
        ca.sign_request(padded, DEVICE, 30)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"hello",
        b"-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n",
        b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n-----END CERTIFICATE REQUEST-----\n",
    ],
)
def test_refuses_garbage_with_a_hint(ca: DeviceCA, body: bytes) -> None:
    with pytest.raises(ValidationFailed, match=f"openssl req .*-subj /CN={DEVICE}"):
        ca.sign_request(body, DEVICE, 30)


def test_refuses_a_certificate_given_instead_of_a_csr(ca: DeviceCA) -> None:
    with pytest.raises(ValidationFailed, match="not a readable PEM certificate signing request"):
        ca.sign_request(ca.certificate_pem, DEVICE, 30)


def sign_or_refuse(ca: DeviceCA, body: bytes) -> None:
    """Signing either works or says why; any other exception is a 500 for the API."""
    try:
        result = ca.sign_request(body, DEVICE, 1)
    except ValidationFailed:
        return
    issued(result).verify_directly_issued_by(ca.certificate)


@pytest.fixture(scope="module")
def module_ca(tmp_path_factory: pytest.TempPathFactory, ca_key: rsa.RSAPrivateKey) -> DeviceCA:
    return load_ca(tmp_path_factory.mktemp("ca"), ca_key)


@pytest.fixture(scope="module")
def good_der(device_key: rsa.RSAPrivateKey) -> bytes:
    return x509.load_pem_x509_csr(csr(device_key)).public_bytes(serialization.Encoding.DER)


examples = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def as_pem(der: bytes) -> bytes:
    import base64

    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


@examples
@given(body=st.binary(max_size=4096))
def test_random_bytes_are_refused_clearly(module_ca: DeviceCA, body: bytes) -> None:
    sign_or_refuse(module_ca, body)


@examples
@given(der=st.binary(max_size=2048))
def test_random_der_inside_pem_armour_is_refused_clearly(module_ca: DeviceCA, der: bytes) -> None:
    sign_or_refuse(module_ca, as_pem(der))


@examples
@given(data=st.data())
def test_damaged_csrs_are_refused_clearly(
    module_ca: DeviceCA, good_der: bytes, data: st.DataObject
) -> None:
    damaged = bytearray(good_der)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(damaged) - 1))
        damaged[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(damaged)))
    sign_or_refuse(module_ca, as_pem(bytes(damaged[:cut])))


# --- the CA's files -------------------------------------------------------------------------


def test_load_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsInvalid, match="IOTMETER_DEVICE_CA_CERT_FILE: cannot read"):
        DeviceCA.load(tmp_path / "nope.pem", tmp_path / "nope.key")


def test_load_refuses_a_file_that_is_no_certificate(tmp_path: Path) -> None:
    cert_path, key_path = write_ca(tmp_path, make_ca_certificate(key := rsa_key()), key)
    cert_path.write_bytes(b"certainly not\n")
    with pytest.raises(SettingsInvalid, match=r"IOTMETER_DEVICE_CA_CERT_FILE .* not a PEM cert"):
        DeviceCA.load(cert_path, key_path)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        pytest.param({"ca": False}, "CA:FALSE", id="leaf"),
        pytest.param(
            {
                "key_usage": x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                )
            },
            "keyCertSign and cRLSign",
            id="no-crl-sign",
        ),
        pytest.param(
            {"not_after": datetime.now(UTC) - timedelta(seconds=1)}, "expired", id="expired"
        ),
    ],
)
def test_load_refuses_a_certificate_that_cannot_be_the_device_ca(
    tmp_path: Path, ca_key: rsa.RSAPrivateKey, options: dict[str, object], says: str
) -> None:
    with pytest.raises(SettingsInvalid, match="IOTMETER_DEVICE_CA_CERT_FILE") as raised:
        load_ca(tmp_path, ca_key, **options)
    assert says in raised.value.message


def test_load_refuses_a_key_of_another_certificate(
    tmp_path: Path, ca_key: rsa.RSAPrivateKey
) -> None:
    cert_path, key_path = write_ca(tmp_path, make_ca_certificate(ca_key), ca_key)
    key_path.write_bytes(pem_of_key(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(SettingsInvalid, match=r"IOTMETER_DEVICE_CA_KEY_FILE .* is not the key of"):
        DeviceCA.load(cert_path, key_path)


def test_load_refuses_an_encrypted_key(tmp_path: Path, ca_key: rsa.RSAPrivateKey) -> None:
    cert_path, key_path = write_ca(tmp_path, make_ca_certificate(ca_key), ca_key)
    key_path.write_bytes(
        ca_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(SettingsInvalid, match=r"IOTMETER_DEVICE_CA_KEY_FILE .* is encrypted"):
        DeviceCA.load(cert_path, key_path)


def test_load_refuses_a_weak_ca_key(tmp_path: Path) -> None:
    weak = rsa_key(1024)
    with pytest.raises(SettingsInvalid, match=r"IOTMETER_DEVICE_CA_KEY_FILE .* 1024 bits"):
        DeviceCA.load(*write_ca(tmp_path, make_ca_certificate(weak), weak))


def test_load_warns_about_a_key_others_can_read(
    tmp_path: Path, ca_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    cert_path, key_path = write_ca(tmp_path, make_ca_certificate(ca_key), ca_key)
    key_path.chmod(0o644)
    DeviceCA.load(cert_path, key_path)
    assert "readable by others" in caplog.text


# --- revocation -----------------------------------------------------------------------------


def test_crl_lists_the_revoked_serials_and_verifies(
    ca: DeviceCA, device_key: rsa.RSAPrivateKey
) -> None:
    first = ca.sign_request(csr(device_key), DEVICE, 30)
    second = ca.sign_request(csr(device_key), DEVICE, 30)
    kept = ca.sign_request(csr(device_key), DEVICE, 30)
    revoked_at = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    now = datetime.now(UTC)

    crl = x509.load_pem_x509_crl(
        ca.build_crl(
            [(first.serial_hex, revoked_at), (second.serial_hex.upper(), revoked_at)],
            next_update_days=2,
        )
    )

    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.certificate.subject
    assert len(crl) == 2
    for certificate in (first, second):
        entry = crl.get_revoked_certificate_by_serial_number(int(certificate.serial_hex, 16))
        assert entry is not None
        assert entry.revocation_date_utc == revoked_at
    assert crl.get_revoked_certificate_by_serial_number(int(kept.serial_hex, 16)) is None
    assert crl.last_update_utc <= now
    assert crl.next_update_utc is not None
    assert timedelta(days=2) - timedelta(seconds=5) < crl.next_update_utc - now <= timedelta(days=2)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > 0


def test_crl_numbers_increase(ca: DeviceCA) -> None:
    numbers = [
        x509.load_pem_x509_crl(ca.build_crl([]))
        .extensions.get_extension_for_class(x509.CRLNumber)
        .value.crl_number
        for _ in range(3)
    ]
    assert numbers == sorted(set(numbers))


def test_crl_lists_a_serial_once_and_refuses_what_is_no_serial(ca: DeviceCA) -> None:
    at = datetime(2026, 5, 1, tzinfo=UTC)
    crl = x509.load_pem_x509_crl(ca.build_crl([("abc", at), ("ABC", at), ("0abc", at)]))
    assert len(crl) == 1
    with pytest.raises(ValueError, match="not a hexadecimal certificate serial"):
        ca.build_crl([("xyz", at)])
    with pytest.raises(ValueError, match="positive"):
        ca.build_crl([("0", at)])


def test_write_crl_replaces_the_file_whole_and_readable(ca: DeviceCA, tmp_path: Path) -> None:
    path = tmp_path / "crl" / "device-ca.crl"
    ca.write_crl(path, [])
    assert len(x509.load_pem_x509_crl(path.read_bytes())) == 0
    assert path.stat().st_mode & 0o777 == 0o644

    ca.write_crl(path, [("1f", datetime.now(UTC))])

    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(0x1F) is not None
    assert os.listdir(path.parent) == ["device-ca.crl"]


def test_write_crl_leaves_the_old_file_when_it_fails(
    ca: DeviceCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "crl" / "device-ca.crl"
    ca.write_crl(path, [("1f", datetime.now(UTC))])
    before = path.read_bytes()

    def full_disk(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ca.write_crl(path, [("2f", datetime.now(UTC))])

    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["device-ca.crl"]


# --- reading certificates back (embedded broker) --------------------------------------------


def test_device_id_from_certificate(ca: DeviceCA, device_key: rsa.RSAPrivateKey) -> None:
    certificate = issued(ca.sign_request(csr(device_key), DEVICE, 1))
    assert device_id_from_certificate(certificate.public_bytes(serialization.Encoding.DER)) == (
        DEVICE
    )
    assert device_id_from_certificate(b"\x30\x03garbage") is None
    assert device_id_from_certificate(b"") is None


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param(x509.Name([cn("a"), cn("b")]), id="two-cns"),
        pytest.param(
            x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVICE)]), id="no-cn"
        ),
    ],
)
def test_device_id_from_certificate_without_a_single_cn_is_none(
    ca_key: rsa.RSAPrivateKey, subject: x509.Name
) -> None:
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    assert device_id_from_certificate(certificate.public_bytes(serialization.Encoding.DER)) is None
