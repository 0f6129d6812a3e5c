"""The raw archive Protocol and the values it speaks in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from iotmeter.readings import ReadingSet
from iotmeter.storage.usage import StoreUsage


@dataclass(frozen=True, slots=True)
class ArchivedMessage:
    key: str
    device_id: str
    epoch_us: int
    """The reading set's own time (from the key, to the millisecond)."""
    body: bytes
    """The archived JSON document (see `encode_archive_document`)."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An archived object's bytes as stored, with the content hash recorded alongside it."""

    body: bytes
    sha256: str | None
    """Hex SHA-256 of `body` recorded when it was written (S3 object metadata, a local file's
    extended attribute); None when none was recorded (written before, or where a file system
    keeps no extended attributes). Segment objects carry theirs in the key instead."""


@dataclass(slots=True)
class ArchiveWrites:
    """What the write-once rule did (read by `/metrics`; one per store, never reset)."""

    skipped_existing: int = 0
    """Writes skipped because the key existed (a redelivery or a rebuild): the first copy
    stays."""
    repaired: int = 0
    """Local folder only: an existing file under the key was damaged (empty, or its bytes no
    longer match their recorded hash: a write cut by a crash before it was durable) and was
    replaced by the new copy."""


@dataclass(frozen=True, slots=True)
class ArchivePage:
    keys: list[str]
    next_cursor: str | None
    """Pass back as `after` for the next page; None on the last page."""


class ArchiveStore(Protocol):
    """Where the raw bytes of every accepted reading set are kept."""

    backend: str

    @property
    def writes(self) -> ArchiveWrites:
        """Counts of what the write-once rule did."""
        ...

    async def put(self, readings: Sequence[ReadingSet]) -> None:
        """Archive each reading set under its `archive_key`, write-once: a key that exists
        already keeps its first bytes (a redelivery is skipped and counted)."""
        ...

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
        ...

    async def get(self, key: str) -> ArchivedMessage:
        """One archived message; `NotFound` when there is no such key."""
        ...

    async def expire(self, older_than_us: int, *, limit: int) -> int:
        """Delete up to `limit` archived objects whose time lies before `older_than_us`, and
        return how many went (0 where the store expires them itself, as S3's lifecycle)."""
        ...

    async def usage(self) -> StoreUsage:
        """The oldest data kept and the space used (for `GET /api/v1/stats`)."""
        ...

    async def health(self) -> str | None:
        """A short detail when reachable; raises `BackendUnavailable` when not."""
        ...
