"""Alerts: raising, listing, and the active -> acknowledged -> resolved life cycle."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

ALERTS = "/api/v1/alerts"


@pytest.fixture
async def devices(api: httpx.AsyncClient) -> list[str]:
    for device_id in ("dev-a", "dev-b"):
        response = await api.post(
            "/api/v1/devices", json={"id": device_id, "name": device_id, "type": "temperature"}
        )
        assert response.status_code == 201, response.text
    return ["dev-a", "dev-b"]


async def raise_alert(
    api: httpx.AsyncClient, device_id: str = "dev-a", **fields: Any
) -> dict[str, Any]:
    body = {"device_id": device_id, "severity": "warning", "message": "too hot", **fields}
    response = await api.post(ALERTS, json=body)
    assert response.status_code == 201, response.text
    alert: dict[str, Any] = response.json()
    return alert


async def listed(api: httpx.AsyncClient, **params: Any) -> list[int]:
    response = await api.get(ALERTS, params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    error: dict[str, Any] = body["error"]
    return error


def at(value: str | None) -> datetime:
    assert value is not None
    return datetime.fromisoformat(value)


# --- create and get -------------------------------------------------------------------------


async def test_create_returns_an_active_alert(api: httpx.AsyncClient, devices: list[str]) -> None:
    before = datetime.now(UTC)
    response = await api.post(
        ALERTS,
        json={
            "device_id": "dev-a",
            "severity": "critical",
            "message": "temperature 91.5 above 80",
            "field": "temperature",
            "value": 91.5,
            "threshold": 80,
        },
    )

    assert response.status_code == 201, response.text
    alert = response.json()
    assert response.headers["Location"] == f"/api/v1/alerts/{alert['id']}"
    assert alert["device_id"] == "dev-a"
    assert alert["severity"] == "critical"
    assert alert["status"] == "active"
    assert alert["message"] == "temperature 91.5 above 80"
    assert (alert["field"], alert["value"], alert["threshold"]) == ("temperature", 91.5, 80.0)
    assert alert["rule_id"] is None
    assert alert["acknowledged_at"] is None
    assert alert["resolved_at"] is None
    created_at = at(alert["created_at"])
    assert created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= created_at <= datetime.now(UTC) + timedelta(seconds=1)

    fetched = await api.get(f"{ALERTS}/{alert['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == alert


async def test_optional_fields_default_to_null(api: httpx.AsyncClient, devices: list[str]) -> None:
    alert = await raise_alert(api, severity="info", message="door open")
    assert (alert["field"], alert["value"], alert["threshold"]) == (None, None, None)


async def test_create_on_unknown_device_is_404(api: httpx.AsyncClient) -> None:
    response = await api.post(
        ALERTS, json={"device_id": "ghost", "severity": "info", "message": "x"}
    )

    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "not_found"
    assert "'ghost'" in error["message"]
    assert (await api.get(ALERTS)).json()["total"] == 0


async def test_create_rejects_invalid_bodies(api: httpx.AsyncClient, devices: list[str]) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"severity": "fatal"}, "body.severity"),
        ({"severity": "WARNING"}, "body.severity"),
        ({"message": ""}, "body.message"),
        ({"device_id": "bad id!"}, "body.device_id"),
        ({"status": "resolved"}, "body.status"),
        ({"value": "Infinity"}, "body.value"),
        ({"threshold": "-Infinity"}, "body.threshold"),
        ({"value": "NaN"}, "body.value"),
    ]
    for body, location in cases:
        full = {"device_id": "dev-a", "severity": "warning", "message": "m", **body}

        response = await api.post(ALERTS, json=full)

        assert response.status_code == 422, body
        error = error_of(response)
        assert [item["location"] for item in error["details"]] == [location]
        assert location in error["message"]
    assert (await api.get(ALERTS)).json()["total"] == 0


async def test_non_finite_json_numbers_are_rejected(
    api: httpx.AsyncClient, devices: list[str]
) -> None:
    # Python's JSON parser accepts these non-standard literals; the API must not store them.
    for literal, field in itertools.product(
        ("NaN", "Infinity", "-Infinity"), ("value", "threshold")
    ):
        content = (
            f'{{"device_id": "dev-a", "severity": "info", "message": "m", "{field}": {literal}}}'
        )
        response = await api.post(
            ALERTS, content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, response.text
        assert f"body.{field}" in error_of(response)["message"]
    assert (await api.get(ALERTS)).json()["total"] == 0


async def test_get_unknown_alert_is_404(api: httpx.AsyncClient) -> None:
    response = await api.get(f"{ALERTS}/999999")

    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "not_found"
    assert "999999" in error["message"]


async def test_an_invalid_id_is_422(api: httpx.AsyncClient) -> None:
    for alert_id in ("0", "-1", "abc"):
        for method, path in (("GET", ""), ("POST", "/acknowledge"), ("POST", "/resolve")):
            response = await api.request(method, f"{ALERTS}/{alert_id}{path}")
            assert response.status_code == 422, (alert_id, path)
            assert error_of(response)["code"] == "validation_failed"


# --- list -----------------------------------------------------------------------------------


async def test_list_is_newest_first_and_paginated(
    api: httpx.AsyncClient, devices: list[str]
) -> None:
    ids = [(await raise_alert(api, message=f"alert {index}"))["id"] for index in range(5)]
    newest_first = list(reversed(ids))

    assert await listed(api) == newest_first
    page = (await api.get(ALERTS, params={"limit": 2, "offset": 2})).json()
    assert [item["id"] for item in page["items"]] == newest_first[2:4]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 2)
    assert await listed(api, limit=2, offset=4) == newest_first[4:]
    assert await listed(api, offset=5) == []


async def test_list_rejects_bad_parameters(api: httpx.AsyncClient) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"limit": 501}, "query.limit"),
        ({"limit": 0}, "query.limit"),
        ({"offset": -1}, "query.offset"),
        ({"status": "open"}, "query.status"),
        ({"severity": "fatal"}, "query.severity"),
        ({"device_id": "x" * 65}, "query.device_id"),
    ]
    for params, location in cases:
        response = await api.get(ALERTS, params=params)
        assert response.status_code == 422, params
        assert [item["location"] for item in error_of(response)["details"]] == [location]


async def test_list_filters_by_device_status_and_severity(
    api: httpx.AsyncClient, devices: list[str]
) -> None:
    a_info = (await raise_alert(api, "dev-a", severity="info"))["id"]
    a_critical = (await raise_alert(api, "dev-a", severity="critical"))["id"]
    b_warning = (await raise_alert(api, "dev-b", severity="warning"))["id"]
    b_critical = (await raise_alert(api, "dev-b", severity="critical"))["id"]
    assert (await api.post(f"{ALERTS}/{a_critical}/acknowledge")).status_code == 200
    assert (await api.post(f"{ALERTS}/{b_warning}/resolve")).status_code == 200

    assert await listed(api, device_id="dev-a") == [a_critical, a_info]
    assert await listed(api, device_id="dev-b") == [b_critical, b_warning]
    assert await listed(api, device_id="nobody") == []
    assert await listed(api, status="active") == [b_critical, a_info]
    assert await listed(api, status="acknowledged") == [a_critical]
    assert await listed(api, status="resolved") == [b_warning]
    assert await listed(api, severity="critical") == [b_critical, a_critical]
    assert await listed(api, severity="info") == [a_info]
    assert await listed(api, device_id="dev-b", severity="critical", status="active") == [
        b_critical
    ]
    page = (await api.get(ALERTS, params={"severity": "critical", "limit": 1})).json()
    assert page["total"] == 2


async def test_list_filters_by_time_range(api: httpx.AsyncClient, devices: list[str]) -> None:
    alerts = [await raise_alert(api, message=f"alert {index}") for index in range(4)]
    ids = [alert["id"] for alert in alerts]
    second = at(alerts[1]["created_at"])
    fourth = at(alerts[3]["created_at"])

    # `since` is inclusive, `until` exclusive.
    assert await listed(api, since=second.isoformat()) == [ids[3], ids[2], ids[1]]
    assert await listed(api, until=second.isoformat()) == [ids[0]]
    assert await listed(api, since=second.isoformat(), until=fourth.isoformat()) == [
        ids[2],
        ids[1],
    ]
    # The same instant written in another zone selects the same alerts.
    plus_two = second.astimezone(timezone(timedelta(hours=2))).isoformat()
    assert plus_two.endswith("+02:00")
    assert await listed(api, since=plus_two) == [ids[3], ids[2], ids[1]]
    later = (fourth + timedelta(seconds=1)).isoformat()
    assert await listed(api, since=later) == []
    page = (await api.get(ALERTS, params={"since": second.isoformat(), "limit": 1})).json()
    assert page["total"] == 3


async def test_a_time_that_is_not_one_is_400_saying_what_a_time_is(
    api: httpx.AsyncClient,
) -> None:
    for value in ("yesterday", "0.5", "1767225600"):
        response = await api.get(ALERTS, params={"since": value})
        assert response.status_code == 400, value
        assert "RFC 3339" in error_of(response)["message"]


async def test_naive_time_is_rejected(api: httpx.AsyncClient) -> None:
    for name in ("since", "until"):
        for naive in ("2026-01-01T00:00:00", "2026-01-01"):
            response = await api.get(ALERTS, params={name: naive})

            assert response.status_code == 400, (name, naive)
            error = error_of(response)
            assert error["code"] == "invalid_request"
            assert error["message"].startswith(f"{name}='{naive}' is not a time")
            assert "with a zone" in error["message"]


async def test_since_must_be_before_until(api: httpx.AsyncClient) -> None:
    ranges = [
        ("2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z"),
        ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
        ("2026-01-01T02:00:00+02:00", "2026-01-01T00:00:00Z"),
    ]
    for since, until in ranges:
        response = await api.get(ALERTS, params={"since": since, "until": until})

        assert response.status_code == 400, (since, until)
        error = error_of(response)
        assert error["code"] == "invalid_request"
        assert "since must be before until" in error["message"]


# --- life cycle -----------------------------------------------------------------------------


async def test_acknowledge_an_active_alert(api: httpx.AsyncClient, devices: list[str]) -> None:
    alert = await raise_alert(api)

    response = await api.post(f"{ALERTS}/{alert['id']}/acknowledge")

    assert response.status_code == 200, response.text
    acknowledged = response.json()
    assert acknowledged["status"] == "acknowledged"
    assert at(acknowledged["acknowledged_at"]) >= at(alert["created_at"])
    assert acknowledged["resolved_at"] is None
    assert acknowledged["created_at"] == alert["created_at"]
    assert (await api.get(f"{ALERTS}/{alert['id']}")).json() == acknowledged


async def test_resolve_an_active_alert(api: httpx.AsyncClient, devices: list[str]) -> None:
    alert = await raise_alert(api)

    response = await api.post(f"{ALERTS}/{alert['id']}/resolve")

    assert response.status_code == 200, response.text
    resolved = response.json()
    assert resolved["status"] == "resolved"
    assert at(resolved["resolved_at"]) >= at(alert["created_at"])
    assert resolved["acknowledged_at"] is None
    assert (await api.get(f"{ALERTS}/{alert['id']}")).json() == resolved


async def test_resolve_an_acknowledged_alert(api: httpx.AsyncClient, devices: list[str]) -> None:
    alert = await raise_alert(api)
    acknowledged = (await api.post(f"{ALERTS}/{alert['id']}/acknowledge")).json()

    response = await api.post(f"{ALERTS}/{alert['id']}/resolve")

    assert response.status_code == 200, response.text
    resolved = response.json()
    assert resolved["status"] == "resolved"
    assert resolved["acknowledged_at"] == acknowledged["acknowledged_at"]
    assert at(resolved["resolved_at"]) >= at(acknowledged["acknowledged_at"])
    assert (await api.get(f"{ALERTS}/{alert['id']}")).json() == resolved


@pytest.mark.parametrize(
    ("history", "action", "expected_in_message"),
    [
        (["resolve"], "resolve", "already resolved"),
        (["acknowledge", "resolve"], "resolve", "already resolved"),
        (["resolve"], "acknowledge", "is resolved"),
        (["acknowledge"], "acknowledge", "is acknowledged"),
        (["acknowledge", "resolve"], "acknowledge", "is resolved"),
    ],
)
async def test_illegal_transitions_are_conflicts_and_change_nothing(
    api: httpx.AsyncClient,
    devices: list[str],
    history: list[str],
    action: str,
    expected_in_message: str,
) -> None:
    alert = await raise_alert(api)
    for step in history:
        assert (await api.post(f"{ALERTS}/{alert['id']}/{step}")).status_code == 200
    before = (await api.get(f"{ALERTS}/{alert['id']}")).json()

    response = await api.post(f"{ALERTS}/{alert['id']}/{action}")

    assert response.status_code == 409
    error = error_of(response)
    assert error["code"] == "conflict"
    assert str(alert["id"]) in error["message"]
    assert expected_in_message in error["message"]
    assert (await api.get(f"{ALERTS}/{alert['id']}")).json() == before


@pytest.mark.parametrize(
    ("history", "action"),
    [([], "acknowledge"), ([], "resolve"), (["acknowledge"], "resolve")],
)
async def test_concurrent_transitions_succeed_once(
    api: httpx.AsyncClient, devices: list[str], history: list[str], action: str
) -> None:
    # Two operators pressing the same button at once: one wins, the other is told it is done.
    for _ in range(3):
        alert = await raise_alert(api)
        for step in history:
            assert (await api.post(f"{ALERTS}/{alert['id']}/{step}")).status_code == 200

        responses = await asyncio.gather(
            *(api.post(f"{ALERTS}/{alert['id']}/{action}") for _ in range(4))
        )

        assert sorted(response.status_code for response in responses) == [200, 409, 409, 409]
        winner = next(response.json() for response in responses if response.status_code == 200)
        assert (await api.get(f"{ALERTS}/{alert['id']}")).json() == winner


async def test_transition_of_unknown_alert_is_404(api: httpx.AsyncClient) -> None:
    for action in ("acknowledge", "resolve"):
        response = await api.post(f"{ALERTS}/999999/{action}")
        assert response.status_code == 404, action
        error = error_of(response)
        assert error["code"] == "not_found"
        assert "999999" in error["message"]
