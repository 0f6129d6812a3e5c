"""The device registry API, on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import text

from iotmeter.db.engine import build_engine

DEVICES = "/api/v1/devices"


async def create_device(api: httpx.AsyncClient, device_id: str, **fields: Any) -> dict[str, Any]:
    body = {"id": device_id, "name": f"Device {device_id}", "type": "temperature", **fields}
    response = await api.post(DEVICES, json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The shared error body; fails if the answer does not have exactly that shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    error: dict[str, Any] = body["error"]
    return error


def locations(error: dict[str, Any]) -> list[str]:
    return [item["location"] for item in error["details"]]


async def listed_ids(api: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await api.get(DEVICES, params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


# --- create ---------------------------------------------------------------------------------


async def test_create_returns_the_device_with_defaults_and_location(
    api: httpx.AsyncClient,
) -> None:
    before = datetime.now(UTC)
    response = await api.post(DEVICES, json={"id": "t-1", "name": "Kitchen", "type": "temperature"})

    assert response.status_code == 201, response.text
    assert response.headers["Location"] == "/api/v1/devices/t-1"
    device = response.json()
    assert device["id"] == "t-1"
    assert device["name"] == "Kitchen"
    assert device["type"] == "temperature"
    assert device["status"] == "active"
    assert device["location"] is None
    assert device["metadata"] == {}
    assert device["last_seen_at"] is None
    created_at = datetime.fromisoformat(device["created_at"])
    assert created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= created_at <= datetime.now(UTC) + timedelta(seconds=1)
    assert device["updated_at"] == device["created_at"]

    fetched = await api.get("/api/v1/devices/t-1")
    assert fetched.status_code == 200
    assert fetched.json() == device


async def test_create_keeps_every_given_field(api: httpx.AsyncClient) -> None:
    device = await create_device(
        api,
        "pm.2_B",
        name="  Main meter  ",
        type="power_meter",
        location="Basement",
        metadata={"vendor": "acme", "phases": 3, "tags": ["a", "b"]},
        status="maintenance",
    )

    fetched = (await api.get("/api/v1/devices/pm.2_B")).json()
    assert fetched == device
    assert fetched["name"] == "Main meter"
    assert fetched["type"] == "power_meter"
    assert fetched["location"] == "Basement"
    assert fetched["metadata"] == {"vendor": "acme", "phases": 3, "tags": ["a", "b"]}
    assert fetched["status"] == "maintenance"


async def test_create_accepts_an_id_of_64_characters(api: httpx.AsyncClient) -> None:
    device_id = "d" * 64
    await create_device(api, device_id)
    assert (await api.get(f"{DEVICES}/{device_id}")).status_code == 200


async def test_duplicate_id_is_a_conflict_and_keeps_the_first(api: httpx.AsyncClient) -> None:
    await create_device(api, "dup", name="First")

    response = await api.post(DEVICES, json={"id": "dup", "name": "Second", "type": "humidity"})

    assert response.status_code == 409
    error = error_of(response)
    assert error["code"] == "conflict"
    assert "'dup' already exists" in error["message"]
    assert (await api.get(f"{DEVICES}/dup")).json()["name"] == "First"


async def test_concurrent_creates_of_one_id_give_one_device(api: httpx.AsyncClient) -> None:
    bodies = [{"id": "race", "name": f"Client {index}", "type": "humidity"} for index in range(5)]

    responses = await asyncio.gather(*(api.post(DEVICES, json=body) for body in bodies))

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201, 409, 409, 409, 409]
    winner = next(response.json() for response in responses if response.status_code == 201)
    assert (await api.get(f"{DEVICES}/race")).json() == winner


async def test_invalid_id_is_rejected_naming_the_field(api: httpx.AsyncClient) -> None:
    for device_id in ("bad id!", "x" * 65, "", "a/b", "tëst", "abc\n"):
        body = {"id": device_id, "name": "X", "type": "temperature"}
        response = await api.post(DEVICES, json=body)

        assert response.status_code == 422, device_id
        error = error_of(response)
        assert error["code"] == "validation_failed"
        assert locations(error) == ["body.id"], device_id
        assert "body.id" in error["message"]
    assert (await api.get(DEVICES)).json()["total"] == 0


async def test_invalid_type_is_rejected(api: httpx.AsyncClient) -> None:
    for device_type in ("Temperature", "has space", "", "1sensor", "t" * 33):
        response = await api.post(DEVICES, json={"id": "t-1", "name": "X", "type": device_type})

        assert response.status_code == 422, device_type
        error = error_of(response)
        assert locations(error) == ["body.type"], device_type
        assert "body.type" in error["message"]
    assert (await api.get(DEVICES)).json()["total"] == 0


async def test_unknown_field_is_rejected(api: httpx.AsyncClient) -> None:
    response = await api.post(
        DEVICES, json={"id": "t-1", "name": "X", "type": "temperature", "colour": "red"}
    )

    assert response.status_code == 422
    error = error_of(response)
    assert locations(error) == ["body.colour"]
    assert "unknown field" in error["message"]


async def test_missing_fields_and_bad_status_are_rejected(api: httpx.AsyncClient) -> None:
    missing = await api.post(DEVICES, json={"id": "t-1"})
    assert missing.status_code == 422
    assert sorted(locations(error_of(missing))) == ["body.name", "body.type"]

    bad_status = await api.post(
        DEVICES, json={"id": "t-1", "name": "X", "type": "temperature", "status": "broken"}
    )
    assert bad_status.status_code == 422
    assert locations(error_of(bad_status)) == ["body.status"]

    blank_name = await api.post(DEVICES, json={"id": "t-1", "name": "   ", "type": "humidity"})
    assert blank_name.status_code == 422
    assert locations(error_of(blank_name)) == ["body.name"]


# --- list -----------------------------------------------------------------------------------


async def test_list_is_ordered_by_id_and_paginated(api: httpx.AsyncClient) -> None:
    for device_id in ["e", "c", "a", "d", "b"]:
        await create_device(api, device_id)

    first = (await api.get(DEVICES, params={"limit": 2})).json()
    assert [item["id"] for item in first["items"]] == ["a", "b"]
    assert (first["total"], first["limit"], first["offset"]) == (5, 2, 0)

    middle = (await api.get(DEVICES, params={"limit": 2, "offset": 2})).json()
    assert [item["id"] for item in middle["items"]] == ["c", "d"]
    assert middle["total"] == 5

    last = (await api.get(DEVICES, params={"limit": 2, "offset": 4})).json()
    assert [item["id"] for item in last["items"]] == ["e"]

    beyond = (await api.get(DEVICES, params={"offset": 10})).json()
    assert beyond["items"] == []
    assert beyond["total"] == 5

    default = (await api.get(DEVICES)).json()
    assert (default["limit"], default["offset"], len(default["items"])) == (50, 0, 5)


async def test_list_rejects_bad_parameters(api: httpx.AsyncClient) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"limit": 501}, "query.limit"),
        ({"limit": 0}, "query.limit"),
        ({"offset": -1}, "query.offset"),
        ({"type": "Bad Type"}, "query.type"),
        ({"status": "broken"}, "query.status"),
        ({"q": "x" * 65}, "query.q"),
    ]
    for params, location in cases:
        response = await api.get(DEVICES, params=params)
        assert response.status_code == 422, params
        assert locations(error_of(response)) == [location]


async def test_list_accepts_the_largest_page(api: httpx.AsyncClient) -> None:
    response = await api.get(DEVICES, params={"limit": 500})
    assert response.status_code == 200
    assert response.json()["limit"] == 500


async def test_list_filters_by_type_status_and_location(api: httpx.AsyncClient) -> None:
    await create_device(api, "t1", type="temperature", location="Kitchen")
    await create_device(api, "t2", type="temperature", location="Garage", status="inactive")
    await create_device(api, "h1", type="humidity", location="Kitchen")
    await create_device(api, "p1", type="power_meter", status="maintenance")

    assert await listed_ids(api, type="temperature") == ["t1", "t2"]
    assert await listed_ids(api, status="inactive") == ["t2"]
    assert await listed_ids(api, status="active") == ["h1", "t1"]
    assert await listed_ids(api, location="Kitchen") == ["h1", "t1"]
    assert await listed_ids(api, location="kitchen") == []
    assert await listed_ids(api, type="temperature", location="Kitchen") == ["t1"]
    assert await listed_ids(api, type="co2") == []

    page = (await api.get(DEVICES, params={"type": "temperature", "limit": 1})).json()
    assert page["total"] == 2
    assert [item["id"] for item in page["items"]] == ["t1"]


async def test_free_text_search_on_id_and_name(api: httpx.AsyncClient) -> None:
    await create_device(api, "Kitchen-01", name="Fridge sensor")
    await create_device(api, "boiler_01", name="Basement Boiler")
    await create_device(api, "hum-01", name="100% humidity probe")
    await create_device(api, "x1", name="Plain")

    assert await listed_ids(api, q="kitchen") == ["Kitchen-01"]
    assert await listed_ids(api, q="KITCHEN") == ["Kitchen-01"]
    assert await listed_ids(api, q="fridge") == ["Kitchen-01"]
    assert await listed_ids(api, q="BASEMENT") == ["boiler_01"]
    # A set: how "Kitchen" and "hum" sort depends on the PostgreSQL collation.
    assert set(await listed_ids(api, q="-01")) == {"Kitchen-01", "hum-01"}
    assert await listed_ids(api, q="nothing like it") == []

    page = (await api.get(DEVICES, params={"q": "01", "limit": 1})).json()
    assert page["total"] == 3


async def test_free_text_search_treats_wildcards_literally(api: httpx.AsyncClient) -> None:
    await create_device(api, "boiler_01", name="Boiler")
    await create_device(api, "hum-01", name="100% humidity probe")
    await create_device(api, "x1", name="Plain")
    await create_device(api, "back", name="C:\\temp")

    # As SQL wildcards, `_` and `%` would match every device.
    assert await listed_ids(api, q="_") == ["boiler_01"]
    assert await listed_ids(api, q="%") == ["hum-01"]
    assert await listed_ids(api, q="0%") == ["hum-01"]
    assert await listed_ids(api, q="r_0") == ["boiler_01"]
    assert await listed_ids(api, q="r-0") == []
    assert await listed_ids(api, q="\\") == ["back"]


# --- get ------------------------------------------------------------------------------------


async def test_get_unknown_device_is_404_in_the_shared_error_shape(
    api: httpx.AsyncClient,
) -> None:
    response = await api.get(f"{DEVICES}/nope")

    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "not_found"
    assert "'nope'" in error["message"]
    assert error["details"] is None


# --- update ---------------------------------------------------------------------------------


async def test_patch_changes_only_the_given_fields(api: httpx.AsyncClient) -> None:
    original = await create_device(
        api, "t-1", name="Old", location="Lab", metadata={"a": 1}, status="active"
    )

    response = await api.patch(f"{DEVICES}/t-1", json={"name": "New"})

    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["name"] == "New"
    for unchanged in ("id", "type", "location", "metadata", "status", "created_at"):
        assert updated[unchanged] == original[unchanged], unchanged
    assert datetime.fromisoformat(updated["updated_at"]) > datetime.fromisoformat(
        original["updated_at"]
    )
    assert (await api.get(f"{DEVICES}/t-1")).json() == updated

    again = (
        await api.patch(
            f"{DEVICES}/t-1",
            json={"status": "maintenance", "metadata": {"b": [2]}, "type": "humidity"},
        )
    ).json()
    assert (again["status"], again["metadata"], again["type"]) == (
        "maintenance",
        {"b": [2]},
        "humidity",
    )
    assert (again["name"], again["location"]) == ("New", "Lab")
    assert datetime.fromisoformat(again["updated_at"]) > datetime.fromisoformat(
        updated["updated_at"]
    )


async def test_patch_location_null_clears_it(api: httpx.AsyncClient) -> None:
    await create_device(api, "t-1", name="Name", location="Lab")

    response = await api.patch(f"{DEVICES}/t-1", json={"location": None})

    assert response.status_code == 200, response.text
    fetched = (await api.get(f"{DEVICES}/t-1")).json()
    assert fetched["location"] is None
    assert fetched["name"] == "Name"
    assert await listed_ids(api, location="Lab") == []


async def test_patch_null_for_a_required_field_is_rejected(api: httpx.AsyncClient) -> None:
    original = await create_device(api, "t-1", location="Lab")

    for field in ("name", "type", "status", "metadata"):
        response = await api.patch(f"{DEVICES}/t-1", json={field: None})

        assert response.status_code == 422, field
        error = error_of(response)
        assert error["code"] == "validation_failed"
        assert f"body.{field}: cannot be null" in error["message"]
    assert (await api.get(f"{DEVICES}/t-1")).json() == original


async def test_patch_rejects_invalid_bodies(api: httpx.AsyncClient) -> None:
    original = await create_device(api, "t-1")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"colour": "red"}, "body.colour"),
        ({"type": "Temperature"}, "body.type"),
        ({"status": "gone"}, "body.status"),
        ({"id": "other"}, "body.id"),
        ({"name": "x" * 201}, "body.name"),
    ]
    for body, location in cases:
        response = await api.patch(f"{DEVICES}/t-1", json=body)

        assert response.status_code == 422, body
        assert locations(error_of(response)) == [location]
    assert (await api.get(f"{DEVICES}/t-1")).json() == original


async def test_patch_unknown_device_is_404(api: httpx.AsyncClient) -> None:
    response = await api.patch(f"{DEVICES}/nope", json={"name": "X"})
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


# --- delete ---------------------------------------------------------------------------------


async def count_rows(database_url: str, table: str, device_id: str) -> int:
    engine = build_engine(database_url)
    try:
        async with engine.connect() as connection:
            count = await connection.scalar(
                text(f"SELECT count(*) FROM {table} WHERE device_id = :id"), {"id": device_id}
            )
    finally:
        await engine.dispose()
    return int(count or 0)


async def test_delete_removes_the_device_with_its_configs_and_alerts(
    api: httpx.AsyncClient, database_url: str
) -> None:
    for device_id in ("gone", "kept"):
        await create_device(api, device_id)
        replaced = await api.put(f"{DEVICES}/{device_id}/configs", json={"a": 1, "b": [2]})
        assert replaced.status_code == 200, replaced.text
        for severity in ("info", "critical"):
            raised = await api.post(
                "/api/v1/alerts",
                json={"device_id": device_id, "severity": severity, "message": "hot"},
            )
            assert raised.status_code == 201, raised.text
    gone_alerts = (await api.get("/api/v1/alerts", params={"device_id": "gone"})).json()["items"]
    assert await count_rows(database_url, "device_configs", "gone") == 2
    assert await count_rows(database_url, "device_alerts", "gone") == 2

    response = await api.delete(f"{DEVICES}/gone")

    assert response.status_code == 204
    assert response.content == b""
    assert (await api.get(f"{DEVICES}/gone")).status_code == 404
    assert (await api.get(f"{DEVICES}/gone/configs")).status_code == 404
    for alert in gone_alerts:
        assert (await api.get(f"/api/v1/alerts/{alert['id']}")).status_code == 404
    assert (await api.get("/api/v1/alerts", params={"device_id": "gone"})).json()["total"] == 0
    assert await count_rows(database_url, "device_configs", "gone") == 0
    assert await count_rows(database_url, "device_alerts", "gone") == 0

    # The other device keeps everything.
    assert (await api.get(f"{DEVICES}/kept")).status_code == 200
    assert len((await api.get(f"{DEVICES}/kept/configs")).json()["items"]) == 2
    assert (await api.get("/api/v1/alerts", params={"device_id": "kept"})).json()["total"] == 2
    assert await count_rows(database_url, "device_configs", "kept") == 2
    assert await count_rows(database_url, "device_alerts", "kept") == 2

    # The id is free again, and the new device starts with no configs.
    await create_device(api, "gone")
    assert (await api.get(f"{DEVICES}/gone/configs")).json()["items"] == []


async def test_concurrent_deletes_of_one_device_delete_it_once(api: httpx.AsyncClient) -> None:
    for _ in range(3):
        await create_device(api, "t-1")
        await api.put(f"{DEVICES}/t-1/configs", json={"a": 1})

        responses = await asyncio.gather(*(api.delete(f"{DEVICES}/t-1") for _ in range(3)))

        assert sorted(response.status_code for response in responses) == [204, 404, 404]
        assert (await api.get(f"{DEVICES}/t-1")).status_code == 404


async def test_delete_unknown_device_is_404(api: httpx.AsyncClient) -> None:
    await create_device(api, "t-1")
    assert (await api.delete(f"{DEVICES}/t-1")).status_code == 204

    response = await api.delete(f"{DEVICES}/t-1")

    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"
