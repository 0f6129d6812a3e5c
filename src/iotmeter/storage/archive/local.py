"""The embedded archive: one JSON file per reading set under a local folder.

Key `{device_id}/{name}` is the file `root/device_id/name`; names sort by time, so listing a
time range is a filter over one device folder.

Every write is atomic and write-once: the bytes go to a temporary file in the same folder, which
is then hard-linked under the final name (`os.link` fails when the name exists, where
`os.replace` would overwrite); the temporary name is removed either way. A reader never sees
half a document, and a redelivery or a rebuild never changes a file that exists: it is skipped
(and counted). One exception: a file that is damaged (empty, or not matching its recorded hash:
a write cut by a power loss before it was durable) is replaced by the new copy.

A per-message file records the SHA-256 of its bytes in the extended attribute
`user.iotmeter.sha256` (set on the temporary file, so the name never appears without it), which
`iotmeter archive verify` checks; where the file system keeps no extended attributes the files
are written without it. Copy an archive with `cp -a` or `rsync -X` to keep them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import errno
import gzip
import hashlib
import heapq
import logging
import os
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from iotmeter.config import Settings
from iotmeter.errors import BackendUnavailable, NotFound
from iotmeter.ids import DEVICE_ID_RE
from iotmeter.readings import ReadingSet, format_key_time
from iotmeter.storage.archive.base import (
    ArchivedMessage,
    ArchivePage,
    ArchiveWrites,
    StoredObject,
)
from iotmeter.storage.archive.document import encode_archive_document, key_bound, parse_key
from iotmeter.storage.usage import StoreUsage

if TYPE_CHECKING:
    from iotmeter.storage.archive.base import ArchiveStore

logger = logging.getLogger(__name__)

HASH_ATTRIBUTE = "user.iotmeter.sha256"
"""The extended attribute holding a per-message file's SHA-256 (hex)."""
USAGE_CACHE_S = 60.0
"""`usage` walks every file: its answer is kept this long (`GET /api/v1/stats` may poll)."""
_STAMP = 20  # len("20260101T000000.000Z")
_SEGMENT_SUFFIXES = (".ndjson", ".ndjson.gz")
_SUFFIX = ".json"
_TEMP_SUFFIX = ".tmp"
# Stricter than `parse_key`: only what `ReadingSet.archive_key` produces, so a key can never
# carry a path separator, a NUL byte or anything else a file system or URL would reinterpret.
_NAME_RE = re.compile(r"^\d{8}T\d{6}\.\d{3}Z_[A-Za-z0-9_.\-]{1,96}\.json$")
# Objects of the segment layout (see segments.py): `{first}_{last}_{hash}.ndjson[.gz]`.
_OBJECT_NAME_RE = re.compile(
    r"^\d{8}T\d{6}\.\d{3}Z_\d{8}T\d{6}\.\d{3}Z_[0-9a-f]{16}\.ndjson(\.gz)?$"
)


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2), which Python's os module lacks; None elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return function


# One syncfs per batch instead of an fsync per file: measured here, 5,000 files of 300 bytes
# were written durably at 4,100 files/s with an fsync each and at 16,000 files/s with one
# syncfs of their file system after them.
_syncfs = _load_syncfs()


def make_durable(root: Path, folders: Iterable[Path]) -> None:
    """After files were written (and renamed) under `root`: make them survive a power cut.

    With syncfs, one call flushes the whole file system (data, names, folders); without it
    each file was fsync'd as it was written, and the folders holding the new names are."""
    if _syncfs is not None:
        descriptor = os.open(root, os.O_RDONLY)
        try:
            if _syncfs(descriptor) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"syncfs failed: {os.strerror(error)}")
        finally:
            os.close(descriptor)
        return
    for folder in folders:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def check_device_id(device_id: str) -> None:
    """ValueError unless `device_id` is safe as one path segment of a key."""
    # "." and ".." pass DEVICE_ID_RE but would name the root or its parent as a folder.
    if not DEVICE_ID_RE.fullmatch(device_id) or device_id in (".", ".."):
        raise ValueError(f"not a device id: {device_id!r}")


def checked_key(key: str) -> tuple[str, str, int]:
    """(device_id, file name, epoch_us) of a valid archive key; ValueError otherwise."""
    device_id, epoch_us = parse_key(key)
    check_device_id(device_id)
    name = key.partition("/")[2]
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"not an archive key: {key!r}")
    return device_id, name, epoch_us


def _is_device_id(name: str) -> bool:
    return DEVICE_ID_RE.fullmatch(name) is not None and name not in (".", "..")


def _device_and_name(key: str) -> tuple[str, str]:
    """(device_id, file name) of a per-message or segment key; ValueError otherwise."""
    if key.endswith(_SUFFIX):
        device_id, name, _ = checked_key(key)
        return device_id, name
    return checked_object_key(key)


def checked_object_key(key: str) -> tuple[str, str]:
    """(device_id, name) of a segment object key; ValueError otherwise."""
    device_id, _, name = key.partition("/")
    check_device_id(device_id)
    if not _OBJECT_NAME_RE.fullmatch(name):
        raise ValueError(f"not an archive object key: {key!r}")
    return device_id, name


def _names_between(
    folder: Path,
    low: str,
    high: str,
    low_exclusive: str | None,
    count: int,
    suffixes: tuple[str, ...] = (_SUFFIX,),
) -> list[str]:
    """The first `count` names in [low, high) and > low_exclusive, in order."""
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        return []
    with entries:
        names = (
            entry.name
            for entry in entries
            if entry.name.endswith(suffixes)
            and low <= entry.name < high
            and (low_exclusive is None or entry.name > low_exclusive)
        )
        # Smallest `count` without sorting a folder that may hold millions of files.
        return heapq.nsmallest(count, names)


@dataclass(frozen=True, slots=True)
class _Document:
    device_id: str
    name: str
    body: bytes
    hashed: bool
    """A per-message document (its hash is recorded); segments carry theirs in the name."""


@dataclass(slots=True)
class _Outcome:
    skipped: int = 0
    repaired: int = 0


def read_hash(path: Path | int) -> str | None:
    """The SHA-256 recorded on a file (`HASH_ATTRIBUTE`), None when it has none."""
    try:
        return os.getxattr(path, HASH_ATTRIBUTE).decode("ascii", "replace")
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def segment_hash_matches(name: str, body: bytes) -> bool:
    """Whether a segment's bytes are the content its name's hash was taken of."""
    try:
        content = gzip.decompress(body) if name.endswith(".gz") else body
    except (OSError, EOFError, zlib.error):
        return False
    return hashlib.sha256(content).hexdigest()[:16] == name[2 * _STAMP + 2 : 2 * _STAMP + 18]


def _intact(path: Path, *, hashed: bool) -> bool:
    """Whether an existing archive file is whole (write-once keeps it) or was damaged by a
    write cut short before it was durable (empty, half a gzip stream, a hash mismatch)."""
    with open(path, "rb") as file:
        body = file.read()
        recorded = read_hash(file.fileno()) if hashed else None
    if not body:
        return False
    if not hashed:
        return segment_hash_matches(path.name, body)
    if recorded is not None:
        return hashlib.sha256(body).hexdigest() == recorded
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


def _expiry_stamp(name: str) -> str | None:
    """The time (as in names) after which a file may go: a message's own, a segment's last."""
    if name.endswith(_SUFFIX) and _NAME_RE.fullmatch(name):
        return name[:_STAMP]
    if name.endswith(_SEGMENT_SUFFIXES) and _OBJECT_NAME_RE.fullmatch(name):
        return name[_STAMP + 1 : 2 * _STAMP + 1]
    return None


def _stamp_us(stamp: str) -> int:
    return parse_key(f"x/{stamp}_x.json")[1]


class LocalArchiveStore:
    """Archive in a local folder (the zero-config default)."""

    backend = "local"

    def __init__(self, root: Path | str, *, fsync: bool = True) -> None:
        """No file system access here; `open` creates the folder up front, else the first write.

        With `fsync` (the default) a write returns only once its files survive a power cut:
        the collector frees the spool's copy after that. `fsync=False` is for benchmarks of
        the rest of the pipeline.
        """
        self.root = Path(root)
        self.fsync = fsync
        self.writes = ArchiveWrites()
        self._xattrs = True
        self._expiry_marks: dict[str, tuple[int, str]] = {}
        self._usage: tuple[float, StoreUsage] | None = None
        self._usage_lock = asyncio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(
        cls, root: Path | str, *, fsync: bool = True
    ) -> AsyncIterator[LocalArchiveStore]:
        """The store on `root`, created if missing; nothing to close afterwards."""
        folder = Path(root)
        try:
            await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
            folder = await asyncio.to_thread(folder.resolve)
        except OSError as exc:
            raise BackendUnavailable(f"archive folder {folder} cannot be created: {exc}") from exc
        yield cls(folder, fsync=fsync)

    def _error(self, action: str, exc: OSError) -> BackendUnavailable:
        return BackendUnavailable(f"archive folder {self.root}: {action} failed: {exc}")

    async def put(self, readings: Sequence[ReadingSet]) -> None:
        """Archive each reading set under its `archive_key`, write-once: a file that exists
        keeps its bytes (the redelivery is skipped and counted in `writes`)."""
        if not readings:
            return
        documents: list[_Document] = []
        for reading in readings:
            device_id, name, _ = checked_key(reading.archive_key)
            documents.append(_Document(device_id, name, encode_archive_document(reading), True))
        await self._write(documents)

    async def _write(self, documents: builtins.list[_Document]) -> None:
        try:
            outcome = await asyncio.to_thread(self._write_all, documents)
        except OSError as exc:
            raise self._error("write", exc) from exc
        # Counted here, on the event loop: writes of concurrent batches run in other threads.
        self.writes.skipped_existing += outcome.skipped
        self.writes.repaired += outcome.repaired

    def _write_all(self, documents: builtins.list[_Document]) -> _Outcome:
        self.root.mkdir(parents=True, exist_ok=True)
        folders: set[Path] = set()
        outcome = _Outcome()
        for document in documents:
            folder = self.root / document.device_id
            if folder not in folders:
                folder.mkdir(exist_ok=True)
                folders.add(folder)
            self._write_one(folder, document, outcome, sync_each=self.fsync and _syncfs is None)
        if self.fsync:
            make_durable(self.root, folders)
        return outcome

    def _write_one(
        self, folder: Path, document: _Document, outcome: _Outcome, *, sync_each: bool
    ) -> None:
        # A leading dot and another suffix keep temporary files out of every listing.
        temporary = folder / f".{document.name}.{uuid.uuid4().hex[:12]}{_TEMP_SUFFIX}"
        target = folder / document.name
        try:
            try:
                file = open(temporary, "wb")  # noqa: SIM115 (closed below, retried once)
            except FileNotFoundError:
                # `expire` removed the emptied device folder after `_write_all` made it.
                folder.mkdir(exist_ok=True)
                file = open(temporary, "wb")  # noqa: SIM115
            with file:
                file.write(document.body)
                if document.hashed and self._xattrs:
                    self._record_hash(file.fileno(), document.body)
                if sync_each:
                    file.flush()
                    os.fsync(file.fileno())
            try:
                os.link(temporary, target)
            except FileExistsError:
                if _intact(target, hashed=document.hashed):
                    outcome.skipped += 1
                else:
                    # Kept aside, never overwritten: a torn write after a power cut and a
                    # file altered by someone look alike, and the second is evidence.
                    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.damaged")
                    os.replace(target, aside)
                    os.link(temporary, target)
                    outcome.repaired += 1
                    logger.warning(
                        "archive file %s did not match its hash: kept as %s, written anew",
                        target,
                        aside.name,
                    )
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()

    def _record_hash(self, descriptor: int, body: bytes) -> None:
        digest = hashlib.sha256(body).hexdigest().encode()
        try:
            os.setxattr(descriptor, HASH_ATTRIBUTE, digest)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                raise
            self._xattrs = False
            logger.warning(
                "archive folder %s keeps no extended attributes (%s): files are written "
                "without their hash, and `iotmeter archive verify` cannot check them",
                self.root,
                exc.strerror,
            )

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
        prefix_length = len(device_id) + 1
        low = key_bound(device_id, start_us)[prefix_length:]
        high = key_bound(device_id, stop_us)[prefix_length:]
        if after is not None and after.startswith(f"{device_id}/"):
            low_exclusive: str | None = after[prefix_length:]
        elif after is not None and after > f"{device_id}/":
            # A cursor past this device's keys (or malformed): nothing is left.
            return ArchivePage(keys=[], next_cursor=None)
        else:
            low_exclusive = None
        try:
            names = await asyncio.to_thread(
                _names_between, self.root / device_id, low, high, low_exclusive, limit + 1
            )
        except OSError as exc:
            raise self._error("listing", exc) from exc
        keys = [f"{device_id}/{name}" for name in names[:limit]]
        next_cursor = keys[-1] if len(names) > limit else None
        return ArchivePage(keys=keys, next_cursor=next_cursor)

    async def get(self, key: str) -> ArchivedMessage:
        """One archived message; `NotFound` when there is no such key (or it is no valid key)."""
        try:
            device_id, name, epoch_us = checked_key(key)
        except ValueError:
            raise NotFound(f"no archived message {key!r}") from None
        path = self.root / device_id / name
        try:
            body = await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no archived message {key!r}") from None
        except OSError as exc:
            raise self._error("read", exc) from exc
        return ArchivedMessage(key=key, device_id=device_id, epoch_us=epoch_us, body=body)

    # --- objects of the segment layout --------------------------------------------------------

    async def put_objects(self, objects: Iterable[tuple[str, bytes]]) -> None:
        """Write whole objects (segment files) atomically and write-once: a key names its
        content (the hash in it), so an existing one is skipped."""
        documents = [_Document(*checked_object_key(key), body, False) for key, body in objects]
        if documents:
            await self._write(documents)

    async def list_objects(
        self, device_id: str, start_after: str, limit: int
    ) -> builtins.list[str]:
        """Segment object keys of a device sorting after `start_after`, in order."""
        check_device_id(device_id)
        prefix_length = len(device_id) + 1
        low = start_after[prefix_length:] if start_after.startswith(f"{device_id}/") else ""
        try:
            names = await asyncio.to_thread(
                _names_between,
                self.root / device_id,
                low,
                "\uffff",
                low,
                limit,
                (".ndjson", ".ndjson.gz"),
            )
        except OSError as exc:
            raise self._error("listing", exc) from exc
        return [f"{device_id}/{name}" for name in names]

    async def get_object(self, key: str) -> bytes:
        try:
            device_id, name = checked_object_key(key)
        except ValueError:
            raise NotFound(f"no archive object {key!r}") from None
        try:
            return await asyncio.to_thread((self.root / device_id / name).read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no archive object {key!r}") from None
        except OSError as exc:
            raise self._error("read", exc) from exc

    # --- integrity, retention and usage -------------------------------------------------------

    async def read_object(self, key: str) -> StoredObject:
        """The bytes of a message or segment object and the hash recorded with them."""
        try:
            device_id, name = _device_and_name(key)
        except ValueError:
            raise NotFound(f"no archive object {key!r}") from None
        path = self.root / device_id / name

        def read() -> StoredObject:
            with open(path, "rb") as file:
                return StoredObject(file.read(), read_hash(file.fileno()))

        try:
            return await asyncio.to_thread(read)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no archive object {key!r}") from None
        except OSError as exc:
            raise self._error("read", exc) from exc

    async def devices(self) -> builtins.list[str]:
        """Ids of the devices with a folder in the archive, sorted."""

        def names() -> builtins.list[str]:
            try:
                entries = os.scandir(self.root)
            except FileNotFoundError:
                return []
            with entries:
                return sorted(
                    entry.name
                    for entry in entries
                    if entry.is_dir(follow_symlinks=False) and _is_device_id(entry.name)
                )

        try:
            return await asyncio.to_thread(names)
        except OSError as exc:
            raise self._error("listing", exc) from exc

    async def expire(self, older_than_us: int, *, limit: int) -> int:
        """Delete up to `limit` files of both layouts whose time lies before `older_than_us`
        (a message's own time; a segment's last), and device folders left empty. Returns how
        many files went. A device folder that has not changed since a pass found nothing to
        delete in it is not read again until the cutoff passes its oldest file."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1 (got {limit})")
        try:
            return await asyncio.to_thread(self._expire, format_key_time(older_than_us), limit)
        except OSError as exc:
            raise self._error("expiry", exc) from exc

    def _expire(self, cutoff: str, limit: int) -> int:
        deleted = 0
        for device_id in self._device_folders():
            if deleted >= limit:
                break
            folder = self.root / device_id
            try:
                changed_ns = folder.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            mark = self._expiry_marks.get(device_id)
            if mark is not None and mark[0] == changed_ns and mark[1] >= cutoff:
                continue
            expired, oldest_kept, remaining = self._expired_in(folder, cutoff, limit - deleted)
            for name in expired:
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
            deleted += len(expired)
            if not expired:
                # Unchanged since `changed_ns` and nothing older than the cutoff: skip it
                # until a file comes or goes, or the cutoff passes its oldest file.
                self._expiry_marks[device_id] = (changed_ns, oldest_kept)
            elif not remaining:
                self._expiry_marks.pop(device_id, None)
                # Fails (harmlessly) when a write came in meanwhile.
                with contextlib.suppress(OSError):
                    folder.rmdir()
        return deleted

    def _device_folders(self) -> builtins.list[str]:
        try:
            entries = os.scandir(self.root)
        except FileNotFoundError:
            return []
        with entries:
            return [
                entry.name
                for entry in entries
                if entry.is_dir(follow_symlinks=False) and _is_device_id(entry.name)
            ]

    @staticmethod
    def _expired_in(folder: Path, cutoff: str, limit: int) -> tuple[builtins.list[str], str, bool]:
        """(up to `limit` expired names, the oldest time kept, whether anything else is left)."""
        expired: list[str] = []
        oldest_kept = "\uffff"
        remaining = False
        with os.scandir(folder) as entries:
            for entry in entries:
                stamp = _expiry_stamp(entry.name)
                if stamp is not None and stamp < cutoff and len(expired) < limit:
                    expired.append(entry.name)
                    continue
                remaining = True
                if stamp is not None and stamp < oldest_kept:
                    oldest_kept = stamp
        return expired, oldest_kept, remaining

    async def usage(self) -> StoreUsage:
        """Oldest message time and disk space of both layouts, from a walk over every file
        (kept `USAGE_CACHE_S`; about 1 s per million files on a warm cache)."""
        async with self._usage_lock:
            now = time.monotonic()
            if self._usage is not None and now - self._usage[0] < USAGE_CACHE_S:
                return self._usage[1]
            try:
                usage = await asyncio.to_thread(self._walk_usage)
            except OSError as exc:
                raise self._error("usage scan", exc) from exc
            self._usage = (now, usage)
            return usage

    def _walk_usage(self) -> StoreUsage:
        files = content = allocated = 0
        oldest: str | None = None
        for device_id in self._device_folders():
            try:
                entries = os.scandir(self.root / device_id)
            except FileNotFoundError:
                continue
            with entries:
                for entry in entries:
                    if _expiry_stamp(entry.name) is None:
                        continue
                    try:
                        stat = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    files += 1
                    content += stat.st_size
                    allocated += stat.st_blocks * 512
                    # Both layouts' names begin with their earliest reading's time.
                    if oldest is None or entry.name[:_STAMP] < oldest:
                        oldest = entry.name[:_STAMP]
        return StoreUsage(
            oldest_us=None if oldest is None else _stamp_us(oldest),
            bytes_used=allocated,
            detail=f"walk of {files} files in {self.root}: {content} bytes of content, "
            f"{allocated} allocated on disk",
        )

    async def health(self) -> str | None:
        """The folder's path when a file can be written there; `BackendUnavailable` if not."""
        try:
            await asyncio.to_thread(self._probe)
        except OSError as exc:
            raise self._error("health probe", exc) from exc
        return str(self.root)

    def _probe(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".health-{uuid.uuid4().hex[:12]}{_TEMP_SUFFIX}"
        try:
            probe.write_bytes(b"ok")
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()


@asynccontextmanager
async def open_local_store(settings: Settings) -> AsyncIterator[LocalArchiveStore]:
    """The local archive of `settings.archive_dir`."""
    async with LocalArchiveStore.open(settings.archive_dir) as store:
        yield store


if TYPE_CHECKING:

    def _satisfies_protocol(store: LocalArchiveStore) -> ArchiveStore:
        return store
