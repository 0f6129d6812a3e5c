"""`GET /metrics`: Prometheus metrics on the API port (a viewer key reads them when the API's
authentication is on; `IOTMETER_METRICS_PORT` serves them without keys on a port of its own)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from iotmeter.api.deps import StateDep
from iotmeter.errors import NotFound
from iotmeter.observability.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Text format 0.0.4."}},
)
async def metrics(state: StateDep) -> Response:
    """Ingest, sink, spool, MQTT, HTTP, registry and process metrics in Prometheus' text
    format. No label names a device: per-device counts are at `/api/v1/stats/devices`."""
    if state.metrics is None:
        raise NotFound("metrics are off (IOTMETER_METRICS_ENABLED=false)")
    body = state.metrics.exposition()
    return Response(content=body, media_type=CONTENT_TYPE)
