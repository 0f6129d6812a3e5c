"""Device certificates: the device CA signs device CSRs and lists revoked serials in a CRL.

A device authenticates to the broker with a client certificate whose subject common name is its
device id (Mosquitto's `use_identity_as_username`, the embedded broker's plugin). So the CA signs
only a CSR whose CN is exactly the id it is issued for, and the certificate it issues names
nothing else: any other subject field or extension of the CSR is ignored.

Synchronous and CPU-bound (an RSA signature takes milliseconds): async callers use
`asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotmeter.config import env_name
from iotmeter.errors import SettingsInvalid, ValidationFailed
from iotmeter.ids import DEVICE_ID_RE

logger = logging.getLogger(__name__)

MAX_CSR_BYTES = 16 * 1024
"""Largest CSR accepted; a PEM CSR of a 8192-bit RSA key is under 3 KiB."""
CLOCK_SKEW = timedelta(minutes=5)
"""Certificates and CRLs start this much in the past, for devices whose clocks run behind."""
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
DEFAULT_CRL_DAYS = 7

_DEVICE_CURVES = (ec.SECP256R1, ec.SECP384R1)
_CA_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_ACCEPTED_KEYS = f"RSA of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, EC P-256 or P-384, or Ed25519"

CAPrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
DevicePublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    pem: str
    """The certificate, PEM (ASCII)."""
    serial_hex: str
    """Serial number, lower-case hex without leading zeros (as `serial_hex()` gives it)."""
    fingerprint_sha256: str
    """SHA-256 of the DER certificate, lower-case hex."""
    not_before: datetime
    not_after: datetime


def serial_hex(certificate: x509.Certificate) -> str:
    """The certificate's serial number as lower-case hex, the form the registry keeps."""
    return format(certificate.serial_number, "x")


def device_id_from_certificate(der: bytes) -> str | None:
    """The device id a (chain-verified) client certificate names: its subject's single CN.
    None when the certificate cannot be read or has no CN or more than one."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    if len(names) != 1 or not isinstance(names[0].value, str):
        return None
    return names[0].value


class DeviceCA:
    """The CA that signs device certificates and their revocation list."""

    def __init__(self, certificate: x509.Certificate, private_key: CAPrivateKey) -> None:
        self.certificate = certificate
        self._private_key = private_key

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> DeviceCA:
        """Read and check the CA certificate and its key (PEM); SettingsInvalid naming the
        setting at fault when a file is unreadable, not a CA, or the two do not match."""
        cert_setting = env_name("device_ca_cert_file")
        key_setting = env_name("device_ca_key_file")
        certificate = _load_ca_certificate(_read(cert_path, cert_setting), cert_setting, cert_path)
        private_key = _load_ca_key(_read(key_path, key_setting), key_setting, key_path)
        if _public_der(private_key.public_key()) != _public_der(certificate.public_key()):
            raise SettingsInvalid(
                f"{key_setting} ({key_path}) is not the key of the certificate in "
                f"{cert_setting} ({cert_path}); give the matching pair"
            )
        with contextlib.suppress(OSError):
            if key_path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                logger.warning("%s (%s) is readable by others: chmod 600 it", key_setting, key_path)
        return cls(certificate, private_key)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign_request(self, csr_pem: bytes, device_id: str, days: int) -> IssuedCertificate:
        """Issue a client certificate for `device_id` from its CSR (PEM); ValidationFailed,
        saying what to fix, for a CSR that is unreadable, badly signed, of a weak or unknown
        key type, or whose subject CN is not exactly `device_id`. The certificate ends with
        the CA's, at the latest; SettingsInvalid once the CA has expired."""
        if days < 1:
            raise ValueError(f"days must be at least 1, got {days}")
        if not DEVICE_ID_RE.fullmatch(device_id):
            raise ValidationFailed(f"device id {device_id!r} cannot be a certificate's name")
        public_key = _checked_request(csr_pem, device_id)
        now = datetime.now(UTC)
        ca_not_after = self.certificate.not_valid_after_utc
        if ca_not_after <= now:
            raise SettingsInvalid(
                f"the device CA certificate ({env_name('device_ca_cert_file')}) expired on "
                f"{ca_not_after.isoformat()}; renew it to sign device certificates"
            )
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + timedelta(days=days), ca_not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(key_encipherment=is_rsa), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        certificate = builder.sign(self._private_key, _hash_for(self._private_key))
        return IssuedCertificate(
            pem=certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            serial_hex=serial_hex(certificate),
            fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
        )

    def build_crl(
        self,
        revoked: Iterable[tuple[str, datetime]],
        *,
        next_update_days: float = DEFAULT_CRL_DAYS,
        now: datetime | None = None,
    ) -> bytes:
        """The CRL (PEM) listing these (serial hex, revoked at) pairs. OpenSSL-based brokers
        refuse every certificate once `next_update` has passed: rewrite it well before."""
        if next_update_days <= 0:
            raise ValueError(f"next_update_days must be positive, got {next_update_days}")
        now = now or datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + timedelta(days=next_update_days))
            # Increases with every CRL written (RFC 5280 requires the number; time gives order).
            .add_extension(x509.CRLNumber(time.time_ns() // 1000), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
        )
        seen: set[int] = set()
        for serial_text, revoked_at in revoked:
            serial = _parse_serial(serial_text)
            if serial in seen:
                continue
            seen.add(serial)
            if revoked_at.tzinfo is None:
                revoked_at = revoked_at.replace(tzinfo=UTC)
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revoked_at)
                .build()
            )
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(self._private_key, _hash_for(self._private_key))
        return crl.public_bytes(serialization.Encoding.PEM)

    def write_crl(
        self,
        path: Path,
        revoked: Iterable[tuple[str, datetime]],
        *,
        next_update_days: float = DEFAULT_CRL_DAYS,
    ) -> None:
        """Replace the CRL file at once (a reader sees the old or the new list, never half);
        mode 0644, since the broker runs as another user and a CRL is public."""
        data = self.build_crl(revoked, next_update_days=next_update_days)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        try:
            extension = self.certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            )
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._private_key.public_key()
            )
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(extension.value)


def _checked_request(csr_pem: bytes, device_id: str) -> DevicePublicKey:
    """The public key of a CSR that passes every check; ValidationFailed otherwise."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise ValidationFailed(
            f"the CSR is {len(csr_pem)} bytes; a CSR is at most {MAX_CSR_BYTES} bytes"
        )
    try:
        request = x509.load_pem_x509_csr(csr_pem)
        signature_valid = request.is_signature_valid
        public_key = request.public_key()
        subject = list(request.subject.rdns)
    except (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature):
        raise ValidationFailed(
            "the body is not a readable PEM certificate signing request "
            "(-----BEGIN CERTIFICATE REQUEST-----); make one with e.g. "
            f"`openssl req -new -key device.key -subj /CN={device_id}`"
        ) from None
    if not signature_valid:
        raise ValidationFailed("the CSR's signature does not match its key; sign it again")
    device_key = _device_key(public_key)
    common_names = [
        attribute for rdn in subject for attribute in rdn if attribute.oid == NameOID.COMMON_NAME
    ]
    if len(common_names) != 1:
        raise ValidationFailed(
            f"the CSR's subject has {len(common_names)} common names (CN); give exactly one, "
            f"the device id: /CN={device_id}"
        )
    if any(len(rdn) > 1 for rdn in subject if NameOID.COMMON_NAME in _oids(rdn)):
        raise ValidationFailed(
            "the CSR's common name (CN) shares a multi-valued name part (`+`) with other "
            f"fields; give it on its own: /CN={device_id}"
        )
    if common_names[0].value != device_id:
        raise ValidationFailed(
            f"the CSR's common name (CN) is {common_names[0].value!r}; it must be exactly the "
            f"device id {device_id!r}"
        )
    return device_key


def _oids(rdn: x509.RelativeDistinguishedName) -> set[x509.ObjectIdentifier]:
    return {attribute.oid for attribute in rdn}


def _device_key(public_key: CertificatePublicKeyTypes) -> DevicePublicKey:
    if isinstance(public_key, rsa.RSAPublicKey):
        if MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS:
            return public_key
        raise ValidationFailed(
            f"the CSR's RSA key has {public_key.key_size} bits; use {MIN_RSA_BITS} to "
            f"{MAX_RSA_BITS} bits (or an EC P-256 key)"
        )
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, _DEVICE_CURVES):
            return public_key
        raise ValidationFailed(
            f"the CSR's EC key is on curve {public_key.curve.name}; use P-256 (secp256r1) or "
            "P-384 (secp384r1)"
        )
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key
    raise ValidationFailed(f"the CSR's key type is not accepted; use {_ACCEPTED_KEYS}")


def _leaf_key_usage(*, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _hash_for(private_key: CAPrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if private_key.curve.key_size >= 521:
            return hashes.SHA512()
        if private_key.curve.key_size >= 384:
            return hashes.SHA384()
    return hashes.SHA256()


def _parse_serial(text: str) -> int:
    try:
        serial = int(text, 16)
    except ValueError:
        raise ValueError(f"not a hexadecimal certificate serial: {text!r}") from None
    if serial <= 0:
        raise ValueError(f"a certificate serial is positive: {text!r}")
    return serial


def _public_der(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingsInvalid(f"{setting}: cannot read {path} ({exc.strerror})") from None


def _load_ca_certificate(data: bytes, setting: str, path: Path) -> x509.Certificate:
    try:
        certificate = x509.load_pem_x509_certificate(data)
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise SettingsInvalid(
            f"{setting} ({path}) is not a CA certificate (no basicConstraints CA:TRUE)"
        ) from None
    except ValueError:
        raise SettingsInvalid(f"{setting} ({path}) is not a PEM certificate") from None
    if not constraints.value.ca:
        raise SettingsInvalid(
            f"{setting} ({path}) is not a CA certificate (basicConstraints CA:FALSE)"
        )
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        # OpenSSL refuses a CRL from an issuer whose keyUsage lacks cRLSign.
        if not (usage.key_cert_sign and usage.crl_sign):
            raise SettingsInvalid(
                f"{setting} ({path}): the CA's keyUsage must include keyCertSign and cRLSign"
            )
    if certificate.not_valid_after_utc <= datetime.now(UTC):
        raise SettingsInvalid(
            f"{setting} ({path}) expired on {certificate.not_valid_after_utc.isoformat()}"
        )
    return certificate


def _load_ca_key(data: bytes, setting: str, path: Path) -> CAPrivateKey:
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SettingsInvalid(
            f"{setting} ({path}) is encrypted; give the key unencrypted, readable by iotmeter only"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SettingsInvalid(f"{setting} ({path}) is not a PEM private key") from None
    if isinstance(private_key, rsa.RSAPrivateKey):
        if private_key.key_size < MIN_RSA_BITS:
            raise SettingsInvalid(
                f"{setting} ({path}): the CA's RSA key has {private_key.key_size} bits; "
                f"use at least {MIN_RSA_BITS}"
            )
        return private_key
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, _CA_CURVES
    ):
        return private_key
    raise SettingsInvalid(
        f"{setting} ({path}): the CA key must be RSA (2048 bits or more) or EC P-256/P-384/P-521"
    )
