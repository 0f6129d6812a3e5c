"""What tracing costs: `python bench/tracing_cost.py [spans] [requests]`.

`python bench/tracing_cost.py --receive PORT` only runs the counting OTLP receiver on
127.0.0.1:PORT until SIGTERM or Ctrl-C, and prints how many spans it got: the endpoint for a
whole-app comparison (`bench/harness.py --compare-env IOTMETER_OTLP_ENDPOINT=http://...`).

Per `sink_batch_span` call (the ingest hot path: one call per batch a sink writes):
- off (the shared no-op),
- on, each span handed to an in-memory exporter as it ends (what the tests use),
- on as in production: a `BatchSpanProcessor` exporting over OTLP/HTTP (protobuf, in its own
  thread) to a local receiver that answers 200 and counts the spans it got.

Per HTTP request (httpx `ASGITransport` against a one-route Starlette app, sequential):
- off (no middleware, as the app is built with tracing off), and on as in production.

Prints the best of three runs of each; the difference between off and on is the cost. The
span loop makes spans far faster than the exporter sends them (the ingest makes one per batch, a
few hundred per second at most): the processor's queue (2048) fills and it drops spans, counted
in the output, rather than slow the caller down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from iotmeter.config import Settings
from iotmeter.observability.tracing import TracingMiddleware, sink_batch_span, start_tracing

RUNS = 3


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that only counts the spans it is sent."""

    spans = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        count = sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
        )
        with Collector.lock:
            Collector.spans += count
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def otlp_receiver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def tracing(endpoint: str | None, exporter: SpanExporter | None = None) -> Iterator[None]:
    """Tracing on for the block (off when `endpoint` is None), shut down (flushed) after."""
    started = start_tracing(Settings(otlp_endpoint=endpoint), exporter)
    try:
        yield
    finally:
        if started is not None:
            started.shutdown()


def best_of(run: Callable[[], float]) -> float:
    return min(run() for _ in range(RUNS))


def time_spans(count: int) -> float:
    """Seconds per `sink_batch_span` call, entered and left around nothing."""
    started = time.perf_counter()
    for seq in range(0, count * 500, 500):
        with sink_batch_span("timeseries", 500, seq + 1, seq + 500):
            pass
    return (time.perf_counter() - started) / count


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.path_params["thing_id"])


async def time_requests(count: int, traced: bool) -> float:
    """Seconds per request (sequential) through httpx's ASGI transport."""
    middleware = [Middleware(TracingMiddleware)] if traced else []
    app = Starlette(routes=[Route("/things/{thing_id}", hello)], middleware=middleware)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        await client.get("/things/warm-up")
        started = time.perf_counter()
        for n in range(count):
            response = await client.get(f"/things/dev-{n}")
            if response.status_code != 200:
                raise SystemExit(f"request {n}: {response.status_code}")
        return (time.perf_counter() - started) / count


def receive(port: int) -> None:
    """Count spans sent to 127.0.0.1:`port` until SIGTERM or Ctrl-C."""
    server = ThreadingHTTPServer(("127.0.0.1", port), Collector)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print(f"OTLP receiver on port {port}: {Collector.spans:,} spans received", flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--receive":
        receive(int(sys.argv[2]))
        return
    # The drops are counted below; one warning line per drop would drown the numbers.
    logging.getLogger("opentelemetry.sdk").setLevel(logging.ERROR)
    spans = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 5_000
    print(f"sink_batch_span, {spans:,} calls, best of {RUNS}:")
    off = best_of(lambda: time_spans(spans))
    print(f"  off                          {off * 1e9:9.0f} ns/call")
    memory = InMemorySpanExporter()
    with tracing("http://unused", memory):

        def in_memory() -> float:
            memory.clear()
            return time_spans(spans)

        on_memory = best_of(in_memory)
    memory.clear()
    print(f"  on, in-memory exporter       {on_memory * 1e9:9.0f} ns/call")
    with otlp_receiver() as endpoint:
        Collector.spans = 0
        with tracing(endpoint):
            on_otlp = best_of(lambda: time_spans(spans))
        exported = Collector.spans
    print(
        f"  on, batched OTLP/HTTP        {on_otlp * 1e9:9.0f} ns/call "
        f"({exported:,} of {spans * RUNS:,} spans reached the receiver)"
    )

    print(f"HTTP request through the middleware, {requests:,} sequential requests, best of {RUNS}:")
    plain = best_of(lambda: asyncio.run(time_requests(requests, traced=False)))
    print(f"  off (no middleware)          {plain * 1e6:9.1f} us/request")
    with otlp_receiver() as endpoint:
        Collector.spans = 0
        with tracing(endpoint):
            traced = best_of(lambda: asyncio.run(time_requests(requests, traced=True)))
        exported = Collector.spans
    print(
        f"  on, batched OTLP/HTTP        {traced * 1e6:9.1f} us/request "
        f"(+{(traced - plain) * 1e6:.1f} us; {exported:,} of {(requests + 1) * RUNS:,} "
        "spans reached the receiver)"
    )


if __name__ == "__main__":
    main()
