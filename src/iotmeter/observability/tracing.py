"""OpenTelemetry traces (optional; off unless `IOTMETER_OTLP_ENDPOINT` is set).

Spans: one per HTTP request (`TracingMiddleware`), one per batch a sink writes
(`sink_batch_span`), one per alert delivery (`delivery_span`); exported over OTLP/HTTP.

The base install has no OpenTelemetry: it is imported only once tracing is turned on
(`start_tracing`), so each on-path below imports what it needs inside the function. Off, the
span functions return a shared no-op context manager: the ingest hot path pays one global
lookup and one branch, and allocates nothing.

The spans go to a `TracerProvider` of our own; the process-wide (global) provider is never set,
so two apps in one process (tests) do not share or leak theirs. Incoming W3C `traceparent`
headers are honoured through the global propagator of opentelemetry-api (`OTEL_PROPAGATORS`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from iotmeter import __version__
from iotmeter.api.asgi import KNOWN_METHODS, ResponseStatus, route_template
from iotmeter.config import Settings, env_name
from iotmeter.errors import SettingsInvalid

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

SERVICE_NAME = "iotmeter"

FLUSH_TIMEOUT_MS = 2000
EXPORT_TIMEOUT_S = 5
_OFF: AbstractContextManager[None] = contextlib.nullcontext()
_tracer: Tracer | None = None
"""The tracer of the running `Tracing`; None while tracing is off."""


class Tracing:
    """Tracing turned on (by `start_tracing`); `shutdown` exports what is left and turns it off."""

    def __init__(self, provider: TracerProvider, tracer: Tracer) -> None:
        self.provider = provider
        self.tracer = tracer

    def shutdown(self) -> None:
        """Turn the module back off, then flush and stop the exporter (blocks for up to the
        exporter's timeout: call it off the event loop)."""
        global _tracer
        if _tracer is self.tracer:
            _tracer = None
        # Bounded: a collector that takes the connection and never answers must not hold the
        # process's exit for the SDK's 30 s.
        self.provider.force_flush(timeout_millis=FLUSH_TIMEOUT_MS)
        self.provider.shutdown()


def start_tracing(settings: Settings, exporter: SpanExporter | None = None) -> Tracing | None:
    """Turn tracing on when `otlp_endpoint` is set (None: it stays off). Spans go to `exporter`
    one by one when given (tests: an in-memory exporter), else in batches to the endpoint."""
    global _tracer
    endpoint = settings.otlp_endpoint
    if not endpoint:
        return None
    if _tracer is not None:
        raise RuntimeError("tracing is already on in this process; shut that one down first")
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise SettingsInvalid(
            f"{env_name('otlp_endpoint')} is set, but OpenTelemetry is not installed "
            f"(no module {exc.name!r}): install the tracing extra with "
            "`pip install 'iotmeter[tracing]'`, or unset the variable"
        ) from exc
    resource = Resource.create({"service.name": SERVICE_NAME, "service.version": __version__})
    # Shut down by `Tracing.shutdown` (the app's lifespan), not at interpreter exit.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        otlp = OTLPSpanExporter(
            endpoint=f"{endpoint.rstrip('/')}/v1/traces", timeout=EXPORT_TIMEOUT_S
        )
        provider.add_span_processor(BatchSpanProcessor(otlp))
    tracer = provider.get_tracer("iotmeter", __version__)
    _tracer = tracer
    return Tracing(provider, tracer)


def sink_batch_span(
    sink: str, records: int, first_seq: int, last_seq: int
) -> AbstractContextManager[object]:
    """A span around one batch write of a sink (attributes: sink, records, spool positions);
    an exception out of the write is recorded on it and marks it as an error."""
    tracer = _tracer
    if tracer is None:
        return _OFF
    return _sink_span(
        tracer,
        f"sink.write {sink}",
        {
            "iotmeter.sink": sink,
            "iotmeter.batch.records": records,
            "iotmeter.spool.first_seq": first_seq,
            "iotmeter.spool.last_seq": last_seq,
        },
    )


@contextlib.contextmanager
def _sink_span(tracer: Tracer, name: str, attributes: dict[str, str | int]) -> Iterator[Span]:
    """The SDK would record the exception's message and stack as they are: a store's error may
    hold a URL with its password. The exception is recorded here, masked as the log masks it."""
    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except Exception as exc:
            _record_error(span, exc)
            raise


def _record_error(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    from iotmeter.logging import redact

    message = redact(str(exc))
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    span.add_event("exception", {"exception.type": kind, "exception.message": message})
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {message}"))


class DeliveryTrace:
    """What the span of an alert delivery is told of its outcome (nothing, with tracing off)."""

    __slots__ = ("_span",)

    def __init__(self, span: Span | None) -> None:
        self._span = span

    def outcome(self, delivered: bool, status_code: int | None, error: str | None) -> None:
        span = self._span
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("iotmeter.delivery.outcome", "delivered" if delivered else "failed")
        if status_code is not None:
            span.set_attribute("http.response.status_code", status_code)
        if not delivered:
            from iotmeter.logging import redact

            span.set_status(Status(StatusCode.ERROR, redact(error) if error else None))


_OFF_DELIVERY: AbstractContextManager[DeliveryTrace] = contextlib.nullcontext(DeliveryTrace(None))


def delivery_span(
    channel_kind: str, notification_id: int, event_id: str
) -> AbstractContextManager[DeliveryTrace]:
    """A span around one delivery attempt of a notification; tell it the outcome."""
    tracer = _tracer
    if tracer is None:
        return _OFF_DELIVERY
    return _delivery(tracer, channel_kind, notification_id, event_id)


@contextlib.contextmanager
def _delivery(
    tracer: Tracer, channel_kind: str, notification_id: int, event_id: str
) -> Iterator[DeliveryTrace]:
    from opentelemetry.trace import SpanKind

    with tracer.start_as_current_span(
        f"alert.deliver {channel_kind}",
        kind=SpanKind.CLIENT,
        record_exception=False,
        attributes={
            "iotmeter.channel.kind": channel_kind,
            "iotmeter.notification.id": notification_id,
            "iotmeter.event.id": event_id,
        },
    ) as span:
        yield DeliveryTrace(span)


class TracingMiddleware:
    """A span per HTTP request, named `<METHOD> <route template>` (`GET
    /api/v1/devices/{device_id}`: never the raw path, whose ids would make every name unique),
    continuing the trace of an incoming `traceparent`. Installed only when tracing is on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = _tracer
        if tracer is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._traced(tracer, scope, receive, send)

    async def _traced(self, tracer: Tracer, scope: Scope, receive: Receive, send: Send) -> None:
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        carrier = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        # Any other method is `_OTHER` (span name `HTTP`), as the conventions say.
        method: str = scope["method"] if scope["method"] in KNOWN_METHODS else "_OTHER"
        name = method if method != "_OTHER" else "HTTP"
        status = ResponseStatus(send)
        with tracer.start_as_current_span(
            name,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
            record_exception=False,
        ) as span:
            raised = False
            try:
                await self.app(scope, receive, status)
            except Exception as exc:
                raised = True
                _record_error(span, exc)
                raise
            finally:
                # Known only now: the router put the matched route in the scope. Without one
                # (no route matched) the name stays the bare method, as the conventions say.
                route = route_template(scope)
                if route is not None:
                    span.update_name(f"{name} {route}")
                    span.set_attribute("http.route", route)
                # An exception escaping with no response started becomes a 500 further out.
                answered = status.code if status.code is not None else 500
                span.set_attribute("http.response.status_code", answered)
                if answered >= 500 and not raised:
                    span.set_status(Status(StatusCode.ERROR))
