"""The project's one retry policy: capped exponential backoff with jitter, honouring Retry-After.

Every loop that waits before trying again takes its delays from a `Backoff`: a sink's write (the
ingest runner), the MQTT connection (intake and simulator), a crashed background task (the
supervisor) and a single S3 PUT. One policy means one place where jitter, the cap and the
`Retry-After` rule are right, and one way of logging an outage: once when it starts, once when
it ends, the retries in between at debug level, each line with the loop's context fields
(`sink=archive`, `broker=host:port`).

Why not tenacity or stamina: those model a retried *call*. Our loops are longer-lived (a broker
session that fails after hours must start again from the first delay; a sink that recovers must
log its recovery; a store's `Retry-After` rides on our own `BackendUnavailable`), so they would
need a retrying object per outage plus custom wait and stop classes: more code than the policy.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping

from iotmeter.errors import BackendUnavailable

logger = logging.getLogger(__name__)

INITIAL_DELAY_S = 0.5
MAX_DELAY_S = 30.0
RETRY_AFTER_CAP_S = 60.0
"""A store asking for a longer pause than this is tried again after this long: the spool holds
the backlog, but an hour's stall on one `Retry-After` would be an outage of our own making."""


def retry_after_of(exc: BaseException | None) -> float | None:
    """The pause a service asked for with this error, if it asked."""
    if isinstance(exc, BackendUnavailable):
        return exc.retry_after
    return None


class Backoff:
    """Delays for one retry loop: `initial * 2**n` up to `cap`, each drawn from [50%, 100%] of
    that (so that many clients failing together do not come back together), or exactly what
    `Retry-After` asked, up to `retry_after_cap`."""

    def __init__(
        self,
        what: str,
        *,
        initial: float = INITIAL_DELAY_S,
        cap: float = MAX_DELAY_S,
        retry_after_cap: float = RETRY_AFTER_CAP_S,
        log: logging.Logger | None = None,
        quiet: bool = False,
        random_fraction: Callable[[], float] = random.random,
        context: Mapping[str, object] | None = None,
    ) -> None:
        if not 0 < initial <= cap:
            raise ValueError(f"need 0 < initial <= cap (got {initial}, {cap})")
        self.what = what
        self.initial = initial
        self.cap = cap
        self.retry_after_cap = retry_after_cap
        self.failures = 0
        """Failures since the last success."""
        self.failing_since: float | None = None
        """Monotonic time of the first failure of the current outage."""
        self.last_error: str | None = None
        self._log = log or logger
        self._quiet = quiet
        """Log the start and end of an outage at debug level too (a caller that reports it)."""
        self._random = random_fraction
        self._context = dict(context) if context else None
        """Fields for each log line (`extra=`): what fails, for a reader of JSON logs."""

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    def next_delay(self, exc: BaseException | None = None) -> float:
        """Count a failure; the seconds to wait before the next try."""
        self.failures += 1
        self.last_error = describe(exc) if exc is not None else "failed"
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            self._log.log(
                logging.DEBUG if self._quiet else logging.WARNING,
                "%s failing, retrying until it works: %s",
                self.what,
                self.last_error,
                extra=self._context,
            )
        else:
            self._log.debug("%s still failing: %s", self.what, self.last_error, extra=self._context)
        asked = retry_after_of(exc)
        if asked is not None:
            if asked > self.retry_after_cap and self.failures == 1:
                # Said with the outage's first line, not at every try.
                self._log.log(
                    logging.DEBUG if self._quiet else logging.WARNING,
                    "%s: asked to wait %.0f s (Retry-After); trying again after %.0f s",
                    self.what,
                    asked,
                    self.retry_after_cap,
                    extra=self._context,
                )
            return max(0.0, min(asked, self.retry_after_cap))
        ceiling = min(self.cap, self.initial * 2.0 ** min(self.failures - 1, 30))
        return ceiling * (0.5 + self._random() / 2)

    async def wait(self, exc: BaseException | None = None) -> None:
        """Count a failure and sleep for the delay (cancellable at once)."""
        await asyncio.sleep(self.next_delay(exc))

    def succeeded(self) -> None:
        """The next failure starts from the first delay again; a recovery is logged once."""
        self.recovered()
        self.failures = 0

    def recovered(self) -> None:
        """The outage is over (logged once), but the delays go on from where they were: for a
        connection that is back but may not last (one that drops at once is tried again after
        a growing delay, not in a tight loop). `succeeded()` once it has proven itself."""
        if self.failing_since is not None:
            self._log.log(
                logging.DEBUG if self._quiet else logging.WARNING,
                "%s recovered after %.1f s",
                self.what,
                time.monotonic() - self.failing_since,
                extra=self._context,
            )
        self.failing_since = None
        self.last_error = None


def describe(exc: BaseException) -> str:
    """`Type: message` for logs and status pages (the message alone for our own errors)."""
    if isinstance(exc, BackendUnavailable):
        return exc.message
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
