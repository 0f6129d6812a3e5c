from __future__ import annotations

import httpx


async def test_create_and_get_device(api: httpx.AsyncClient) -> None:
    created = await api.post(
        "/api/v1/devices", json={"id": "t-1", "name": "Kitchen", "type": "temperature"}
    )
    assert created.status_code == 201, created.text
    fetched = await api.get("/api/v1/devices/t-1")
    assert fetched.json()["name"] == "Kitchen"
