"""Limits on every API input, on PostgreSQL and SQLite: each case answered 500 (or 503, or was
accepted whole) before; each must now be a 4xx that says what to fix, with nothing stored."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import orjson
import pytest

from iotmeter.config import Settings
from iotmeter.db.base import utcnow
from iotmeter.db.engine import Database, build_engine
from iotmeter.readings import Rejection, RejectReason
from iotmeter.repositories.dead_letters import DeadLetterRepository
from iotmeter.services.housekeeping import expire_dead_letters

DEVICES = "/api/v1/devices"


@pytest.fixture
async def device(api: httpx.AsyncClient) -> str:
    response = await api.post(DEVICES, json={"id": "dev-1", "name": "Dev", "type": "humidity"})
    assert response.status_code == 201, response.text
    return "dev-1"


def error_of(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    return body["error"]


async def device_count(api: httpx.AsyncClient) -> int:
    total: int = (await api.get(DEVICES)).json()["total"]
    return total


# --- request bodies ---------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_413_by_its_declared_length(
    api: httpx.AsyncClient,
) -> None:
    body = orjson.dumps(
        {"id": "big", "name": "Big", "type": "humidity", "metadata": {"x": "y" * 2_000_000}}
    )
    response = await api.post(DEVICES, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "IOTMETER_HTTP_MAX_BODY_BYTES" in error_of(response)["message"]
    assert await device_count(api) == 0


async def test_a_streamed_body_is_cut_off_once_it_passes_the_limit(
    api: httpx.AsyncClient,
) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"id": "big", "name": "Big", "type": "humidity", "metadata": {"x": "'
        for _ in range(64):  # 4 MiB in all, without a Content-Length
            sent += 1
            yield b"y" * 65536
        yield b'"}}'

    response = await api.post(
        DEVICES, content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert sent < 64, "the whole body was read before it was refused"
    assert await device_count(api) == 0


# --- NUL characters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"{DEVICES}?q=%00",
        f"{DEVICES}?location=%00",
        "/api/v1/telemetry/latest?device_ids=%00",
        "/api/v1/alerts?device_id=a%00b",
        "/api/v1/dead-letters?device_id=%00",
        f"{DEVICES}/dev%001",
    ],
)
async def test_nul_in_the_url_is_422_and_never_an_outage(api: httpx.AsyncClient, url: str) -> None:
    response = await api.get(url)
    assert response.status_code == 422, response.text
    assert "NUL" in error_of(response)["message"]
    assert "SELECT" not in response.text


async def test_an_invalid_device_id_in_latest_is_422_without_sql_in_the_answer(
    api: httpx.AsyncClient,
) -> None:
    response = await api.get("/api/v1/telemetry/latest", params={"device_ids": "ok,bad id"})
    assert response.status_code == 400, response.text
    assert "'bad id' is not a device id" in error_of(response)["message"]
    assert "SELECT" not in response.text
    assert "telemetry_latest" not in response.text


@pytest.mark.parametrize(
    "body",
    [
        {"id": "n1", "name": "a\u0000b", "type": "humidity"},
        {"id": "n1", "name": "N", "type": "humidity", "location": "\u0000"},
        {"id": "n1", "name": "N", "type": "humidity", "metadata": {"k": "v\u0000"}},
        {"id": "n1", "name": "N", "type": "humidity", "metadata": {"k\u0000": 1}},
        {"id": "n1", "name": "N", "type": "humidity", "metadata": {"k": [{"d": "\u0000"}]}},
    ],
)
async def test_nul_in_a_body_is_422_and_nothing_is_stored(
    api: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await api.post(DEVICES, json=body)
    assert response.status_code == 422, response.text
    assert "NUL" in error_of(response)["message"]
    assert await device_count(api) == 0


async def test_nul_in_a_config_value_is_422(api: httpx.AsyncClient, device: str) -> None:
    one = await api.put(f"{DEVICES}/{device}/configs/k", json={"value": {"a": "\u0000"}})
    every = await api.put(f"{DEVICES}/{device}/configs", json={"k": "x\u0000"})
    assert one.status_code == 422, one.text
    assert every.status_code == 422, every.text
    assert (await api.get(f"{DEVICES}/{device}/configs")).json()["items"] == []


# --- numbers and times out of range -----------------------------------------------------------


@pytest.mark.parametrize("path", [DEVICES, "/api/v1/alerts", "/api/v1/dead-letters"])
@pytest.mark.parametrize("offset", ["99999999999999999999", "10000000000000000", "2147483648"])
async def test_an_offset_beyond_what_a_database_binds_is_422(
    api: httpx.AsyncClient, path: str, offset: str
) -> None:
    response = await api.get(path, params={"offset": offset})
    assert response.status_code == 422, response.text
    assert "offset" in error_of(response)["message"]
    largest = await api.get(path, params={"offset": str(2**31 - 1)})
    assert largest.status_code == 200, largest.text
    assert largest.json()["items"] == []


@pytest.mark.parametrize("alert_id", [str(2**63), "99999999999999999999999"])
async def test_an_alert_id_beyond_int64_is_422(api: httpx.AsyncClient, alert_id: str) -> None:
    for response in (
        await api.get(f"/api/v1/alerts/{alert_id}"),
        await api.post(f"/api/v1/alerts/{alert_id}/resolve"),
        await api.get(f"/api/v1/dead-letters/{alert_id}"),
    ):
        assert response.status_code == 422, response.text
    assert (await api.get(f"/api/v1/alerts/{2**63 - 1}")).status_code == 404


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("telemetry", {"start": "-99999999999d"}),
        ("telemetry", {"start": "0001-01-01T00:00:00Z"}),
        ("telemetry", {"stop": "9999-12-31T23:59:59+00:00"}),
        ("telemetry", {"every": "9223372036854775808us"}),
        ("telemetry", {"start": "-1h", "every": "99999999999999999w"}),
        ("raw", {"start": "0001-01-01T00:00:00Z"}),
        ("raw", {"start": "0001-01-01T00:00:00+01:00"}),
        ("raw", {"after": "\u00b2:x"}),
        ("raw", {"after": "99999999999999999999999:x"}),
    ],
)
async def test_times_outside_what_stores_hold_are_400_naming_the_range(
    api: httpx.AsyncClient, device: str, path: str, params: dict[str, str]
) -> None:
    response = await api.get(f"{DEVICES}/{device}/{path}", params=params)
    assert response.status_code == 400, response.text
    message = error_of(response)["message"]
    assert "1970" in message or "cursor" in message or "range" in message, message


async def test_a_replay_from_year_one_is_400(api: httpx.AsyncClient, device: str) -> None:
    response = await api.post(f"{DEVICES}/{device}/replay", json={"start": "0001-01-01T00:00:00Z"})
    assert response.status_code == 400, response.text
    assert "1970-01-01" in error_of(response)["message"]


async def test_alert_time_filters_take_relative_times_and_refuse_numbers(
    api: httpx.AsyncClient, device: str
) -> None:
    created = await api.post(
        "/api/v1/alerts", json={"device_id": device, "severity": "info", "message": "m"}
    )
    assert created.status_code == 201, created.text
    recent = await api.get("/api/v1/alerts", params={"since": "-1h"})
    assert recent.json()["total"] == 1
    assert (await api.get("/api/v1/alerts", params={"until": "-1h"})).json()["total"] == 0
    response = await api.get("/api/v1/alerts", params={"until": "0.5"})
    assert response.status_code == 400
    assert "RFC 3339" in error_of(response)["message"]


# --- strict types and shapes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [{"threshold": False}, {"value": True}, {"value": "1.5"}, {"severity": 1}],
)
async def test_alert_bodies_take_no_lax_types(
    api: httpx.AsyncClient, device: str, change: dict[str, Any]
) -> None:
    body = {"device_id": device, "severity": "info", "message": "m", **change}
    response = await api.post("/api/v1/alerts", json=body)
    assert response.status_code == 422, response.text
    assert (await api.get("/api/v1/alerts")).json()["total"] == 0


async def test_an_integer_is_still_a_number(api: httpx.AsyncClient, device: str) -> None:
    body = {"device_id": device, "severity": "info", "message": "m", "value": 3, "threshold": 2}
    response = await api.post("/api/v1/alerts", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["value"] == 3.0


async def test_patch_with_an_empty_object_changes_nothing(
    api: httpx.AsyncClient, device: str
) -> None:
    before = (await api.get(f"{DEVICES}/{device}")).json()
    response = await api.patch(f"{DEVICES}/{device}", json={})
    assert response.status_code == 200, response.text
    after = response.json()
    assert {k: v for k, v in after.items() if k != "updated_at"} == {
        k: v for k, v in before.items() if k != "updated_at"
    }


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("depth", [17, 500])
async def test_deep_metadata_is_422_and_nothing_is_committed(
    api: httpx.AsyncClient, depth: int
) -> None:
    response = await api.post(
        DEVICES, json={"id": "deep", "name": "D", "type": "humidity", "metadata": nested(depth)}
    )
    assert response.status_code == 422, response.text
    assert "nested deeper" in error_of(response)["message"]
    assert (await api.get(f"{DEVICES}/deep")).status_code == 404
    assert (await api.get(DEVICES)).status_code == 200


async def test_metadata_a_little_less_deep_is_kept(api: httpx.AsyncClient) -> None:
    metadata = nested(14)
    response = await api.post(
        DEVICES, json={"id": "deep", "name": "D", "type": "humidity", "metadata": metadata}
    )
    assert response.status_code == 201, response.text
    assert (await api.get(f"{DEVICES}/deep")).json()["metadata"] == metadata


async def test_deep_metadata_in_a_patch_changes_nothing(
    api: httpx.AsyncClient, device: str
) -> None:
    response = await api.patch(f"{DEVICES}/{device}", json={"metadata": nested(100)})
    assert response.status_code == 422
    assert (await api.get(f"{DEVICES}/{device}")).json()["metadata"] == {}


async def test_metadata_over_64_kib_is_422(api: httpx.AsyncClient) -> None:
    body = {"id": "fat", "name": "F", "type": "humidity", "metadata": {"x": "y" * 70_000}}
    response = await api.post(DEVICES, json=body)
    assert response.status_code == 422, response.text
    assert "at most 65536" in error_of(response)["message"]


# --- configuration ------------------------------------------------------------------------------


async def test_a_whole_configuration_of_the_most_keys_is_stored_and_one_more_is_refused(
    api: httpx.AsyncClient, device: str
) -> None:
    values = {f"key{index:04d}": index for index in range(1000)}
    response = await api.put(f"{DEVICES}/{device}/configs", json=values)
    assert response.status_code == 200, response.text
    assert len(response.json()) == 1000

    over = await api.put(f"{DEVICES}/{device}/configs", json={**values, "one-more": 1})
    assert over.status_code == 400
    assert "at most 1000" in error_of(over)["message"]

    new_key = await api.put(f"{DEVICES}/{device}/configs/one-more", json={"value": 1})
    assert new_key.status_code == 409
    assert "1000 config keys" in error_of(new_key)["message"]
    existing = await api.put(f"{DEVICES}/{device}/configs/key0001", json={"value": "changed"})
    assert existing.status_code == 200
    assert len((await api.get(f"{DEVICES}/{device}/configs")).json()["items"]) == 1000


async def test_a_config_value_over_64_kib_is_422(api: httpx.AsyncClient, device: str) -> None:
    big = "v" * 70_000
    one = await api.put(f"{DEVICES}/{device}/configs/k", json={"value": big})
    every = await api.put(f"{DEVICES}/{device}/configs", json={"k": big})
    assert one.status_code == 422
    assert every.status_code == 422
    assert "at most 65536" in error_of(one)["message"]
    assert (await api.get(f"{DEVICES}/{device}/configs")).json()["items"] == []


async def test_ingestion_is_not_stalled_by_a_large_configuration_write(
    api: httpx.AsyncClient, device: str
) -> None:
    """One statement for the whole configuration: a write of 1,000 keys and reads of the
    registry at the same time all finish (on SQLite, one writer at a time holds the lock)."""
    values = {f"key{index:04d}": {"n": index} for index in range(1000)}
    results = await asyncio.wait_for(
        asyncio.gather(
            api.put(f"{DEVICES}/{device}/configs", json=values),
            *(api.get(f"{DEVICES}/{device}") for _ in range(5)),
        ),
        timeout=60,
    )
    assert [response.status_code for response in results] == [200] * 6


# --- dead letters -------------------------------------------------------------------------------


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    database = Database(build_engine(settings.database_url))
    yield database
    await database.close()


async def add_letters(database: Database, *rejections: Rejection) -> None:
    async with database.transaction() as session:
        await DeadLetterRepository(session).add_many(rejections)


def rejection(payload: bytes, **fields: Any) -> Rejection:
    return Rejection(
        reason=fields.pop("reason", RejectReason.NOT_JSON),
        detail="the payload is not JSON",
        topic="iot/dl-1/telemetry",
        payload=payload,
        device_id="dl-1",
        **fields,
    )


async def test_dead_letters_are_listed_with_a_preview_and_fetched_byte_for_byte(
    api: httpx.AsyncClient, database: Database
) -> None:
    head = bytes(range(256)) * 256  # 64 KiB, not UTF-8
    text = ("é" * 200).encode()  # 400 bytes: the preview cuts inside a character
    await add_letters(
        database,
        rejection(head, reason=RejectReason.TOO_LARGE, payload_size=10_000_000),
        rejection(text),
    )
    listing = (await api.get("/api/v1/dead-letters")).json()
    assert listing["total"] == 2
    by_size = {item["payload_stored"]: item for item in listing["items"]}
    big, small = by_size[65536], by_size[400]
    assert big["payload_size"] == 10_000_000
    assert big["payload_truncated"] is True
    assert big["payload_encoding"] == "base64"
    assert base64.b64decode(big["payload_preview"]) == head[:256]
    assert small["payload_encoding"] == "utf-8"
    assert small["payload_truncated"] is False
    assert small["payload_preview"] == "é" * 128
    assert "payload" not in big

    one = await api.get(f"/api/v1/dead-letters/{big['id']}")
    assert one.json() == big
    raw = await api.get(big["payload_url"])
    assert raw.status_code == 200
    assert raw.content == head
    assert raw.headers["content-type"] == "application/octet-stream"
    assert (await api.get("/api/v1/dead-letters/999999/payload")).status_code == 404


async def test_a_list_of_big_dead_letters_stays_small(
    api: httpx.AsyncClient, database: Database
) -> None:
    await add_letters(
        database,
        *(
            rejection(bytes([index]) * 65536, reason=RejectReason.TOO_LARGE, payload_size=10**7)
            for index in range(20)
        ),
    )
    response = await api.get("/api/v1/dead-letters", params={"limit": 50})
    assert response.json()["total"] == 20
    assert len(response.content) < 65_536  # 20 stored heads of 64 KiB each were 1.3 MB


async def test_dead_letters_past_their_retention_or_cap_are_deleted(
    api: httpx.AsyncClient, database: Database, settings: Settings
) -> None:
    old_us = int((utcnow() - timedelta(days=40)).timestamp() * 1e6)
    recent = [rejection(f"recent {index}".encode()) for index in range(150)]
    await add_letters(database, rejection(b"old", received_at_us=old_us), *recent)

    class State:
        pass

    state: Any = State()
    state.settings = settings.model_copy(update={"dead_letter_max_rows": 100})
    state.database = database
    assert await expire_dead_letters(state) == 51
    listing = (await api.get("/api/v1/dead-letters", params={"limit": 500})).json()
    assert listing["total"] == 100
    previews = {item["payload_preview"] for item in listing["items"]}
    assert "old" not in previews
    assert previews == {f"recent {index}" for index in range(50, 150)}
