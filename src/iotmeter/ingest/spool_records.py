"""The spool's on-disk format: records, segment files, and reading them back without trusting them.

A segment file starts with `FILE_HEADER`, then records (little endian):

    magic     4 bytes   `RECORD_MAGIC`: where a reader can find its footing again after damage
    length    u32       bytes of the body
    seq       u64       the record's position in the spool
    head_crc  u32       CRC-32 of length and seq: the length is trusted only when this matches
    body_crc  u32       CRC-32 of the body
    body      received_at_us u64, flags u8, topic length u16,
              [whole size u64 and SHA-256 (32 bytes), when flags has OVERSIZED], topic, payload

A record is read by its declared length, whatever its size. Damage is found by the checksums
and described by `Damage`: *torn* when the bytes after the last good record are the start of a
record that was never completely written (a crash while appending: never committed, never
acked), *corrupt* otherwise (committed bytes that changed since). After corrupt bytes the reader
looks for the next record that checks out, so one bad record never hides those behind it.

Files written before the header existed (format 1: `length u32, crc u32`, then seq, received
time, topic length, topic, payload) are still read, without the search for footing.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

FILE_HEADER = b"IOTSPL2\n"
RECORD_MAGIC = b"\xa7RC\x5d"
OVERSIZED = 0x01
"""Flag: the payload is the head of a larger one, whose size and hash follow."""

_HEAD = struct.Struct("<4sIQII")
_BODY = struct.Struct("<QBH")
_OVERSIZE = struct.Struct("<Q32s")
_LEGACY_HEAD = struct.Struct("<II")
_LEGACY_BODY = struct.Struct("<QQH")

MAX_BODY_BYTES = (256 << 20) + (1 << 17)
"""MQTT's largest payload (256 MiB) plus the largest topic and our fields: a length above this
cannot be one we wrote."""
_BLOCK = 1 << 20


@dataclass(slots=True)  # not frozen: made per message, and frozen is 5x slower to build
class SpoolRecord:
    seq: int
    received_at_us: int
    topic: str
    payload: bytes
    payload_size: int | None = None
    """Set when `payload` is only the head of the payload received: its whole size."""
    payload_sha256: bytes | None = None
    """Set with `payload_size`: the whole payload's SHA-256."""


def encode_record(record: SpoolRecord) -> bytes:
    topic = record.topic.encode("utf-8", "surrogatepass")
    if record.payload_size is None:
        body = _BODY.pack(record.received_at_us, 0, len(topic)) + topic + record.payload
    else:
        body = (
            _BODY.pack(record.received_at_us, OVERSIZED, len(topic))
            + _OVERSIZE.pack(record.payload_size, record.payload_sha256 or bytes(32))
            + topic
            + record.payload
        )
    length_and_seq = struct.pack("<IQ", len(body), record.seq)
    return (
        _HEAD.pack(
            RECORD_MAGIC, len(body), record.seq, zlib.crc32(length_and_seq), zlib.crc32(body)
        )
        + body
    )


def record_size(record: SpoolRecord) -> int:
    extra = 0 if record.payload_size is None else _OVERSIZE.size
    topic = len(record.topic.encode("utf-8", "surrogatepass"))
    return _HEAD.size + _BODY.size + extra + topic + len(record.payload)


def _decode_body(seq: int, body: bytes) -> SpoolRecord | None:
    if len(body) < _BODY.size:
        return None
    received_at_us, flags, topic_length = _BODY.unpack_from(body)
    offset = _BODY.size
    payload_size = payload_sha256 = None
    if flags & OVERSIZED:
        if len(body) < offset + _OVERSIZE.size:
            return None
        payload_size, payload_sha256 = _OVERSIZE.unpack_from(body, offset)
        offset += _OVERSIZE.size
    if len(body) < offset + topic_length:
        return None
    topic = body[offset : offset + topic_length].decode("utf-8", "surrogatepass")
    return SpoolRecord(
        seq,
        received_at_us,
        topic,
        body[offset + topic_length :],
        payload_size,
        payload_sha256,
    )


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes of a segment that hold no readable record."""

    start: int
    end: int
    kind: Literal["torn", "corrupt"]
    """`torn`: an append that never completed, at the end of the file (never committed);
    `corrupt`: bytes that fail their checksum (committed data, damaged since)."""


@dataclass(frozen=True, slots=True)
class Located:
    record: SpoolRecord
    offset: int
    end: int


class _Window:
    """Reads a file between two offsets in large blocks; `get` returns exact spans."""

    def __init__(self, handle: BinaryIO, end: int) -> None:
        self.handle = handle
        self.end = end
        self.start = 0
        self.data = b""

    def get(self, offset: int, size: int) -> bytes | None:
        """Bytes [offset, offset + size), or None when the file (or the window) ends first."""
        if offset + size > self.end:
            return None
        relative = offset - self.start
        if relative >= 0 and relative + size <= len(self.data):
            return self.data[relative : relative + size]
        self.handle.seek(offset)
        self.data = self.handle.read(min(max(size, _BLOCK), self.end - offset))
        self.start = offset
        if len(self.data) < size:
            return None
        return self.data[:size]


_Outcome = Located | Literal["incomplete", "bad"]


def _parse_at(window: _Window, offset: int) -> _Outcome:
    head = window.get(offset, _HEAD.size)
    if head is None:
        return "incomplete"
    magic, length, seq, head_crc, body_crc = _HEAD.unpack(head)
    if (
        magic != RECORD_MAGIC
        or zlib.crc32(head[4:16]) != head_crc
        or not _BODY.size <= length <= MAX_BODY_BYTES
    ):
        return "bad"
    body = window.get(offset + _HEAD.size, length)
    if body is None:
        return "incomplete"
    if zlib.crc32(body) != body_crc:
        return "bad"
    record = _decode_body(seq, body)
    if record is None:
        return "bad"
    return Located(record, offset, offset + _HEAD.size + length)


def _parse_legacy_at(window: _Window, offset: int) -> _Outcome:
    head = window.get(offset, _LEGACY_HEAD.size)
    if head is None:
        return "incomplete"
    length, crc = _LEGACY_HEAD.unpack(head)
    if not _LEGACY_BODY.size <= length <= MAX_BODY_BYTES:
        return "bad"
    body = window.get(offset + _LEGACY_HEAD.size, length)
    if body is None:
        return "incomplete"
    if zlib.crc32(body) != crc:
        return "bad"
    seq, received_at_us, topic_length = _LEGACY_BODY.unpack_from(body)
    topic_end = _LEGACY_BODY.size + topic_length
    if topic_end > length:
        return "bad"
    topic = body[_LEGACY_BODY.size : topic_end].decode("utf-8", "surrogatepass")
    record = SpoolRecord(seq, received_at_us, topic, body[topic_end:])
    return Located(record, offset, offset + _LEGACY_HEAD.size + length)


def is_legacy(handle: BinaryIO) -> bool:
    """Whether a segment file predates `FILE_HEADER` (format 1)."""
    handle.seek(0)
    start = handle.read(len(FILE_HEADER))
    return start != FILE_HEADER and len(start) > 0 and not FILE_HEADER.startswith(start)


def first_offset(legacy: bool) -> int:
    return 0 if legacy else len(FILE_HEADER)


def _find_footing(window: _Window, start: int, after_seq: int) -> Located | None:
    """The first record after `start` that checks out and comes after `after_seq`."""
    position = start
    while position < window.end:
        chunk = window.get(position, min(_BLOCK, window.end - position))
        if chunk is None:
            return None
        found = chunk.find(RECORD_MAGIC)
        if found < 0:
            # Keep the last bytes: a magic may straddle two blocks.
            position += max(1, len(chunk) - len(RECORD_MAGIC) + 1)
            continue
        candidate = position + found
        outcome = _parse_at(window, candidate)
        if isinstance(outcome, Located) and outcome.record.seq > after_seq:
            return outcome
        position = candidate + 1
    return None


def _looks_torn(window: _Window, offset: int, outcome: _Outcome) -> bool:
    """After the last good record: is this the remains of an append that never completed?"""
    if outcome == "incomplete":
        return True
    rest = window.get(offset, window.end - offset) or b""
    # All zeros: space the file system allocated, never written.
    return not rest.strip(b"\0")


def scan(
    handle: BinaryIO,
    start: int,
    end: int,
    *,
    legacy: bool = False,
    after_seq: int = -1,
    at_end_of_log: bool = False,
) -> Iterator[Located | Damage]:
    """Records from `start` to `end`, in order, and the damaged spans between them.

    `after_seq` is the seq of the last good record before `start` (a record found after damage
    must come after it). `at_end_of_log`: `end` is where appending stopped, so an incomplete
    record there is torn rather than corrupt.
    """
    window = _Window(handle, end)
    parse = _parse_legacy_at if legacy else _parse_at
    offset = start
    last_seq = after_seq
    while offset < end:
        outcome = parse(window, offset)
        if isinstance(outcome, Located):
            yield outcome
            last_seq = outcome.record.seq
            offset = outcome.end
            continue
        footing = None if legacy else _find_footing(window, offset + 1, last_seq)
        if footing is not None:
            yield Damage(offset, footing.offset, "corrupt")
            offset = footing.offset
            continue
        torn = at_end_of_log and _looks_torn(window, offset, outcome)
        yield Damage(offset, end, "torn" if torn else "corrupt")
        return
