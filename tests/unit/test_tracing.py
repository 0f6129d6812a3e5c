"""Traces: what is exported when tracing is on (sink batch writes on a real spool, HTTP
requests on a small app, delivery outcomes), what it costs when off (one shared no-op, no
OpenTelemetry import), and the refusal of an endpoint without the package."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from iotmeter.config import Settings
from iotmeter.errors import BackendUnavailable, SettingsInvalid
from iotmeter.ingest.spool import Spool
from iotmeter.observability.tracing import (
    TracingMiddleware,
    delivery_span,
    sink_batch_span,
    start_tracing,
)
from tests.unit.test_runner import (
    SINK,
    TOPIC,
    Parked,
    RecordingSink,
    make_runner,
    running,
    telemetry,
    until,
)

ENDPOINT = "http://127.0.0.1:4318"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
NOT_INSTALLED = ("opentelemetry.sdk", "opentelemetry.exporter")
"""What the `tracing` extra adds (opentelemetry-api comes with FastAPI itself)."""


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, its spans kept in memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    tracing = start_tracing(Settings(otlp_endpoint=ENDPOINT), exporter)
    assert tracing is not None
    try:
        yield exporter
    finally:
        tracing.shutdown()


def spans_named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name.startswith(prefix)]


# --- off ----------------------------------------------------------------------------------------


def test_off_every_span_is_one_shared_no_op() -> None:
    assert start_tracing(Settings()) is None
    assert start_tracing(Settings(otlp_endpoint="")) is None
    first = sink_batch_span("timeseries", 10, 1, 10)
    assert sink_batch_span("archive", 3, 11, 13) is first
    with first:
        pass
    delivery = delivery_span("webhook", 1, "msg_1")
    assert delivery_span("mqtt", 2, "msg_2") is delivery
    with delivery as trace:
        trace.outcome(False, 500, "the receiver answered 500")


def test_the_base_install_runs_without_opentelemetry(tmp_path: Path) -> None:
    """Without the SDK and the exporter (the base install: FastAPI brings only
    opentelemetry-api), the app, the ingest runner and the notifier import, and tracing stays
    off: nothing imports the SDK unless tracing is turned on."""
    script = """
import sys
for name in NOT_INSTALLED:
    sys.modules[name] = None  # as if not installed: any import of it fails
from iotmeter.app import create_app
from iotmeter.ingest.runner import SinkRunner
from iotmeter.alerting.notify import Notifier
from iotmeter.observability.tracing import sink_batch_span, start_tracing
from iotmeter.config import Settings
assert start_tracing(Settings()) is None
with sink_batch_span("timeseries", 1, 1, 1):
    pass
print("ok")
"""
    env = {name: value for name, value in os.environ.items() if not name.startswith("IOTMETER_")}
    env["IOTMETER_SPOOL_DIR"] = str(tmp_path / "spool")
    env["IOTMETER_ARCHIVE_DIR"] = str(tmp_path / "archive")
    done = subprocess.run(
        [sys.executable, "-c", f"NOT_INSTALLED = {NOT_INSTALLED!r}\n{script}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_an_endpoint_without_the_package_is_refused_with_how_to_fix_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [*NOT_INSTALLED, *(name for name in sys.modules if name.startswith(NOT_INSTALLED))]:
        monkeypatch.setitem(sys.modules, name, None)

    with pytest.raises(SettingsInvalid) as refused:
        start_tracing(Settings(otlp_endpoint=ENDPOINT))

    message = str(refused.value)
    assert "IOTMETER_OTLP_ENDPOINT" in message
    assert "pip install 'iotmeter[tracing]'" in message
    assert sink_batch_span("timeseries", 1, 1, 1) is sink_batch_span("archive", 1, 1, 1)


def test_shutdown_turns_tracing_off_again() -> None:
    exporter = InMemorySpanExporter()
    tracing = start_tracing(Settings(otlp_endpoint=ENDPOINT), exporter)
    assert tracing is not None
    with pytest.raises(RuntimeError, match="already on"):
        start_tracing(Settings(otlp_endpoint=ENDPOINT), exporter)
    with sink_batch_span("timeseries", 1, 1, 1):
        pass
    tracing.shutdown()

    assert sink_batch_span("timeseries", 1, 2, 2) is sink_batch_span("archive", 1, 2, 2)
    assert [span.name for span in exporter.get_finished_spans()] == ["sink.write timeseries"]


# --- sink batch writes ------------------------------------------------------------------------


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool", [SINK], fsync=False)
    spool.open()
    yield spool
    spool.close()


async def append_all(spool: Spool, values: range) -> list[int]:
    seqs = [spool.append(TOPIC, telemetry(value), time.time_ns() // 1000) for value in values]
    await spool.commit()
    return seqs


async def test_a_batch_write_is_a_span_with_the_sink_count_and_spool_positions(
    exporter: InMemorySpanExporter, spool: Spool
) -> None:
    sink = RecordingSink()
    runner = make_runner(sink, spool, Parked(spool), batch_max=50)
    seqs = await append_all(spool, range(10))
    async with running(runner):
        await until(lambda: spool.confirmed[SINK] == seqs[-1], "the batch confirmed")

    [span] = spans_named(exporter, "sink.write")
    assert span.name == f"sink.write {SINK}"
    assert dict(span.attributes or {}) == {
        "iotmeter.sink": SINK,
        "iotmeter.batch.records": 10,
        "iotmeter.spool.first_seq": seqs[0],
        "iotmeter.spool.last_seq": seqs[-1],
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "iotmeter"


async def test_a_failed_batch_write_is_an_error_span_with_the_exception(
    exporter: InMemorySpanExporter, spool: Spool
) -> None:
    sink = RecordingSink()
    sink.outages = [BackendUnavailable("timeseries store down")]
    runner = make_runner(sink, spool, Parked(spool), batch_max=50)
    seqs = await append_all(spool, range(5))
    async with running(runner):
        await until(lambda: spool.confirmed[SINK] == seqs[-1], "the batch confirmed")

    failed, retried = spans_named(exporter, "sink.write")
    assert failed.status.status_code is StatusCode.ERROR
    [event] = failed.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"].endswith("BackendUnavailable")
    assert "timeseries store down" in str((event.attributes or {})["exception.message"])
    assert retried.status.status_code is StatusCode.UNSET
    for span in (failed, retried):
        attributes = span.attributes or {}
        assert attributes["iotmeter.spool.first_seq"] == seqs[0]
        assert attributes["iotmeter.spool.last_seq"] == seqs[-1]
        assert attributes["iotmeter.batch.records"] == 5


# --- deliveries ---------------------------------------------------------------------------------


def test_a_failed_delivery_is_an_error_span_with_its_status_code(
    exporter: InMemorySpanExporter,
) -> None:
    with delivery_span("webhook", 7, "msg_abc") as trace:
        trace.outcome(False, 503, "the receiver answered 503")

    [span] = exporter.get_finished_spans()
    assert span.name == "alert.deliver webhook"
    assert span.kind is SpanKind.CLIENT
    assert dict(span.attributes or {}) == {
        "iotmeter.channel.kind": "webhook",
        "iotmeter.notification.id": 7,
        "iotmeter.event.id": "msg_abc",
        "iotmeter.delivery.outcome": "failed",
        "http.response.status_code": 503,
    }
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "the receiver answered 503"


# --- HTTP requests --------------------------------------------------------------------------------


async def thing(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.path_params["thing_id"])


async def unavailable(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("later", status_code=503)


async def broken(_request: Request) -> PlainTextResponse:
    raise RuntimeError("bug in a route")


def small_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/things/{thing_id}", thing),
            Route("/unavailable", unavailable),
            Route("/broken", broken),
        ],
        middleware=[Middleware(TracingMiddleware)],
    )


async def request(path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=small_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers)


async def test_a_request_span_is_named_by_its_route_template_not_its_path(
    exporter: InMemorySpanExporter,
) -> None:
    assert (await request("/things/dev-42")).status_code == 200

    [span] = exporter.get_finished_spans()
    assert span.name == "GET /things/{thing_id}"
    assert span.kind is SpanKind.SERVER
    assert dict(span.attributes or {}) == {
        "http.request.method": "GET",
        "url.path": "/things/dev-42",
        "http.route": "/things/{thing_id}",
        "http.response.status_code": 200,
    }
    assert span.parent is None


async def test_a_request_continues_the_trace_of_its_traceparent(
    exporter: InMemorySpanExporter,
) -> None:
    await request("/things/a", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})

    [span] = exporter.get_finished_spans()
    assert span.context is not None
    assert span.parent is not None
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert span.parent.is_remote


async def test_an_unmatched_path_and_an_unknown_method_make_no_new_span_names(
    exporter: InMemorySpanExporter,
) -> None:
    assert (await request("/nothing/here/123")).status_code == 404
    transport = httpx.ASGITransport(app=small_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await client.request("BREW", "/things/pot")

    unmatched, brew = exporter.get_finished_spans()
    assert unmatched.name == "GET"
    assert "http.route" not in (unmatched.attributes or {})
    assert (unmatched.attributes or {})["http.response.status_code"] == 404
    assert unmatched.status.status_code is StatusCode.UNSET
    assert brew.name == "HTTP /things/{thing_id}"
    assert (brew.attributes or {})["http.request.method"] == "_OTHER"


async def test_a_server_error_marks_the_span_as_an_error(
    exporter: InMemorySpanExporter,
) -> None:
    assert (await request("/unavailable")).status_code == 503
    assert (await request("/broken")).status_code == 500

    unavailable, broken = exporter.get_finished_spans()
    assert unavailable.status.status_code is StatusCode.ERROR
    assert (unavailable.attributes or {})["http.response.status_code"] == 503
    assert broken.status.status_code is StatusCode.ERROR
    assert (broken.attributes or {})["http.response.status_code"] == 500
    assert [event.name for event in broken.events] == ["exception"]
