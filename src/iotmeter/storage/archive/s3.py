"""The production archive: one object per reading set in an S3-compatible bucket.

One aiobotocore client lives as long as the store (open it with `S3ArchiveStore.open` or
`open_s3_store`). Every botocore/aiohttp failure leaves this module as `BackendUnavailable`
naming the endpoint and bucket, except a missing key, which is `NotFound`.

S3 down at start-up does not stop the app: `open` logs a warning and the bucket check (and
creation) is retried by the next call, which raises `BackendUnavailable` while S3 stays away.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit
from xml.etree import ElementTree

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import SecretStr
from yarl import URL

from iotmeter.config import Settings, env_name
from iotmeter.errors import BackendUnavailable, NotFound, SettingsInvalid
from iotmeter.readings import ReadingSet
from iotmeter.retry import Backoff
from iotmeter.storage.archive.base import ArchivedMessage, ArchivePage
from iotmeter.storage.archive.document import encode_archive_document, key_bound, key_prefix
from iotmeter.storage.archive.local import check_device_id, checked_key, checked_object_key
from iotmeter.storage.archive.sigv4 import PutSigner, host_header

if TYPE_CHECKING:
    from iotmeter.storage.archive.base import ArchiveStore

logger = logging.getLogger(__name__)

# Small PUTs are latency-bound: SeaweedFS and MinIO reach their rate at 32-64 in flight.
DEFAULT_CONCURRENCY = 64
STARTUP_CHECK_S = 5.0
"""How long start-up waits for the bucket check before going on without it."""
_LIST_PAGE_MAX = 1000  # S3 never returns more keys per ListObjectsV2 call.
_VENDOR_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)
_MISSING_BUCKET = frozenset({"404", "NoSuchBucket", "NotFound"})
_MISSING_KEY = frozenset({"404", "NoSuchKey", "NotFound"})


def _error_code(exc: BaseException | None) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    if isinstance(exc, _PutRefused):
        return exc.code
    return ""


def _without_credentials(url: str) -> str:
    """The URL as safe to show: any `user:password@` part dropped."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _secret(value: SecretStr | str) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class _PutRefused(Exception):
    """S3 answered a PutObject with an error status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code or status}: {message or 'no message'} (HTTP {status})")
        self.status = status
        self.code = code


_RETRIED_STATUSES = frozenset({500, 502, 503, 504})


class SignedPut:
    """PutObject without botocore's request pipeline, for the archive's many small writes.

    aiobotocore spends about 0.9 ms of CPU per PutObject here (event hooks, endpoint rules,
    user-agent assembly, signing, response parsing): one core then caps the archive near 1,000
    objects/s, below what the store takes. This path signs each request itself (`PutSigner`,
    checked against botocore's signer) and sends it with aiohttp, the HTTP library aiobotocore
    itself uses (bench/bench_archive.py has both costs). Everything else (bucket checks,
    listing, reading) stays on aiobotocore. Transient failures (5xx, connection errors) are
    retried `max_attempts` times, like botocore's standard mode.
    """

    def __init__(
        self,
        *,
        endpoint_url: str,
        bucket: str,
        region: str,
        access_key: str,
        secret_key: str,
        concurrency: int,
        connect_timeout: float,
        read_timeout: float,
        max_attempts: int,
    ) -> None:
        endpoint = _without_credentials(endpoint_url).rstrip("/")
        self._endpoint = endpoint
        self._bucket_path = f"{urlsplit(endpoint).path}/{quote(bucket, safe='')}/"
        self._signer = PutSigner(
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            host=host_header(endpoint),
        )
        self._max_attempts = max(1, max_attempts)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout),
            auto_decompress=False,
        )

    async def close(self) -> None:
        await self._session.close()

    async def put(self, key: str, body: bytes, content_type: str) -> None:
        """Store `body` under `key`; `_PutRefused`, `aiohttp.ClientError` or `OSError` if not."""
        path = self._bucket_path + quote(key, safe="/~")
        # Sent exactly as signed: no re-quoting of the path by the HTTP client.
        url = URL(urlunsplit((*urlsplit(self._endpoint)[:2], path, "", "")), encoded=True)
        # A few quick tries of one object: a batch whose last PUT fails is written whole again
        # by the sink's runner (harmless, keyed), which costs far more than a retry here.
        backoff = Backoff(f"S3 PUT {key}", initial=0.1, cap=1.0, quiet=True)
        for attempt in range(1, self._max_attempts + 1):
            headers = self._signer.headers(path, body, content_type)
            try:
                async with self._session.put(url, data=body, headers=headers) as response:
                    if response.status < 300:
                        await response.read()
                        return
                    error = await response.read()
                    refused = _PutRefused(response.status, *_s3_error(error))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if attempt == self._max_attempts:
                    raise
                await backoff.wait(exc)
                continue
            if response.status not in _RETRIED_STATUSES or attempt == self._max_attempts:
                raise refused
            await backoff.wait(refused)


async def _check_bucket_at_start(store: S3ArchiveStore) -> None:
    """Check (or create) the bucket, but never hold start-up for long: an endpoint that accepts
    and never answers must not keep the app (and a Ctrl-C) waiting for the whole read timeout.
    What fails here is tried again on first use."""
    try:
        async with asyncio.timeout(STARTUP_CHECK_S):
            await store.ensure_bucket()
    except BackendUnavailable as exc:
        logger.warning("%s; the archive retries on first use", exc.message)
    except TimeoutError:
        logger.warning(
            "S3 archive at %s (bucket %s): no answer within %.0f s at start-up; "
            "the archive retries on first use",
            store.endpoint_url,
            store.bucket,
            STARTUP_CHECK_S,
        )


def _client_config(concurrency: int, connect_timeout: float, read_timeout: float) -> AioConfig:
    return AioConfig(
        s3={"addressing_style": "path"},
        # No retries inside botocore: the project's one policy retries (the sink runner for
        # writes; a read answers 503 and the client tries again).
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # One pooled connection per concurrent upload (botocore's default pool is 10).
        max_pool_connections=concurrency,
        # Checksums only where S3 demands them: S3-compatible servers differ in support
        # for the newer default (CRC trailers on every upload).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Load the service model in a thread, not on the event loop.
        warm_up_loader_caches=True,
    )


def _s3_error(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 XML error body; empty strings when it has none."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", body[:200].decode(errors="replace")
    return root.findtext("Code") or "", root.findtext("Message") or ""


class S3ArchiveStore:
    """Archive in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS...)."""

    backend = "s3"

    def __init__(
        self,
        client: Any,
        *,
        bucket: str,
        endpoint_url: str,
        region: str = "us-east-1",
        concurrency: int = DEFAULT_CONCURRENCY,
        signed_put: SignedPut | None = None,
    ) -> None:
        """Wrap an open aiobotocore S3 client; use `open` to get one with the right settings
        (and the faster `SignedPut` for writes)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 (got {concurrency})")
        self._client = client
        self._signed_put = signed_put
        self.bucket = bucket
        self.endpoint_url = _without_credentials(endpoint_url)
        self.region = region
        self.concurrency = concurrency
        self._bucket_ready = False
        self._bucket_lock = asyncio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        *,
        endpoint_url: str,
        bucket: str,
        access_key: SecretStr | str,
        secret_key: SecretStr | str,
        region: str = "us-east-1",
        concurrency: int = DEFAULT_CONCURRENCY,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        max_attempts: int = 3,
    ) -> AsyncIterator[S3ArchiveStore]:
        """A store with its own client; checks (or creates) the bucket, tolerating S3 down."""
        config = _client_config(concurrency, connect_timeout, read_timeout)
        session = get_session()
        async with (
            contextlib.AsyncExitStack() as stack,
            session.create_client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                aws_access_key_id=_secret(access_key),
                aws_secret_access_key=_secret(secret_key),
                config=config,
            ) as client,
        ):
            signed_put = SignedPut(
                endpoint_url=endpoint_url,
                bucket=bucket,
                region=region,
                access_key=_secret(access_key),
                secret_key=_secret(secret_key),
                concurrency=concurrency,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_attempts=max_attempts,
            )
            stack.push_async_callback(signed_put.close)
            store = cls(
                client,
                bucket=bucket,
                endpoint_url=endpoint_url,
                region=region,
                concurrency=concurrency,
                signed_put=signed_put,
            )
            await _check_bucket_at_start(store)
            yield store

    def _unavailable(self, operation: str, exc: BaseException) -> BackendUnavailable:
        reason = str(exc) or type(exc).__name__
        return BackendUnavailable(
            f"S3 archive at {self.endpoint_url} (bucket {self.bucket}): {operation} failed: "
            f"{reason}",
            details={"endpoint": self.endpoint_url, "bucket": self.bucket},
        )

    @contextlib.contextmanager
    def _calling(self, operation: str) -> Iterator[None]:
        """Turn vendor errors into `BackendUnavailable`; a vanished bucket is checked again."""
        try:
            yield
        except (*_VENDOR_ERRORS, _PutRefused) as exc:
            code = _error_code(exc)
            if code == "NoSuchBucket" or (operation == "HeadBucket" and code in _MISSING_BUCKET):
                self._bucket_ready = False
            raise self._unavailable(operation, exc) from exc

    async def ensure_bucket(self) -> None:
        """Check the bucket, creating it when missing (once; again after it vanished)."""
        if self._bucket_ready:
            return
        async with self._bucket_lock:
            if self._bucket_ready:
                return
            try:
                await self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _error_code(exc) not in _MISSING_BUCKET:
                    raise self._unavailable("HeadBucket", exc) from exc
                await self._create_bucket()
            except _VENDOR_ERRORS as exc:
                raise self._unavailable("HeadBucket", exc) from exc
            self._bucket_ready = True

    async def _create_bucket(self) -> None:
        options: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            options["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            await self._client.create_bucket(**options)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise self._unavailable("CreateBucket", exc) from exc
        except _VENDOR_ERRORS as exc:
            raise self._unavailable("CreateBucket", exc) from exc
        else:
            logger.info("created bucket %s at %s", self.bucket, self.endpoint_url)

    async def put(self, readings: Sequence[ReadingSet]) -> None:
        """Archive each reading set under its `archive_key`; a repeated key overwrites."""
        documents: list[tuple[str, bytes]] = []
        for reading in readings:
            key = reading.archive_key
            checked_key(key)
            documents.append((key, encode_archive_document(reading)))
        await self._put_all(documents, "application/json")

    async def put_objects(self, objects: Iterable[tuple[str, bytes]]) -> None:
        """Write whole objects (segments of the segment layout); a repeated key overwrites.
        Taken from `objects` as the uploads go: a generator keeps only those in flight."""

        def checked() -> Iterator[tuple[str, bytes]]:
            for key, body in objects:
                checked_object_key(key)
                yield key, body

        await self._put_all(checked(), "application/x-ndjson")

    async def _put_all(self, documents: Iterable[tuple[str, bytes]], content_type: str) -> None:
        pending = iter(documents)
        first = next(pending, None)
        if first is None:
            return
        await self.ensure_bucket()
        pending = itertools.chain([first], pending)

        async def upload() -> None:
            # Workers share one iterator: at most `concurrency` requests in flight, and no
            # task per document for large batches.
            for key, body in pending:
                with self._calling("PutObject"):
                    if self._signed_put is not None:
                        await self._signed_put.put(key, body, content_type)
                    else:
                        await self._client.put_object(
                            Bucket=self.bucket, Key=key, Body=body, ContentType=content_type
                        )

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.concurrency):
                    group.create_task(upload())
        except ExceptionGroup as failures:
            if all(isinstance(exc, BackendUnavailable) for exc in failures.exceptions):
                raise failures.exceptions[0] from None
            raise

    async def list_objects(
        self, device_id: str, start_after: str, limit: int
    ) -> builtins.list[str]:
        """Segment object keys of a device sorting after `start_after`, in order."""
        check_device_id(device_id)
        await self.ensure_bucket()
        keys: list[str] = []
        while len(keys) < limit:
            with self._calling("ListObjectsV2"):
                response = await self._client.list_objects_v2(
                    Bucket=self.bucket,
                    Prefix=key_prefix(device_id),
                    StartAfter=start_after,
                    MaxKeys=min(_LIST_PAGE_MAX, limit - len(keys)),
                )
            contents = [item["Key"] for item in response.get("Contents", [])]
            keys.extend(key for key in contents if key.endswith((".ndjson", ".ndjson.gz")))
            if not response.get("IsTruncated") or not contents:
                break
            start_after = contents[-1]
        return keys[:limit]

    async def get_object(self, key: str) -> bytes:
        try:
            checked_object_key(key)
        except ValueError:
            raise NotFound(f"no archive object {key!r}") from None
        return await self._get_body(key)

    async def _get_body(self, key: str) -> bytes:
        await self.ensure_bucket()
        try:
            with self._calling("GetObject"):
                response = await self._client.get_object(Bucket=self.bucket, Key=key)
                async with response["Body"] as stream:
                    body: bytes = await stream.read()
        except BackendUnavailable as exc:
            if _error_code(exc.__cause__) in _MISSING_KEY:
                raise NotFound(f"no archived object {key!r}") from None
            raise
        return body

    async def list(
        self,
        device_id: str,
        start_us: int,
        stop_us: int,
        *,
        limit: int,
        after: str | None = None,
    ) -> ArchivePage:
        """Keys of a device's archived messages with time in [start, stop), oldest first."""
        check_device_id(device_id)
        if limit < 1:
            raise ValueError(f"limit must be at least 1 (got {limit})")
        high = key_bound(device_id, stop_us)
        # StartAfter is exclusive, and that is right for the bound itself: no key equals it
        # (every key continues with `_{tie}.json`), so a key at exactly start_us is included.
        start_after = key_bound(device_id, start_us)
        if after is not None and after > start_after:
            start_after = after
        if start_after >= high:
            return ArchivePage(keys=[], next_cursor=None)
        await self.ensure_bucket()
        keys: list[str] = []
        # One key more than asked tells whether another page exists.
        while len(keys) <= limit:
            with self._calling("ListObjectsV2"):
                response = await self._client.list_objects_v2(
                    Bucket=self.bucket,
                    Prefix=key_prefix(device_id),
                    StartAfter=start_after,
                    MaxKeys=min(_LIST_PAGE_MAX, limit + 1 - len(keys)),
                )
            contents = response.get("Contents", [])
            page = [item["Key"] for item in contents if item["Key"] < high]
            # Only per-message objects: segments (.ndjson) are listed by `list_objects`.
            keys.extend(key for key in page if key.endswith(".json"))
            if len(page) < len(contents) or not response.get("IsTruncated") or not page:
                break
            start_after = page[-1]
        if len(keys) > limit:
            return ArchivePage(keys=keys[:limit], next_cursor=keys[limit - 1])
        return ArchivePage(keys=keys, next_cursor=None)

    async def get(self, key: str) -> ArchivedMessage:
        """One archived message; `NotFound` when there is no such key (or it is no valid key)."""
        try:
            device_id, _, epoch_us = checked_key(key)
        except ValueError:
            raise NotFound(f"no archived message {key!r}") from None
        try:
            body = await self._get_body(key)
        except NotFound:
            raise NotFound(f"no archived message {key!r}") from None
        return ArchivedMessage(key=key, device_id=device_id, epoch_us=epoch_us, body=body)

    async def health(self) -> str | None:
        """`endpoint/bucket` when the bucket answers; `BackendUnavailable` when not."""
        if self._bucket_ready:
            with self._calling("HeadBucket"):
                await self._client.head_bucket(Bucket=self.bucket)
        else:
            await self.ensure_bucket()
        return f"{self.endpoint_url}/{self.bucket}"


@asynccontextmanager
async def open_s3_store(
    settings: Settings, *, concurrency: int = DEFAULT_CONCURRENCY
) -> AsyncIterator[S3ArchiveStore]:
    """The S3 archive the settings describe (`IOTMETER_S3_*`)."""
    if not settings.s3_endpoint_url:
        raise SettingsInvalid(f"{env_name('s3_endpoint_url')} is not set")
    if settings.s3_access_key is None or settings.s3_secret_key is None:
        raise SettingsInvalid(
            f"{env_name('s3_access_key')} and {env_name('s3_secret_key')} are required "
            "for the S3 archive"
        )
    async with S3ArchiveStore.open(
        endpoint_url=settings.s3_endpoint_url,
        bucket=settings.s3_bucket,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        region=settings.s3_region,
        concurrency=concurrency,
    ) as store:
        yield store


if TYPE_CHECKING:

    def _satisfies_protocol(store: S3ArchiveStore) -> ArchiveStore:
        return store
