"""API keys (admin only): create (the key is shown once), list, revoke."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Response, status
from pydantic import BaseModel, Field, StringConstraints

from iotmeter.api.deps import SessionDep
from iotmeter.api.schemas import NAME_PATTERN, ErrorResponse, InputModel
from iotmeter.api.timerange import from_epoch_us, parse_instant_us
from iotmeter.db.base import utcnow
from iotmeter.db.models import ApiKey
from iotmeter.repositories.api_keys import ApiKeyRepository
from iotmeter.security.keys import PREFIX, KeyStatus, key_status
from iotmeter.services import keys as service

router = APIRouter(prefix="/keys", tags=["keys"])
KeyIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", description="The key's id.")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}


class KeyCreate(InputModel):
    name: Annotated[
        str,
        StringConstraints(
            min_length=1, max_length=100, strip_whitespace=True, pattern=NAME_PATTERN
        ),
    ]
    role: Literal["admin", "operator", "viewer"]
    expires: str | None = Field(
        None,
        description="When the key stops working: RFC 3339 with a zone or relative like "
        "`+90d`; unset for never.",
        examples=["2027-01-01T00:00:00Z"],
    )


class KeyRead(BaseModel):
    key_id: str
    name: str
    role: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(
        description="When a request last authenticated with it (written every 30 s or so)."
    )
    status: KeyStatus


class KeyCreated(KeyRead):
    key: str = Field(
        description=f"The key ({PREFIX}…): shown this once, stored only as a hash. Send it "
        "as `Authorization: Bearer <key>` or `X-API-Key: <key>`."
    )


def _read(row: ApiKey) -> dict[str, Any]:
    return {
        "key_id": row.key_id,
        "name": row.name,
        "role": row.role,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "last_used_at": row.last_used_at,
        "status": key_status(row.expires_at, row.revoked_at, utcnow()),
    }


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create an API key")
async def create_key(body: KeyCreate, session: SessionDep, response: Response) -> KeyCreated:
    """The answer holds the key itself, the only time it is shown."""
    expires_at = None
    if body.expires is not None:
        expires_at = from_epoch_us(
            parse_instant_us(body.expires, "expires", time.time_ns() // 1000)
        )
    row, text = await service.create_key(
        session, name=body.name, role=body.role, expires_at=expires_at
    )
    response.headers["Cache-Control"] = "no-store"
    return KeyCreated(**_read(row), key=text)


@router.get("", summary="List API keys (never the keys themselves)")
async def list_keys(session: SessionDep) -> list[KeyRead]:
    return [KeyRead(**_read(row)) for row in await ApiKeyRepository(session).list()]


@router.delete(
    "/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NOT_FOUND,
    summary="Revoke an API key (from the next request on)",
)
async def revoke_key(key_id: KeyIdPath, session: SessionDep) -> None:
    await service.revoke_key(session, key_id)
