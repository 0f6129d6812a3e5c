"""The sinks the ingest runner drains the spool into, one module each, behind `Sink`.

A sink talks to one store through that store's Protocol. The runner (`ingest/runner.py`) owns
everything around it: batching, retries with the project's backoff, lag, stalls, and parking a
record the sink keeps failing on. A new sink (alert evaluation, a second time-series store,
forwarding upstream) is one module here and one line where the collector lists its sinks.

What `store` may raise, and what the runner then does:
- `BackendUnavailable` (with `retry_after` when the store said): the store is down or busy;
  the same batch is tried again, for as long as it takes.
- `StoreRejected`: the store refused the listed reading sets for their content and stored
  every other one; the refused ones go to the dead letters. (A sink that buffers never raises
  it: what it buffers is not stored yet.)
- anything else: tried a few times, then the batch is split until the record it fails on
  stands alone, and that record is parked in the dead letters (`sink_failed`).
"""

from __future__ import annotations

from typing import Protocol

from iotmeter.ingest.batch import Batch


class Sink(Protocol):
    """Where the runner delivers decoded spool records."""

    name: str
    """Names the sink's spool cursor, its logs and its `/ready` entry: never change it."""

    async def store(self, batch: Batch) -> int | None:
        """Store the batch; durable when it returns. A sink that buffers (and so confirms later)
        returns the last spool seq that is durable now; others return None (all of it)."""
        ...

    async def idle(self) -> int | None:
        """Called about four times a second while no records come: a buffering sink writes what is
        due and returns the last seq now durable; others return None."""
        ...
