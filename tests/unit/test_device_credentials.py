"""Device passwords derived from the credential secret, and the secret file itself."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from iotmeter.config import Settings
from iotmeter.devicelink import acl
from iotmeter.devicelink.credentials import (
    derive_password,
    load_or_create_secret,
    new_credential,
    password_matches,
    service_password,
)
from iotmeter.errors import SettingsInvalid

SECRET = b"x" * 32


def test_a_password_depends_on_secret_device_and_nonce() -> None:
    base = derive_password(SECRET, "meter-1", "n1")
    assert base == derive_password(SECRET, "meter-1", "n1")
    assert base != derive_password(SECRET, "meter-2", "n1")
    assert base != derive_password(SECRET, "meter-1", "n2")
    assert base != derive_password(b"y" * 32, "meter-1", "n1")
    # No concatenation ambiguity: ("a", "b:c") and ("a:b", "c") are different inputs.
    assert derive_password(SECRET, "a", "bc") != derive_password(SECRET, "ab", "c")
    assert len(base) == 43


def test_a_new_credential_keeps_only_a_hash_that_matches_its_password() -> None:
    credential = new_credential(SECRET, "meter-1")
    assert credential.password not in credential.password_hash
    assert password_matches(credential.password, credential.password_hash)
    assert not password_matches(credential.password + "x", credential.password_hash)
    assert credential.password == derive_password(SECRET, "meter-1", credential.nonce)
    assert new_credential(SECRET, "meter-1").password != credential.password


def test_the_service_password_is_no_device_password() -> None:
    assert service_password(SECRET) != derive_password(SECRET, "iotmeter", "n1")


def test_the_secret_file_is_made_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "secret"
    first = load_or_create_secret(path)
    assert len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temporary left


def test_processes_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_or_create_secret(path)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1


@pytest.mark.parametrize("content", [b"", b"\n", b"short\n"])
def test_a_damaged_secret_file_is_refused_not_used(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(SettingsInvalid, match="damaged"):
        load_or_create_secret(path)


def test_a_short_configured_secret_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValidationError, match="IOTMETER_DEVICE_CREDENTIAL_SECRET"):
        Settings(device_credential_secret="too short")


@pytest.mark.parametrize(
    ("device", "topic", "allowed"),
    [
        ("a", "iot/a/telemetry", True),
        ("a", "iot/a/status", True),
        ("a", "iot/a/config/reported", True),
        ("a", "iot/a/config", False),
        ("a", "iot/b/telemetry", False),
        ("a", "iot/+/telemetry", False),
        ("a", "iot/#", False),
        ("a", "iot/a/telemetry/", False),
        ("a", "iot/a/Telemetry", False),
    ],
)
def test_what_a_device_may_publish(device: str, topic: str, allowed: bool) -> None:
    assert acl.device_may_publish(device, topic) is allowed


@pytest.mark.parametrize(
    ("username", "client_id", "valid"),
    [
        ("meter-1", "meter-1", True),
        ("meter-1", "meter-2", False),
        ("meter-1", None, False),
        (None, None, False),
        ("a+b", "a+b", False),
        ("a/b", "a/b", False),
        ("..", "..", False),
        ("x" * 65, "x" * 65, False),
    ],
)
def test_a_device_connects_with_its_id_as_username_and_client_id(
    username: str | None, client_id: str | None, valid: bool
) -> None:
    assert acl.valid_device_username(username, client_id) is valid
