"""Traces from the whole app (its real lifespan, in process), kept by an in-memory exporter:
a span per HTTP request named by its route template and continuing an incoming `traceparent`,
and a span per alert delivery to a local webhook receiver. Tracing off: no middleware at all.

SQLite only: nothing here depends on the database, and the spans are the same on both."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from iotmeter.app import create_app
from iotmeter.observability.tracing import TracingMiddleware
from tests.conftest import auth_headers, empty_tables, make_settings
from tests.fixtures.receiver import Receiver, webhook_receiver
from tests.fixtures.waiting import eventually

ENDPOINT = "http://127.0.0.1:4318"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with webhook_receiver() as found:
        yield found


@asynccontextmanager
async def traced_api(
    sqlite_url: str, tmp_path: Path, exporter: InMemorySpanExporter
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with tracing on (its spans to `exporter`) and a client holding an admin key."""
    await empty_tables(sqlite_url)
    settings = make_settings(
        sqlite_url, tmp_path, otlp_endpoint=ENDPOINT, webhook_allow_private=True
    )
    app = create_app(settings, span_exporter=exporter)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://iotmeter", headers=await auth_headers(settings)
        ) as client:
            yield client


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.kind is SpanKind.SERVER]


async def delivery_spans(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    async def finished() -> list[ReadableSpan]:
        spans = exporter.get_finished_spans()
        return [span for span in spans if span.name.startswith("alert.deliver")]

    return await eventually(
        finished, lambda spans: len(spans) >= count, what=f"{count} delivery span(s)"
    )


async def test_each_request_is_a_span_named_by_its_route_with_the_incoming_trace(
    sqlite_url: str, tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    async with traced_api(sqlite_url, tmp_path, exporter) as api:
        traced = await api.get(
            "/api/v1/devices/dev-42", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        )
        assert traced.status_code == 404
        created = await api.post(
            "/api/v1/devices", json={"id": "dev-7", "name": "dev-7", "type": "temperature"}
        )
        assert created.status_code == 201, created.text

    spans = server_spans(exporter)
    assert [span.name for span in spans] == [
        "GET /api/v1/devices/{device_id}",
        "POST /api/v1/devices",
    ]
    got, made = spans
    assert dict(got.attributes or {}) == {
        "http.request.method": "GET",
        "http.route": "/api/v1/devices/{device_id}",
        "url.path": "/api/v1/devices/dev-42",
        "http.response.status_code": 404,
    }
    assert got.status.status_code is StatusCode.UNSET  # a 404 is the client's, not an error
    assert got.context is not None
    assert got.parent is not None
    assert format(got.context.trace_id, "032x") == TRACE_ID
    assert format(got.parent.span_id, "016x") == PARENT_ID
    assert (made.attributes or {})["http.response.status_code"] == 201
    assert made.parent is None
    assert made.context is not None
    assert format(made.context.trace_id, "032x") != TRACE_ID
    assert made.resource.attributes["service.name"] == "iotmeter"


async def test_an_alert_delivery_is_a_span_with_its_outcome(
    sqlite_url: str, tmp_path: Path, exporter: InMemorySpanExporter, receiver: Receiver
) -> None:
    receiver.statuses["/down"] = [503]
    sent: list[dict[str, Any]] = []
    async with traced_api(sqlite_url, tmp_path, exporter) as api:
        for path in ("/hook", "/down"):
            channel = await api.post(
                "/api/v1/channels",
                json={"name": path[1:], "kind": "webhook", "url": receiver.url(path)},
            )
            assert channel.status_code == 201, channel.text
            queued = await api.post(f"/api/v1/channels/{channel.json()['id']}/test")
            assert queued.status_code == 202, queued.text
            sent.append(queued.json())
            await delivery_spans(exporter, len(sent))

    # The first try of each (the failed one's retry is seconds away).
    delivered, failed = (await delivery_spans(exporter, 2))[:2]
    for span, notification in zip((delivered, failed), sent, strict=True):
        assert span.name == "alert.deliver webhook"
        assert span.kind is SpanKind.CLIENT
        attributes = span.attributes or {}
        assert attributes["iotmeter.channel.kind"] == "webhook"
        assert attributes["iotmeter.notification.id"] == notification["id"]
        assert attributes["iotmeter.event.id"] == notification["event_id"]
    assert (delivered.attributes or {})["iotmeter.delivery.outcome"] == "delivered"
    assert (delivered.attributes or {})["http.response.status_code"] == 200
    assert delivered.status.status_code is StatusCode.UNSET
    assert (failed.attributes or {})["iotmeter.delivery.outcome"] == "failed"
    assert (failed.attributes or {})["http.response.status_code"] == 503
    assert failed.status.status_code is StatusCode.ERROR
    assert [item.path for item in receiver.received] == ["/hook", "/down"]


def test_tracing_off_installs_no_middleware(sqlite_url: str, tmp_path: Path) -> None:
    def middleware_of(**overrides: Any) -> list[Any]:
        app = create_app(make_settings(sqlite_url, tmp_path, **overrides))
        return [item.cls for item in app.user_middleware]

    assert TracingMiddleware not in middleware_of()
    assert TracingMiddleware in middleware_of(otlp_endpoint=ENDPOINT)
