"""Device registry and per-device configuration."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response, status

from iotmeter.api.deps import SessionDep, StateDep
from iotmeter.api.schemas import (
    MAX_CONFIG_KEYS,
    ConfigJson,
    ConfigKey,
    ConfigRead,
    ConfigState,
    ConfigValue,
    DeviceCreate,
    DeviceRead,
    DeviceStatus,
    DeviceType,
    DeviceUpdate,
    ErrorResponse,
    Offset,
    Page,
)
from iotmeter.errors import ValidationFailed
from iotmeter.repositories.devices import DeviceReader
from iotmeter.services import device_channel as channel
from iotmeter.services import devices as service

MAX_PAGE = 500

router = APIRouter(prefix="/devices", tags=["devices"])
DeviceIdPath = Annotated[str, Path(description="The device id.", max_length=64)]
KeyPath = Annotated[ConfigKey, Path(description="The configuration key.")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"Page size (at most {MAX_PAGE}).")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={409: {"model": ErrorResponse}},
    summary="Register a device",
)
async def create_device(
    body: DeviceCreate, session: SessionDep, state: StateDep, response: Response
) -> DeviceRead:
    """Register a device; 409 if the id is taken (`conflict`) or the registry holds
    `IOTMETER_MAX_DEVICES` devices (`limit_reached`)."""
    device = await service.create_device(
        session,
        body.model_dump(),
        max_devices=state.settings.max_devices,
        reserved=state.reserved_usernames,
    )
    response.headers["Location"] = f"/api/v1/devices/{device.id}"
    return DeviceRead.model_validate(device)


@router.get("", summary="List devices")
async def list_devices(
    state: StateDep,
    type: Annotated[DeviceType | None, Query(description="Only this type.")] = None,
    status: Annotated[DeviceStatus | None, Query(description="Only this status.")] = None,
    location: Annotated[str | None, Query(description="Only this exact location.")] = None,
    q: Annotated[
        str | None, Query(max_length=64, description="Case-insensitive text in id or name.")
    ] = None,
    connected: Annotated[
        bool | None, Query(description="Only devices connected (true) or not (false).")
    ] = None,
    config_in_sync: Annotated[
        bool | None,
        Query(
            description="Only devices that reported their desired configuration (true), "
            "or that did not yet (false)."
        ),
    ] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[DeviceRead]:
    """Devices ordered by id, filtered and paginated; `total` counts every match."""
    async with state.database.reader() as connection:
        rows, total = await DeviceReader(connection).list(
            type=type,
            status=status,
            location=location,
            search=q,
            connected=connected,
            config_in_sync=config_in_sync,
            limit=limit,
            offset=offset,
        )
    # One validation for the page: a call per item costs more than the query.
    return Page[DeviceRead].model_validate(
        {"items": rows, "total": total, "limit": limit, "offset": offset}
    )


@router.get("/{device_id}", responses=NOT_FOUND, summary="Get a device")
async def get_device(device_id: DeviceIdPath, state: StateDep) -> DeviceRead:
    async with state.database.reader() as connection:
        row = await service.read_device(connection, device_id)
    return DeviceRead.model_validate(row)


@router.patch("/{device_id}", responses=NOT_FOUND, summary="Update a device")
async def update_device(
    device_id: DeviceIdPath, body: DeviceUpdate, session: SessionDep
) -> DeviceRead:
    """Change only the fields given in the body."""
    device = await service.update_device(session, device_id, body.model_dump(exclude_unset=True))
    return DeviceRead.model_validate(device)


@router.delete(
    "/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NOT_FOUND,
    summary="Delete a device with its configs and alerts",
)
async def delete_device(device_id: DeviceIdPath, session: SessionDep) -> None:
    """Deletes the device, its configuration keys and its alerts; telemetry and the raw
    archive are kept (they are history, and a device that publishes again re-registers)."""
    await service.delete_device(session, device_id)


@router.get(
    "/{device_id}/configs",
    responses=NOT_FOUND,
    summary="A device's configuration: desired, reported, in sync",
)
async def list_configs(device_id: DeviceIdPath, session: SessionDep) -> ConfigState:
    """The desired keys (published retained to `iot/{id}/config` with their version), what
    the device reported on `iot/{id}/config/reported`, and whether the versions agree."""
    return ConfigState.model_validate(await channel.config_state(session, device_id))


@router.put(
    "/{device_id}/configs",
    responses=NOT_FOUND,
    summary="Replace all of a device's configs",
)
async def replace_configs(
    device_id: DeviceIdPath,
    session: SessionDep,
    values: Annotated[
        dict[ConfigKey, ConfigJson],
        Body(
            description="The complete configuration: key -> any JSON value "
            f"(at most {MAX_CONFIG_KEYS} keys)."
        ),
    ],
) -> list[ConfigRead]:
    """Keys not in the body are deleted."""
    if len(values) > MAX_CONFIG_KEYS:
        raise ValidationFailed(
            f"{len(values)} config keys given, at most {MAX_CONFIG_KEYS} per device"
        )
    rows = await service.replace_configs(session, device_id, values)
    return [ConfigRead.model_validate(row) for row in rows]


@router.get("/{device_id}/configs/{key}", responses=NOT_FOUND, summary="Get one config key")
async def get_config(device_id: DeviceIdPath, key: KeyPath, session: SessionDep) -> ConfigRead:
    return ConfigRead.model_validate(await service.get_config(session, device_id, key))


@router.put(
    "/{device_id}/configs/{key}",
    responses={**NOT_FOUND, 409: {"model": ErrorResponse}},
    summary="Set one config key",
)
async def put_config(
    device_id: DeviceIdPath, key: KeyPath, body: ConfigValue, session: SessionDep
) -> ConfigRead:
    config = await service.put_config(session, device_id, key, body.value, max_keys=MAX_CONFIG_KEYS)
    return ConfigRead.model_validate(config)


@router.delete(
    "/{device_id}/configs/{key}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NOT_FOUND,
    summary="Delete one config key",
)
async def delete_config(device_id: DeviceIdPath, key: KeyPath, session: SessionDep) -> None:
    await service.delete_config(session, device_id, key)
