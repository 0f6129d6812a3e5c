"""Per-device configuration keys, on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import httpx
import pytest

DEVICES = "/api/v1/devices"

JSON_VALUES: list[Any] = [
    {"interval_s": 5, "nested": {"list": [1, 2.5, "x", None, True]}},
    {},
    [1, "two", {"three": 3}, None],
    [],
    42,
    -3.25,
    0,
    'text with ünïcode and "quotes"',
    "",
    True,
    False,
    None,
]


@pytest.fixture
async def device(api: httpx.AsyncClient) -> str:
    response = await api.post(DEVICES, json={"id": "dev-1", "name": "Dev", "type": "humidity"})
    assert response.status_code == 201, response.text
    return "dev-1"


def configs_url(device_id: str, key: str | None = None) -> str:
    url = f"{DEVICES}/{device_id}/configs"
    return url if key is None else f"{url}/{key}"


async def put(api: httpx.AsyncClient, device_id: str, key: str, value: Any) -> dict[str, Any]:
    response = await api.put(configs_url(device_id, key), json={"value": value})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def as_dict(api: httpx.AsyncClient, device_id: str) -> dict[str, Any]:
    response = await api.get(configs_url(device_id))
    assert response.status_code == 200, response.text
    desired: dict[str, Any] = response.json()["desired"]
    return desired


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    error: dict[str, Any] = body["error"]
    return error


async def test_a_new_device_has_no_configs(api: httpx.AsyncClient, device: str) -> None:
    response = await api.get(configs_url(device))
    assert response.status_code == 200
    state = response.json()
    assert state["items"] == []
    assert state["desired"] == {}
    assert state["desired_version"] == 0
    assert state["reported"] is None
    assert state["in_sync"] is True  # never sent a configuration: nothing to catch up with


async def test_put_then_get_and_list_sorted_by_key(api: httpx.AsyncClient, device: str) -> None:
    stored = await put(api, device, "interval_s", 30)
    assert stored["key"] == "interval_s"
    assert stored["value"] == 30
    assert datetime.fromisoformat(stored["updated_at"]).utcoffset() is not None

    await put(api, device, "a.first", "x")
    await put(api, device, "z-last", [1])

    fetched = await api.get(configs_url(device, "interval_s"))
    assert fetched.status_code == 200
    assert fetched.json() == stored
    listed = (await api.get(configs_url(device))).json()["items"]
    assert [item["key"] for item in listed] == sorted(["interval_s", "a.first", "z-last"])
    assert listed[[item["key"] for item in listed].index("interval_s")] == stored


async def test_put_overwrites_a_key(api: httpx.AsyncClient, device: str) -> None:
    first = await put(api, device, "mode", "eco")

    second = await put(api, device, "mode", {"name": "turbo", "level": 3})

    assert second["value"] == {"name": "turbo", "level": 3}
    assert datetime.fromisoformat(second["updated_at"]) > datetime.fromisoformat(
        first["updated_at"]
    )
    assert await as_dict(api, device) == {"mode": {"name": "turbo", "level": 3}}


async def test_any_json_value_round_trips_through_one_key(
    api: httpx.AsyncClient, device: str
) -> None:
    for value in JSON_VALUES:
        stored = await put(api, device, "k", value)
        assert stored["value"] == value

        fetched = (await api.get(configs_url(device, "k"))).json()
        assert fetched["value"] == value, value
        assert type(fetched["value"]) is type(value), value
        assert await as_dict(api, device) == {"k": value}


async def test_any_json_value_round_trips_when_first_stored(
    api: httpx.AsyncClient, device: str
) -> None:
    for index, value in enumerate(JSON_VALUES):
        key = f"new{index}"
        stored = await put(api, device, key, value)
        assert stored["value"] == value

        fetched = (await api.get(configs_url(device, key))).json()
        assert fetched["value"] == value, value
        assert type(fetched["value"]) is type(value), value


async def test_every_json_value_round_trips_through_replace_all(
    api: httpx.AsyncClient, device: str
) -> None:
    values = {f"key{index}": value for index, value in enumerate(JSON_VALUES)}

    response = await api.put(configs_url(device), json=values)

    assert response.status_code == 200, response.text
    assert {item["key"]: item["value"] for item in response.json()} == values
    stored = await as_dict(api, device)
    assert stored == values
    assert {key: type(value) for key, value in stored.items()} == {
        key: type(value) for key, value in values.items()
    }


async def test_concurrent_writes_of_one_key_all_succeed(
    api: httpx.AsyncClient, device: str
) -> None:
    # Two clients setting the same new key at once must not see a server error.
    for round_number in range(3):
        key = f"race{round_number}"
        responses = await asyncio.gather(
            *(api.put(configs_url(device, key), json={"value": index}) for index in range(6))
        )
        assert [response.status_code for response in responses] == [200] * 6, [
            response.text for response in responses
        ]
        assert (await api.get(configs_url(device, key))).json()["value"] in range(6)


async def test_concurrent_replace_all_leaves_exactly_one_of_the_bodies(
    api: httpx.AsyncClient, device: str
) -> None:
    bodies = [{f"only{index}": index, "shared": index} for index in range(4)]
    for _ in range(3):
        responses = await asyncio.gather(*(api.put(configs_url(device), json=b) for b in bodies))
        assert [response.status_code for response in responses] == [200] * 4, [
            response.text for response in responses
        ]
        assert await as_dict(api, device) in bodies


async def test_delete_one_key(api: httpx.AsyncClient, device: str) -> None:
    await put(api, device, "a", 1)
    await put(api, device, "b", 2)

    response = await api.delete(configs_url(device, "a"))

    assert response.status_code == 204
    assert response.content == b""
    assert (await api.get(configs_url(device, "a"))).status_code == 404
    assert await as_dict(api, device) == {"b": 2}
    again = await api.delete(configs_url(device, "a"))
    assert again.status_code == 404


async def test_concurrent_deletes_of_one_key_delete_it_once(
    api: httpx.AsyncClient, device: str
) -> None:
    for _ in range(3):
        await put(api, device, "a", 1)

        responses = await asyncio.gather(*(api.delete(configs_url(device, "a")) for _ in range(3)))

        assert sorted(response.status_code for response in responses) == [204, 404, 404]
        assert await as_dict(api, device) == {}


async def test_replace_all_deletes_keys_not_given(api: httpx.AsyncClient, device: str) -> None:
    await put(api, device, "a", 1)
    await put(api, device, "b", 2)

    response = await api.put(configs_url(device), json={"b": 20, "c": {"x": None}})

    assert response.status_code == 200, response.text
    assert [(item["key"], item["value"]) for item in response.json()] == [
        ("b", 20),
        ("c", {"x": None}),
    ]
    assert await as_dict(api, device) == {"b": 20, "c": {"x": None}}
    assert (await api.get(configs_url(device, "a"))).status_code == 404


async def test_replace_all_with_an_empty_object_clears_everything(
    api: httpx.AsyncClient, device: str
) -> None:
    await put(api, device, "a", 1)

    response = await api.put(configs_url(device), json={})

    assert response.status_code == 200
    assert response.json() == []
    assert await as_dict(api, device) == {}


async def test_configs_of_one_device_do_not_touch_another(
    api: httpx.AsyncClient, device: str
) -> None:
    other = await api.post(DEVICES, json={"id": "dev-2", "name": "Other", "type": "humidity"})
    assert other.status_code == 201
    await put(api, "dev-2", "a", "other")
    await put(api, device, "a", "mine")

    await api.put(configs_url(device), json={})

    assert await as_dict(api, "dev-2") == {"a": "other"}
    assert (await api.delete(configs_url(device, "a"))).status_code == 404
    assert await as_dict(api, "dev-2") == {"a": "other"}


async def test_unknown_device_is_404(api: httpx.AsyncClient) -> None:
    requests: list[tuple[str, str, Any]] = [
        ("GET", configs_url("ghost"), None),
        ("PUT", configs_url("ghost"), {"a": 1}),
        ("GET", configs_url("ghost", "a"), None),
        ("PUT", configs_url("ghost", "a"), {"value": 1}),
        ("DELETE", configs_url("ghost", "a"), None),
    ]
    for method, url, body in requests:
        response = await api.request(method, url, json=body)

        assert response.status_code == 404, (method, url)
        error = error_of(response)
        assert error["code"] == "not_found"
        assert "'ghost'" in error["message"]


async def test_unknown_key_is_404_naming_the_key(api: httpx.AsyncClient, device: str) -> None:
    response = await api.get(configs_url(device, "missing"))

    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "not_found"
    assert "'missing'" in error["message"]


async def test_invalid_key_in_the_path_is_422(api: httpx.AsyncClient, device: str) -> None:
    for key in ("bad key!", "k" * 129, "semi;colon"):
        for method, body in (("GET", None), ("PUT", {"value": 1}), ("DELETE", None)):
            response = await api.request(method, configs_url(device, key), json=body)
            assert response.status_code == 422, (key, method, response.text)
            assert [item["location"] for item in error_of(response)["details"]] == ["path.key"]
    assert await as_dict(api, device) == {}


async def test_a_key_of_128_characters_is_accepted(api: httpx.AsyncClient, device: str) -> None:
    await put(api, device, "k" * 128, 1)
    assert await as_dict(api, device) == {"k" * 128: 1}


async def test_invalid_key_in_replace_all_is_422_and_changes_nothing(
    api: httpx.AsyncClient, device: str
) -> None:
    await put(api, device, "a", 1)

    response = await api.put(configs_url(device), json={"good": 1, "bad key!": 2})

    assert response.status_code == 422
    assert "bad key!" in error_of(response)["message"]
    assert await as_dict(api, device) == {"a": 1}


async def test_replace_all_needs_a_json_object(api: httpx.AsyncClient, device: str) -> None:
    await put(api, device, "a", 1)
    for body in ([1, 2], "text", 3, None):
        response = await api.put(configs_url(device), json=body)
        assert response.status_code == 422, body
        assert error_of(response)["code"] == "validation_failed"
    assert await as_dict(api, device) == {"a": 1}


async def test_put_one_key_needs_exactly_a_value(api: httpx.AsyncClient, device: str) -> None:
    for body, location in (({}, "body.value"), ({"value": 1, "extra": 2}, "body.extra")):
        response = await api.put(configs_url(device, "k"), json=body)

        assert response.status_code == 422
        assert [item["location"] for item in error_of(response)["details"]] == [location]
    assert await as_dict(api, device) == {}
