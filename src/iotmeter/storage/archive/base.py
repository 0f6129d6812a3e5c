"""The raw archive Protocol and the values it speaks in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from iotmeter.readings import ReadingSet


@dataclass(frozen=True, slots=True)
class ArchivedMessage:
    key: str
    device_id: str
    epoch_us: int
    """The reading set's own time (from the key, to the millisecond)."""
    body: bytes
    """The archived JSON document (see `encode_archive_document`)."""


@dataclass(frozen=True, slots=True)
class ArchivePage:
    keys: list[str]
    next_cursor: str | None
    """Pass back as `after` for the next page; None on the last page."""


class ArchiveStore(Protocol):
    """Where the raw bytes of every accepted reading set are kept."""

    backend: str

    async def put(self, readings: Sequence[ReadingSet]) -> None:
        """Archive each reading set under its `archive_key`; a repeated key overwrites."""
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

    async def health(self) -> str | None:
        """A short detail when reachable; raises `BackendUnavailable` when not."""
        ...
