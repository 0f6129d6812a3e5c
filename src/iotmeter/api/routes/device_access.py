"""Device MQTT credentials and certificates."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, status

from iotmeter.api.deps import SessionDep, StateDep
from iotmeter.api.schemas import (
    CertificateIssued,
    CertificateRead,
    CertificateRequest,
    CredentialRead,
    ErrorResponse,
)
from iotmeter.config import env_name
from iotmeter.errors import Conflict, NotFound
from iotmeter.repositories.device_channel import ChannelRepository
from iotmeter.services import device_channel as service
from iotmeter.services.devices import get_device

router = APIRouter(prefix="/devices", tags=["device access"])
DeviceIdPath = Annotated[str, Path(description="The device id.", max_length=64)]
SerialPath = Annotated[
    str, Path(description="Certificate serial (hexadecimal).", pattern=r"^[0-9A-Fa-f]{1,40}$")
]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}


@router.post(
    "/{device_id}/credentials",
    status_code=status.HTTP_201_CREATED,
    responses=NOT_FOUND,
    summary="Create or rotate a device's MQTT password",
)
async def create_credentials(
    device_id: DeviceIdPath, session: SessionDep, state: StateDep, response: Response
) -> CredentialRead:
    """A new password, shown in this answer only (the registry keeps a hash). Any older
    password of the device stops working at its next connect. The device connects with
    username and client id both equal to its id."""
    credential = await service.create_credential(
        session, device_id, state.device_secret(), state.reserved_usernames
    )
    response.headers["Cache-Control"] = "no-store"
    stored = await ChannelRepository(session).credential(device_id)
    assert stored is not None
    return CredentialRead(
        device_id=device_id,
        username=device_id,
        client_id=device_id,
        created_at=stored.created_at,
        password=credential.password,
        on_broker=False if state.broker_accounts is not None else None,
    )


@router.get("/{device_id}/credentials", responses=NOT_FOUND, summary="A device's MQTT credential")
async def get_credentials(
    device_id: DeviceIdPath, session: SessionDep, state: StateDep
) -> CredentialRead:
    """When it was made and whether the managed broker has it; never the password."""
    await get_device(session, device_id)
    stored = await ChannelRepository(session).credential(device_id)
    if stored is None:
        raise NotFound(
            f"device {device_id!r} has no MQTT credential; create one with "
            f"POST /api/v1/devices/{device_id}/credentials"
        )
    return CredentialRead(
        device_id=device_id,
        username=device_id,
        client_id=device_id,
        created_at=stored.created_at,
        on_broker=(
            stored.broker_nonce == stored.nonce if state.broker_accounts is not None else None
        ),
    )


@router.delete(
    "/{device_id}/credentials",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NOT_FOUND,
    summary="Revoke a device's MQTT password",
)
async def delete_credentials(device_id: DeviceIdPath, session: SessionDep) -> None:
    """The device can no longer connect with a password (from its next connect)."""
    await service.revoke_credential(session, device_id)


@router.post(
    "/{device_id}/certificate",
    status_code=status.HTTP_201_CREATED,
    responses={**NOT_FOUND, 400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
    summary="Sign a device certificate",
)
async def create_certificate(
    device_id: DeviceIdPath, body: CertificateRequest, session: SessionDep, state: StateDep
) -> CertificateIssued:
    """Sign a PEM certificate request whose subject CN is the device id, with the device CA
    iotmeter is configured with; the device then connects over TLS with it (its CN is its
    username)."""
    ca = state.device_ca
    if ca is None:
        raise Conflict(
            "no device CA is configured: set "
            f"{env_name('device_ca_cert_file')} and {env_name('device_ca_key_file')}"
        )
    row, pem = await service.issue_certificate(
        session,
        device_id,
        ca,
        body.csr.encode(),
        state.settings.device_certificate_days,
        secret=state.device_secret(),
        reserved=state.reserved_usernames,
    )
    return CertificateIssued(
        serial=row.serial,
        device_id=row.device_id,
        fingerprint_sha256=row.fingerprint_sha256,
        issued_at=row.issued_at,
        expires_at=row.expires_at,
        revoked_at=None,
        certificate=pem,
        ca_certificate=ca.certificate_pem.decode(),
    )


@router.get("/{device_id}/certificates", responses=NOT_FOUND, summary="A device's certificates")
async def list_certificates(device_id: DeviceIdPath, session: SessionDep) -> list[CertificateRead]:
    return [
        CertificateRead.model_validate(row)
        for row in await service.list_certificates(session, device_id)
    ]


@router.delete(
    "/{device_id}/certificates/{serial}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NOT_FOUND,
    summary="Revoke a device certificate",
)
async def revoke_certificate(
    device_id: DeviceIdPath, serial: SerialPath, session: SessionDep
) -> None:
    """Refused from the device's next connect (the embedded broker asks the registry; for
    Mosquitto the revocation list file is written again)."""
    await service.revoke_certificate(session, device_id, serial)
