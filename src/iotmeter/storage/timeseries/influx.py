"""The production time-series store: InfluxDB 2.x (measurement `iot_telemetry`, one bucket).

Writes are plain HTTP POSTs of line protocol to `/api/v2/write?precision=us` (our own aiohttp
session): that keeps the status, the JSON error body and `Retry-After` in hand. Queries go through
`influxdb-client`'s `InfluxDBClientAsync` (Flux in, annotated CSV parsed into records).

Errors leave this module as the project's own:
- `InfluxUnavailable` (a `BackendUnavailable`): connection refused or reset, timeout, 5xx, 429
  (with `retry_after` from the `Retry-After` header), 401/403 (the token), 404 (org or bucket).
  Nothing was refused for its content: retry the same batch later.
- `InfluxRejected`: InfluxDB refused some reading sets for their content (400/422: a field type
  conflict, a line it cannot parse; 413 for a single line). `write()` finds them by splitting the
  batch in halves until each refused reading set stands alone, writes every other one, then raises
  with the refused ones only (`rejected=[(reading, message), ...]`) for the dead-letter store.
- `InfluxQueryFailed`: InfluxDB refused a query (a Flux error); retrying would not help.

Retention is the bucket's own (InfluxDB expires whole shard groups): at open, `ensure_bucket`
looks the bucket up and creates it, when missing and the token may, with
`IOTMETER_TELEMETRY_RETENTION_DAYS` as its retention period. An existing bucket is never changed:
a retention that differs from the setting is logged with the `influx` command that changes it.
A token that may not list or create buckets only loses that check (logged); writes go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gzip as gzip_codec
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import aiohttp
from influxdb_client.client.flux_csv_parser import FluxCsvParserException, FluxQueryException
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.rest import ApiException
from pydantic import SecretStr

from iotmeter.config import Settings, env_name
from iotmeter.errors import (
    BackendUnavailable,
    IotmeterError,
    SettingsInvalid,
    StoreRejected,
    ValidationFailed,
)
from iotmeter.readings import ReadingSet
from iotmeter.storage.timeseries.base import SeriesPoint, SeriesQuery
from iotmeter.storage.timeseries.flux import (
    DEFAULT_LATEST_LOOKBACK_US,
    latest_query,
    oldest_query,
    range_query,
)
from iotmeter.storage.timeseries.line_protocol import MEASUREMENT, WRITE_PRECISION, encode_line
from iotmeter.storage.usage import StoreUsage

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
MAX_LINES_PER_REQUEST = 5000
"""InfluxDB's advice for batch size; larger batches are sent as several requests."""
LATEST_DEVICES_PER_QUERY = 200
"""Devices per `latest` query: keeps the Flux filter (one `or` per device) small."""

MIN_RETENTION_S = 3600
"""InfluxDB refuses a bucket retention period shorter than one hour."""
NO_SIZE_DETAIL = "InfluxDB's OSS API does not report a bucket's size"

BucketCheck = Literal["created", "matches", "differs", "unchecked"]
"""What `ensure_bucket` found: it made the bucket; the bucket's retention is the setting's; it
differs (a warning was logged); or it could not look or create (logged)."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_REFUSED_STATUSES = frozenset({400, 413, 422})
_UNREACHABLE = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class InfluxUnavailable(BackendUnavailable):
    """InfluxDB cannot take requests now (down, overloaded, or refusing our credentials)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message, details=details, retry_after=retry_after)
        self.status = status
        """The HTTP status, or None when no response came back."""


class InfluxRejected(StoreRejected):
    """InfluxDB refused these reading sets for their content; every other one was written."""

    def __init__(self, rejected: list[tuple[ReadingSet, str]], *, written: int) -> None:
        shown = "; ".join(
            f"{reading.device_id}@{reading.epoch_us}: {reason}" for reading, reason in rejected[:3]
        )
        more = f" (and {len(rejected) - 3} more)" if len(rejected) > 3 else ""
        super().__init__(
            f"InfluxDB refused {len(rejected)} reading set(s), wrote {written}: {shown}{more}",
            rejected,
            details=[
                {"device_id": reading.device_id, "epoch_us": reading.epoch_us, "reason": reason}
                for reading, reason in rejected
            ],
        )
        self.written = written
        """How many reading sets of the batch were written."""


class InfluxQueryFailed(IotmeterError):
    """InfluxDB refused a Flux query (not a connectivity problem: retrying will not help)."""

    code = "timeseries_query_failed"


class _Refusal(Exception):
    """A write request refused for its content (400/413/422): bisect to find the culprits."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header: a number of seconds or an HTTP date."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _error_message(body: bytes | str | None, fallback: str) -> str:
    """The `message` of InfluxDB's JSON error body, else the body's start, else `fallback`."""
    if not body:
        return fallback
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        decoded = json.loads(text)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("message"), str):
        return str(decoded["message"])
    return text.strip()[:500] or fallback


def _epoch_us(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def retention_seconds(days: float) -> int:
    """A bucket's `everySeconds` for a retention in days: 0 keeps data forever; InfluxDB's
    minimum (one hour) otherwise."""
    if days <= 0:
        return 0
    return max(MIN_RETENTION_S, round(days * 86_400))


def describe_retention(seconds: int) -> str:
    """`forever`, `for 30 days`, `for 36 hours`."""
    if seconds <= 0:
        return "forever"
    if seconds % 86_400 == 0:
        return f"for {seconds // 86_400} days"
    return f"for {seconds / 3600:g} hours"


def cli_duration(seconds: int) -> str:
    """A duration the `influx` CLI takes (`--retention`): `0` (forever), `30d`, `36h`, `90s`."""
    if seconds <= 0:
        return "0"
    for unit, size in (("d", 86_400), ("h", 3600)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _bucket_retention(bucket: dict[str, Any]) -> int:
    """`everySeconds` of the bucket's `expire` rule; 0 (forever) without one."""
    for rule in bucket.get("retentionRules") or []:
        if isinstance(rule, dict) and rule.get("type", "expire") == "expire":
            return int(rule.get("everySeconds") or 0)
    return 0


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    return float(value)


class InfluxTimeSeriesStore:
    """Readings in an InfluxDB 2.x bucket; create (and close) it inside a running event loop."""

    backend = "influxdb"
    tags_device_type = True

    def __init__(
        self,
        url: str,
        token: str | SecretStr,
        org: str,
        bucket: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        measurement: str = MEASUREMENT,
        gzip: bool = False,
        latest_lookback_us: int = DEFAULT_LATEST_LOOKBACK_US,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive (got {timeout})")
        self.url = url.rstrip("/")
        self.org = org
        self.bucket = bucket
        self.timeout = timeout
        self.measurement = measurement
        self.gzip = gzip
        self.latest_lookback_us = latest_lookback_us
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        self._auth = {"Authorization": f"Token {secret}"}
        # influxdb-client is only partly annotated: hold it (and its records) as Any. It is
        # created first because it refuses to be created outside a running event loop.
        self._client: Any = InfluxDBClientAsync(
            url=self.url, token=secret, org=org, timeout=int(timeout * 1000)
        )
        self._query_api: Any = self._client.query_api()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        self._closed = False
        self.retention_s: int | None = None
        """The bucket's retention period as `ensure_bucket` found or made it (0: forever;
        None: not known)."""

    async def aclose(self) -> None:
        """Close both HTTP sessions; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._client.close()
        finally:
            await self._session.close()

    def _where(self) -> str:
        return f"InfluxDB at {self.url} (org {self.org}, bucket {self.bucket})"

    def _unavailable_for_status(
        self, operation: str, status: int, message: str, retry_after: float | None
    ) -> InfluxUnavailable:
        if status in (401, 403):
            reason = (
                f"the token was refused (HTTP {status}: {message}); check "
                f"{env_name('influx_token')} and that it may read and write the bucket"
            )
        elif status == 404:
            reason = (
                f"not found (HTTP 404: {message}); check {env_name('influx_org')} and "
                f"{env_name('influx_bucket')}"
            )
        else:
            reason = f"HTTP {status}: {message}"
        return InfluxUnavailable(
            f"{self._where()}: {operation} failed: {reason}",
            retry_after=retry_after,
            status=status,
            details={"url": self.url, "status": status, "retry_after": retry_after},
        )

    def _unreachable(self, operation: str, exc: BaseException) -> InfluxUnavailable:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError):
            reason = f"no answer within {self.timeout:g} s"
        return InfluxUnavailable(
            f"{self._where()}: {operation} failed: {reason}", details={"url": self.url}
        )

    # --- Writes ----------------------------------------------------------------------------

    async def write(self, readings: Sequence[ReadingSet]) -> None:
        """Write every reading set InfluxDB accepts; `InfluxRejected` lists the refused ones."""
        rejected: list[tuple[int, ReadingSet, str]] = []
        lines: list[tuple[int, ReadingSet, bytes]] = []
        for index, reading in enumerate(readings):
            try:
                lines.append((index, reading, encode_line(reading, self.measurement)))
            except ValueError as exc:
                rejected.append((index, reading, f"cannot be written as line protocol: {exc}"))
        for start in range(0, len(lines), MAX_LINES_PER_REQUEST):
            await self._write_lines(lines[start : start + MAX_LINES_PER_REQUEST], rejected)
        if rejected:
            rejected.sort(key=lambda item: item[0])
            raise InfluxRejected(
                [(reading, reason) for _, reading, reason in rejected],
                written=len(readings) - len(rejected),
            )

    async def _write_lines(
        self,
        lines: list[tuple[int, ReadingSet, bytes]],
        rejected: list[tuple[int, ReadingSet, str]],
    ) -> None:
        """Post the lines; on a refusal, post each half again until the culprits stand alone."""
        try:
            await self._post_write(b"\n".join(line for _, _, line in lines) + b"\n")
        except _Refusal as refusal:
            if len(lines) == 1:
                index, reading, _ = lines[0]
                rejected.append((index, reading, f"HTTP {refusal.status}: {refusal.message}"))
                return
            logger.debug(
                "InfluxDB refused a batch of %d lines (%s); splitting it to find the culprits",
                len(lines),
                refusal.message,
            )
            middle = len(lines) // 2
            await self._write_lines(lines[:middle], rejected)
            await self._write_lines(lines[middle:], rejected)

    async def _post_write(self, body: bytes) -> None:
        headers = {**self._auth, "Content-Type": "text/plain; charset=utf-8"}
        if self.gzip:
            body = gzip_codec.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        params = {"org": self.org, "bucket": self.bucket, "precision": WRITE_PRECISION}
        try:
            async with self._session.post(
                f"{self.url}/api/v2/write", params=params, data=body, headers=headers
            ) as response:
                status = response.status
                payload = b"" if 200 <= status < 300 else await response.read()
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                reason = response.reason
        except _UNREACHABLE as exc:
            raise self._unreachable("write", exc) from exc
        if 200 <= status < 300:
            return
        message = _error_message(payload, reason or f"HTTP {status}")
        # InfluxDB 2.0 answered a field type conflict with 500 "partial write: ...".
        if status in _REFUSED_STATUSES or (status == 500 and "partial write" in message):
            raise _Refusal(status, message)
        raise self._unavailable_for_status("write", status, message, retry_after)

    # --- Queries ---------------------------------------------------------------------------

    async def _run(self, flux: str, on_record: Callable[[Any], None]) -> None:
        """Stream the records of a Flux query into `on_record`; vendor errors become ours."""
        try:
            records = await self._query_api.query_stream(flux)
            async for record in records:
                on_record(record)
        except ApiException as exc:
            status = int(exc.status or 0)
            message = _error_message(exc.body, exc.reason or f"HTTP {status}")
            if status in (400, 422):
                raise InfluxQueryFailed(
                    f"{self._where()} refused the query: {message}", details={"flux": flux}
                ) from exc
            if status == 0:
                raise self._unreachable("query", exc) from exc
            headers: Any = exc.headers or {}
            raise self._unavailable_for_status(
                "query", status, message, parse_retry_after(headers.get("Retry-After"))
            ) from exc
        except FluxQueryException as exc:
            raise InfluxQueryFailed(
                f"{self._where()}: the query failed: {exc.message}", details={"flux": flux}
            ) from exc
        except FluxCsvParserException as exc:
            raise self._unreachable("query", exc) from exc
        except _UNREACHABLE as exc:
            raise self._unreachable("query", exc) from exc

    async def query(self, query: SeriesQuery) -> list[SeriesPoint]:
        """Points ordered by field, then time; at most `query.limit` of them."""
        empty_fields = query.fields is not None and len(query.fields) == 0
        if query.stop_us <= query.start_us or query.limit < 1 or empty_fields:
            return []
        try:
            flux = range_query(self.bucket, query, measurement=self.measurement)
        except ValueError as exc:
            raise ValidationFailed(f"invalid time-series query: {exc}") from exc
        every = query.every_us
        points: list[SeriesPoint] = []

        def collect(record: Any) -> None:
            value = record.get_value()
            if value is None:
                return
            epoch_us = _epoch_us(record.get_time())
            if every is not None:
                # Flux starts the first window at the range start; ours are epoch-aligned.
                epoch_us -= epoch_us % every
            points.append(SeriesPoint(str(record.get_field()), epoch_us, _as_float(value)))

        await self._run(flux, collect)
        points.sort(key=lambda point: (point.field, point.epoch_us))
        return points[: query.limit]

    async def scan(
        self, device_id: str, field: str, start_us: int, stop_us: int, limit: int
    ) -> list[tuple[int, float]]:
        """One series in time order: a raw query of the one field (InfluxDB keeps each series
        in time order and `limit` applies per series)."""
        points = await self.query(
            SeriesQuery(device_id, start_us, stop_us, fields=[field], limit=limit)
        )
        return [(point.epoch_us, point.value) for point in points]

    async def latest(self, device_ids: Sequence[str]) -> dict[str, dict[str, SeriesPoint]]:
        """The newest point of each field of each device seen in the lookback window."""
        unique = list(dict.fromkeys(device_ids))
        latest: dict[str, dict[str, SeriesPoint]] = {}
        now_us = time.time_ns() // 1000

        def keep_newest(record: Any) -> None:
            value = record.get_value()
            device_id = record.values.get("device_id")
            if value is None or device_id is None:
                return
            point = SeriesPoint(
                str(record.get_field()), _epoch_us(record.get_time()), _as_float(value)
            )
            fields = latest.setdefault(str(device_id), {})
            known = fields.get(point.field)
            # A device whose type tag changed has two series per field: the newest point wins.
            if known is None or known.epoch_us < point.epoch_us:
                fields[point.field] = point

        for start in range(0, len(unique), LATEST_DEVICES_PER_QUERY):
            flux = latest_query(
                self.bucket,
                unique[start : start + LATEST_DEVICES_PER_QUERY],
                now_us=now_us,
                lookback_us=self.latest_lookback_us,
                measurement=self.measurement,
            )
            await self._run(flux, keep_newest)
        return latest

    # --- The bucket and its retention ------------------------------------------------------

    async def _api(
        self,
        method: str,
        path: str,
        operation: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> tuple[int, Any, str]:
        """(status, decoded JSON body or None, error message) of a management API call."""
        try:
            async with self._session.request(
                method, f"{self.url}{path}", params=params, json=body, headers=self._auth
            ) as response:
                status = response.status
                payload = await response.read()
                reason = response.reason
        except _UNREACHABLE as exc:
            raise self._unreachable(operation, exc) from exc
        try:
            decoded = json.loads(payload) if payload else None
        except ValueError:
            decoded = None
        return status, decoded, _error_message(payload, reason or f"HTTP {status}")

    async def _find_bucket(self) -> dict[str, Any] | None:
        """The bucket as `GET /api/v2/buckets` describes it; None when the token sees none."""
        operation = "bucket lookup"
        status, decoded, message = await self._api(
            "GET", "/api/v2/buckets", operation, params={"name": self.bucket, "org": self.org}
        )
        if status != 200:
            raise self._unavailable_for_status(operation, status, message, None)
        buckets = decoded.get("buckets") if isinstance(decoded, dict) else None
        for bucket in buckets or []:
            if isinstance(bucket, dict) and bucket.get("name") == self.bucket:
                return bucket
        return None

    async def _create_bucket(self, retention_s: int) -> tuple[int, str]:
        """POST the bucket (its org's id first); (status, message) of the creation."""
        operation = "organisation lookup"
        status, decoded, message = await self._api(
            "GET", "/api/v2/orgs", operation, params={"org": self.org}
        )
        orgs = decoded.get("orgs") if isinstance(decoded, dict) and status == 200 else None
        org_id = next(
            (org.get("id") for org in orgs or [] if isinstance(org, dict) and org.get("id")), None
        )
        if org_id is None:
            if status == 200:
                return 404, f'organization name "{self.org}" not found'
            return status, message
        rules = [{"type": "expire", "everySeconds": retention_s}] if retention_s else []
        status, _, message = await self._api(
            "POST",
            "/api/v2/buckets",
            "bucket creation",
            body={
                "orgID": str(org_id),
                "name": self.bucket,
                "retentionRules": rules,
                "description": "iotmeter readings",
            },
        )
        return status, message

    async def ensure_bucket(self, retention_days: float) -> BucketCheck:
        """Make sure the bucket exists: create it with this retention when missing (and the
        token may); log when an existing one keeps data for another period. Never raises for
        InfluxDB's answers: a store whose token may only write still works."""
        wanted_s = retention_seconds(retention_days)
        setting = env_name("telemetry_retention_days")
        if 0 < retention_days * 86_400 < MIN_RETENTION_S:
            logger.warning(
                "%s=%g is shorter than InfluxDB's minimum retention; one hour is used for a "
                "new bucket",
                setting,
                retention_days,
            )
        try:
            found = await self._find_bucket()
        except InfluxUnavailable as exc:
            if exc.status in (401, 403):
                logger.warning(
                    "%s: the token may not list buckets (HTTP %s), so iotmeter neither checks "
                    "nor sets the bucket's retention; readings are written as usual if the "
                    "token may write to the bucket",
                    self._where(),
                    exc.status,
                )
            else:
                logger.warning(
                    "%s: the bucket and its retention were not checked at start-up: %s",
                    self._where(),
                    exc.message,
                )
            return "unchecked"
        if found is None:
            return await self._create_missing(wanted_s)
        current_s = _bucket_retention(found)
        self.retention_s = current_s
        if current_s == wanted_s:
            logger.info("%s keeps data %s", self._where(), describe_retention(current_s))
            return "matches"
        logger.warning(
            "%s keeps data %s but %s=%g asks to keep it %s; iotmeter does not change an existing "
            "bucket's retention. To apply the setting run `influx bucket update --id %s "
            "--retention %s`, or set %s to match the bucket",
            self._where(),
            describe_retention(current_s),
            setting,
            retention_days,
            describe_retention(wanted_s),
            found.get("id", "<bucket id>"),
            cli_duration(wanted_s),
            setting,
        )
        return "differs"

    async def _create_missing(self, retention_s: int) -> BucketCheck:
        try:
            status, message = await self._create_bucket(retention_s)
        except InfluxUnavailable as exc:
            logger.warning(
                "%s: the bucket was not found and could not be created: %s",
                self._where(),
                exc.message,
            )
            return "unchecked"
        if status in (200, 201):
            self.retention_s = retention_s
            logger.info(
                "%s: created the bucket, keeping data %s (%s)",
                self._where(),
                describe_retention(retention_s),
                env_name("telemetry_retention_days"),
            )
            return "created"
        create = (
            f"`influx bucket create --name {self.bucket} --org {self.org} "
            f"--retention {cli_duration(retention_s)}`"
        )
        if status in (401, 403):
            logger.warning(
                "%s: the token does not see the bucket and may not create it (HTTP %d: %s). "
                "If the bucket exists, readings are written as usual (its retention is not "
                "checked); if not, create it with %s",
                self._where(),
                status,
                message,
                create,
            )
        elif status == 422 and "already exists" in message:
            # The bucket exists but this token may not read it, or another process made it.
            logger.info(
                "%s: the bucket exists (%s); its retention is not checked", self._where(), message
            )
        else:
            logger.warning(
                "%s: the bucket was not found and could not be created (HTTP %d: %s); create "
                "it with %s",
                self._where(),
                status,
                message,
                create,
            )
        return "unchecked"

    async def usage(self) -> StoreUsage:
        """The oldest reading's time (one Flux query answering one row); no size: InfluxDB's
        OSS API does not report one."""
        oldest: list[int] = []

        def keep_time(record: Any) -> None:
            moment = record.get_time()
            if moment is not None:
                oldest.append(_epoch_us(moment))

        await self._run(oldest_query(self.bucket, measurement=self.measurement), keep_time)
        detail = NO_SIZE_DETAIL
        if self.retention_s is not None:
            detail += f"; the bucket keeps data {describe_retention(self.retention_s)}"
        return StoreUsage(min(oldest) if oldest else None, None, detail)

    async def health(self) -> str | None:
        """`influxdb <version>` when `/health` says pass; `InfluxUnavailable` otherwise."""
        try:
            async with self._session.get(f"{self.url}/health") as response:
                status = response.status
                payload = await response.read()
        except _UNREACHABLE as exc:
            raise self._unreachable("health check", exc) from exc
        message = _error_message(payload, response.reason or f"HTTP {status}")
        if status != 200:
            raise self._unavailable_for_status("health check", status, message, None)
        try:
            decoded = json.loads(payload)
        except ValueError:
            decoded = {}
        version = decoded.get("version") if isinstance(decoded, dict) else None
        return f"influxdb {version}" if version else "influxdb"


@contextlib.asynccontextmanager
async def open_influx_store(
    settings: Settings, *, request_timeout_s: float = DEFAULT_TIMEOUT_S
) -> AsyncIterator[InfluxTimeSeriesStore]:
    """The store for `IOTMETER_INFLUX_*`, closed on exit; InfluxDB may be down at start-up."""
    if not settings.influx_url or settings.influx_token is None:
        raise SettingsInvalid(
            f"{env_name('influx_url')} and {env_name('influx_token')} are required for InfluxDB"
        )
    store = InfluxTimeSeriesStore(
        settings.influx_url,
        settings.influx_token,
        settings.influx_org,
        settings.influx_bucket,
        timeout=request_timeout_s,
    )
    try:
        await store.ensure_bucket(settings.telemetry_retention_days)
        yield store
    finally:
        await store.aclose()
