"""What a sink is handed: spool records, decoded once for every sink, in spool order."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from iotmeter.ingest.decode import DecodeLimits, decode_message, refuse_oversized
from iotmeter.ingest.spool import Chunk, SpoolRecord
from iotmeter.readings import ReadingSet, Rejection


@dataclass(slots=True)
class Message:
    """One spool record after decoding."""

    seq: int
    readings: Sequence[ReadingSet]
    rejections: Sequence[Rejection]

    @property
    def units(self) -> int:
        return len(self.readings) + len(self.rejections)


@dataclass
class Batch:
    """Consecutive decoded messages (or a part of one message, when a batch is split to find
    the record a sink fails on)."""

    messages: list[Message]

    @property
    def first_seq(self) -> int:
        return self.messages[0].seq

    @property
    def last_seq(self) -> int:
        return self.messages[-1].seq

    @cached_property
    def readings(self) -> list[ReadingSet]:
        return list(itertools.chain.from_iterable(m.readings for m in self.messages))

    @cached_property
    def rejections(self) -> list[Rejection]:
        return list(itertools.chain.from_iterable(m.rejections for m in self.messages))

    @property
    def units(self) -> int:
        """Reading sets and rejections: the smallest things a batch can be split into."""
        return sum(message.units for message in self.messages)

    def halves(self) -> tuple[Batch, Batch] | None:
        """The batch cut in two (by messages, or within its only message); None for one unit."""
        if len(self.messages) > 1:
            middle = len(self.messages) // 2
            return Batch(self.messages[:middle]), Batch(self.messages[middle:])
        (message,) = self.messages
        items: list[ReadingSet | Rejection] = [*message.readings, *message.rejections]
        if len(items) < 2:
            return None
        middle = len(items) // 2
        return _part(message.seq, items[:middle]), _part(message.seq, items[middle:])

    def through(self, seq: int) -> Batch | None:
        """The messages up to `seq`; None when there are none."""
        kept = [message for message in self.messages if message.seq <= seq]
        return Batch(kept) if kept else None

    def after(self, seq: int) -> Batch | None:
        """The messages after `seq`; None when there are none."""
        kept = [message for message in self.messages if message.seq > seq]
        return Batch(kept) if kept else None


def _part(seq: int, items: list[ReadingSet | Rejection]) -> Batch:
    readings = tuple(item for item in items if isinstance(item, ReadingSet))
    rejections = tuple(item for item in items if isinstance(item, Rejection))
    return Batch([Message(seq, readings, rejections)])


class BatchDecoder:
    """Decodes spool chunks into messages once for all `consumers` sinks: a chunk forgets its
    decoded messages once the last of them took it (memory holds raw records, not objects)."""

    def __init__(self, limits: DecodeLimits, consumers: int) -> None:
        self.limits = limits
        self.consumers = consumers

    def batch(self, chunks: list[Chunk]) -> Batch:
        return Batch([message for chunk in chunks for message in self._messages(chunk)])

    def _messages(self, chunk: Chunk) -> list[Message]:
        uses = chunk.cache.get("uses", 0)
        assert isinstance(uses, int)
        chunk.cache["uses"] = uses + 1
        last_use = uses + 1 >= self.consumers
        cached = chunk.cache.pop("messages", None) if last_use else chunk.cache.get("messages")
        if isinstance(cached, list):
            return cached
        messages = [self.decode(record) for record in chunk.records]
        if not last_use:
            chunk.cache["messages"] = messages
        return messages

    def decode(self, record: SpoolRecord) -> Message:
        if record.payload_size is not None:
            decoded = refuse_oversized(
                record.payload,
                record.topic,
                record.received_at_us,
                record.payload_size,
                record.payload_sha256 or b"",
                self.limits.max_payload_bytes,
            )
        else:
            decoded = decode_message(
                record.payload, record.topic, record.received_at_us, self.limits
            )
        return Message(record.seq, decoded.readings, decoded.rejections)
