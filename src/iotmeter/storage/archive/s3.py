"""The production archive: one object per reading set in an S3-compatible bucket.

One aiobotocore client lives as long as the store (open it with `S3ArchiveStore.open` or
`open_s3_store`). Every botocore/aiohttp failure leaves this module as `BackendUnavailable`
naming the endpoint and bucket, except a missing key, which is `NotFound`.

S3 down at start-up does not stop the app: `open` logs a warning and the bucket check (and
creation) is retried by the next call, which raises `BackendUnavailable` while S3 stays away.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import hashlib
import itertools
import logging
import time
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
from iotmeter.storage.archive.base import (
    ArchivedMessage,
    ArchivePage,
    ArchiveWrites,
    StoredObject,
)
from iotmeter.storage.archive.bucket import BucketPolicies, LockState
from iotmeter.storage.archive.document import (
    encode_archive_document,
    key_bound,
    key_prefix,
    parse_key,
)
from iotmeter.storage.archive.local import check_device_id, checked_key, checked_object_key
from iotmeter.storage.archive.sigv4 import PutSigner, host_header
from iotmeter.storage.usage import StoreUsage

if TYPE_CHECKING:
    from iotmeter.storage.archive.base import ArchiveStore

logger = logging.getLogger(__name__)

# Small PUTs are latency-bound: SeaweedFS and MinIO reach their rate at 32-64 in flight.
DEFAULT_CONCURRENCY = 64
STARTUP_CHECK_S = 5.0
"""How long start-up waits for the bucket check before going on without it."""
_LIST_PAGE_MAX = 1000  # S3 never returns more keys per ListObjectsV2 call.
USAGE_CACHE_S = 600.0
"""`usage` lists the bucket: its answer is kept this long."""
USAGE_MAX_KEYS = 200_000
"""`usage` sums object sizes over at most this many keys (200 listing calls)."""
_STAMP = 20  # len("20260101T000000.000Z")
_VENDOR_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)
_MISSING_BUCKET = frozenset({"404", "NoSuchBucket", "NotFound"})
_MISSING_KEY = frozenset({"404", "NoSuchKey", "NotFound"})
_KEY_EXISTS = frozenset({"412", "PreconditionFailed"})
_UNSUPPORTED = frozenset(
    {"NotImplemented", "InvalidRequest", "InvalidArgument", "MethodNotAllowed", "501"}
)


def _stamp_us(stamp: str) -> int:
    return parse_key(f"x/{stamp}_x.json")[1]


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


# 409 ConditionalRequestConflict: AWS S3 answers it to a conditional PUT that raced another
# write of the key, and asks for a retry (which then finds the key: 412).
_RETRIED_STATUSES = frozenset({409, 500, 502, 503, 504})
_PRECONDITION_FAILED = 412
HASH_METADATA = "sha256"
"""User metadata holding a per-message object's SHA-256 (hex), checked by archive verify."""
HASH_METADATA_HEADER = f"x-amz-meta-{HASH_METADATA}"


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

    async def put(
        self,
        key: str,
        body: bytes,
        content_type: str,
        *,
        record_hash: bool = False,
        content_md5: bool = False,
    ) -> bool:
        """Store `body` under `key` unless the key exists (`If-None-Match: *`): True when
        written, False when the key was there already (412). `record_hash` stores the body's
        SHA-256 as the object's `x-amz-meta-sha256` (taken from the signature's payload hash:
        no second pass over the body); `content_md5` sends Content-MD5, which S3 demands of
        uploads into a bucket with Object Lock. `_PutRefused`, `aiohttp.ClientError` or
        `OSError` when S3 refuses or cannot be reached."""
        path = self._bucket_path + quote(key, safe="/~")
        # Sent exactly as signed: no re-quoting of the path by the HTTP client.
        url = URL(urlunsplit((*urlsplit(self._endpoint)[:2], path, "", "")), encoded=True)
        payload_hash = hashlib.sha256(body).hexdigest()
        extra = {"if-none-match": "*"}
        if record_hash:
            extra[HASH_METADATA_HEADER] = payload_hash
        if content_md5:
            extra["content-md5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
        # A few quick tries of one object: a batch whose last PUT fails is written whole again
        # by the sink's runner (harmless, keyed), which costs far more than a retry here.
        backoff = Backoff(f"S3 PUT {key}", initial=0.1, cap=1.0, quiet=True)
        for attempt in range(1, self._max_attempts + 1):
            headers = self._signer.headers(
                path, body, content_type, extra=extra, payload_hash=payload_hash
            )
            try:
                async with self._session.put(url, data=body, headers=headers) as response:
                    if response.status < 300:
                        await response.read()
                        return True
                    error = await response.read()
                    if response.status == _PRECONDITION_FAILED:
                        # The key exists (perhaps from our own earlier try whose answer was
                        # lost): write-once keeps it.
                        return False
                    refused = _PutRefused(response.status, *_s3_error(error))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if attempt == self._max_attempts:
                    raise
                await backoff.wait(exc)
                continue
            if response.status not in _RETRIED_STATUSES or attempt == self._max_attempts:
                raise refused
            await backoff.wait(refused)
        raise AssertionError("unreachable")  # pragma: no cover (the loop returns or raises)


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
        retention_days: float = 0,
        object_lock_days: int = 0,
    ) -> None:
        """Wrap an open aiobotocore S3 client; use `open` to get one with the right settings
        (and the faster `SignedPut` for writes). `retention_days` > 0: a lifecycle rule
        expires objects that much later (set at the bucket check when allowed);
        `object_lock_days` > 0: a bucket created here gets Object Lock with that default
        retention (governance mode)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 (got {concurrency})")
        self.retention_days = retention_days
        self.object_lock_days = object_lock_days
        self.writes = ArchiveWrites()
        self.object_lock: str = "off"
        """What the bucket check found: `off`, `governance N d`, `compliance N d`,
        `enabled without default retention` or `missing` (asked for, bucket has none)."""
        self._content_md5 = False
        self._policies_checked = False
        self._usage: tuple[float, StoreUsage] | None = None
        self._usage_lock = asyncio.Lock()
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
        retention_days: float = 0,
        object_lock_days: int = 0,
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
                retention_days=retention_days,
                object_lock_days=object_lock_days,
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
        """Check the bucket, creating it when missing (once; again after it vanished); the
        first time also its Object Lock and lifecycle (see `BucketPolicies`)."""
        if self._bucket_ready:
            return
        async with self._bucket_lock:
            if self._bucket_ready:
                return
            created = False
            try:
                await self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _error_code(exc) not in _MISSING_BUCKET:
                    raise self._unavailable("HeadBucket", exc) from exc
                created = await self._create_bucket()
            except _VENDOR_ERRORS as exc:
                raise self._unavailable("HeadBucket", exc) from exc
            if not self._policies_checked:
                policies = BucketPolicies(self)
                if not created:
                    self._use_lock_state(await policies.check_object_lock())
                await policies.check_lifecycle()
                self._policies_checked = True
            self._bucket_ready = True

    async def _create_bucket(self) -> bool:
        """Create the bucket (with Object Lock when asked); True when this call created it."""
        options: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            options["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        if self.object_lock_days > 0:
            options["ObjectLockEnabledForBucket"] = True
        try:
            await self._client.create_bucket(**options)
        except ClientError as exc:
            if _error_code(exc) == "BucketAlreadyOwnedByYou":
                return False
            if self.object_lock_days > 0 and _error_code(exc) in _UNSUPPORTED:
                logger.warning(
                    "S3 at %s cannot create bucket %s with Object Lock (%s): creating it "
                    "without; %s has no effect on this store",
                    self.endpoint_url,
                    self.bucket,
                    _error_code(exc),
                    env_name("archive_object_lock_days"),
                )
                self.object_lock_days = 0
                return await self._create_bucket()
            raise self._unavailable("CreateBucket", exc) from exc
        except _VENDOR_ERRORS as exc:
            raise self._unavailable("CreateBucket", exc) from exc
        logger.info("created bucket %s at %s", self.bucket, self.endpoint_url)
        if self.object_lock_days > 0:
            self._use_lock_state(await BucketPolicies(self).set_default_retention())
        return True

    def _use_lock_state(self, state: LockState) -> None:
        self.object_lock = state.description
        self._content_md5 = state.enabled

    @property
    def client(self) -> Any:
        """The aiobotocore S3 client (for `BucketPolicies` and tests' own requests)."""
        return self._client

    async def put(self, readings: Sequence[ReadingSet]) -> None:
        """Archive each reading set under its `archive_key`, write-once (`If-None-Match: *`):
        a key that exists keeps its first bytes, and the skip is counted in `writes`. Each
        object carries its SHA-256 as metadata (`x-amz-meta-sha256`) for archive verify."""
        documents: list[tuple[str, bytes]] = []
        for reading in readings:
            key = reading.archive_key
            checked_key(key)
            documents.append((key, encode_archive_document(reading)))
        await self._put_all(documents, "application/json", record_hash=True)

    async def put_objects(self, objects: Iterable[tuple[str, bytes]]) -> None:
        """Write whole objects (segments of the segment layout), write-once: the key names
        the content (its hash), so an existing key is skipped. Taken from `objects` as the
        uploads go: a generator keeps only those in flight."""

        def checked() -> Iterator[tuple[str, bytes]]:
            for key, body in objects:
                checked_object_key(key)
                yield key, body

        await self._put_all(checked(), "application/x-ndjson", record_hash=False)

    async def _put_all(
        self, documents: Iterable[tuple[str, bytes]], content_type: str, *, record_hash: bool
    ) -> None:
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
                    written = await self._put_once(key, body, content_type, record_hash)
                if not written:
                    self.writes.skipped_existing += 1

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.concurrency):
                    group.create_task(upload())
        except ExceptionGroup as failures:
            if all(isinstance(exc, BackendUnavailable) for exc in failures.exceptions):
                raise failures.exceptions[0] from None
            raise

    async def _put_once(self, key: str, body: bytes, content_type: str, record_hash: bool) -> bool:
        """One conditional PutObject; False when the key existed."""
        if self._signed_put is not None:
            return await self._signed_put.put(
                key,
                body,
                content_type,
                record_hash=record_hash,
                content_md5=self._content_md5,
            )
        options: dict[str, Any] = {"IfNoneMatch": "*"}
        if record_hash:
            options["Metadata"] = {HASH_METADATA: hashlib.sha256(body).hexdigest()}
        if self._content_md5:
            options["ContentMD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
        try:
            await self._client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, **options
            )
        except ClientError as exc:
            if _error_code(exc) in _KEY_EXISTS:
                return False
            raise
        return True

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
        return (await self._get_with_metadata(key))[0]

    async def _get_with_metadata(self, key: str) -> tuple[bytes, dict[str, str]]:
        """An object's bytes and its user metadata; `NotFound` when there is none."""
        await self.ensure_bucket()
        try:
            with self._calling("GetObject"):
                response = await self._client.get_object(Bucket=self.bucket, Key=key)
                async with response["Body"] as stream:
                    body: bytes = await stream.read()
        except BackendUnavailable as exc:
            if _error_code(exc.__cause__) in _MISSING_KEY:
                raise NotFound(f"no archive object {key!r}") from None
            raise
        return body, dict(response.get("Metadata", {}))

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

    # --- integrity, retention and usage -------------------------------------------------------

    async def read_object(self, key: str) -> StoredObject:
        """The bytes of a message or segment object and the SHA-256 in its metadata."""
        try:
            if key.endswith(".json"):
                checked_key(key)
            else:
                checked_object_key(key)
        except ValueError:
            raise NotFound(f"no archive object {key!r}") from None
        body, metadata = await self._get_with_metadata(key)
        return StoredObject(body, metadata.get(HASH_METADATA))

    async def devices(self) -> builtins.list[str]:
        """Ids of the devices with objects in the bucket (one listing call per 1,000)."""
        return [device async for device in self._device_prefixes()]

    async def _device_prefixes(self) -> AsyncIterator[str]:
        await self.ensure_bucket()
        token: str | None = None
        while True:
            options: dict[str, Any] = {"Bucket": self.bucket, "Delimiter": "/"}
            if token:
                options["ContinuationToken"] = token
            with self._calling("ListObjectsV2"):
                response = await self._client.list_objects_v2(**options)
            for prefix in response.get("CommonPrefixes", []):
                device_id = prefix["Prefix"][:-1]
                with contextlib.suppress(ValueError):
                    check_device_id(device_id)
                    yield device_id
            token = response.get("NextContinuationToken")
            if not response.get("IsTruncated") or not token:
                return

    async def expire(self, older_than_us: int, *, limit: int) -> int:
        """Nothing to do here: the bucket's lifecycle rule expires objects (`retention_days`,
        set at the bucket check); always 0."""
        del older_than_us, limit
        return 0

    async def usage(self) -> StoreUsage:
        """Oldest message time from the first key of each device prefix (one listing call per
        device, 16 at a time), bytes from a listing of every object up to
        `USAGE_MAX_KEYS`; kept `USAGE_CACHE_S`."""
        async with self._usage_lock:
            now = time.monotonic()
            if self._usage is not None and now - self._usage[0] < USAGE_CACHE_S:
                return self._usage[1]
            usage = await self._measure_usage()
            self._usage = (now, usage)
            return usage

    async def _measure_usage(self) -> StoreUsage:
        devices = await self.devices()
        gate = asyncio.Semaphore(16)

        async def first_key(device_id: str) -> str | None:
            async with gate:
                with self._calling("ListObjectsV2"):
                    response = await self._client.list_objects_v2(
                        Bucket=self.bucket, Prefix=key_prefix(device_id), MaxKeys=1
                    )
            contents = response.get("Contents", [])
            return str(contents[0]["Key"]) if contents else None

        firsts = await asyncio.gather(*(first_key(device) for device in devices))
        # Both layouts' names begin with their earliest reading's time.
        stamps = [key.partition("/")[2][:_STAMP] for key in firsts if key is not None]
        oldest = min(stamps, default=None)
        objects = total = 0
        token: str | None = None
        while objects < USAGE_MAX_KEYS:
            options: dict[str, Any] = {"Bucket": self.bucket}
            if token:
                options["ContinuationToken"] = token
            with self._calling("ListObjectsV2"):
                response = await self._client.list_objects_v2(**options)
            for item in response.get("Contents", []):
                objects += 1
                total += int(item.get("Size", 0))
            token = response.get("NextContinuationToken")
            if not response.get("IsTruncated") or not token:
                break
        else:
            return StoreUsage(
                oldest_us=_stamp_us(oldest) if oldest else None,
                bytes_used=None,
                detail=f"oldest from the first key of {len(devices)} device prefixes; size not "
                f"summed: more than {USAGE_MAX_KEYS} objects (see the bucket's own metrics)",
            )
        return StoreUsage(
            oldest_us=_stamp_us(oldest) if oldest else None,
            bytes_used=total,
            detail=f"oldest from the first key of {len(devices)} device prefixes; size of "
            f"{objects} objects from a full listing",
        )

    async def health(self) -> str | None:
        """`endpoint/bucket` (and the Object Lock state when one was asked for) when the
        bucket answers; `BackendUnavailable` when not."""
        if self._bucket_ready:
            with self._calling("HeadBucket"):
                await self._client.head_bucket(Bucket=self.bucket)
        else:
            await self.ensure_bucket()
        if self.object_lock != "off":
            return f"{self.endpoint_url}/{self.bucket} (object lock: {self.object_lock})"
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
        retention_days=settings.archive_retention_days,
        object_lock_days=settings.archive_object_lock_days,
    ) as store:
        yield store


if TYPE_CHECKING:

    def _satisfies_protocol(store: S3ArchiveStore) -> ArchiveStore:
        return store
