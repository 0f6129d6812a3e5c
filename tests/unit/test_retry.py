"""The project's one retry policy: delays, Retry-After, recovery, and how an outage is logged."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import pytest

from iotmeter.errors import BackendUnavailable
from iotmeter.retry import RETRY_AFTER_CAP_S, Backoff

LOGGER = "tests.retry"


def backoff(
    fraction: float | None = None,
    *,
    cap: float = 10.0,
    retry_after_cap: float = RETRY_AFTER_CAP_S,
    quiet: bool = False,
) -> Backoff:
    """Delays from 1 s up to `cap`; `fraction` fixes where in the jitter range each one falls."""
    return Backoff(
        "the store",
        initial=1.0,
        cap=cap,
        retry_after_cap=retry_after_cap,
        log=logging.getLogger(LOGGER),
        quiet=quiet,
        random_fraction=random.random if fraction is None else lambda: fraction,
    )


def delays(policy: Backoff, count: int) -> list[float]:
    return [policy.next_delay(OSError("connection refused")) for _ in range(count)]


# --- delays -----------------------------------------------------------------------------------


def test_delays_double_up_to_the_cap_at_the_top_of_the_jitter() -> None:
    assert delays(backoff(1.0), 7) == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_delays_double_up_to_the_cap_at_the_bottom_of_the_jitter() -> None:
    assert delays(backoff(0.0), 7) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_random_delays_stay_within_half_and_all_of_the_exponential_step() -> None:
    for _ in range(50):
        for failure, delay in enumerate(delays(backoff(), 8)):
            step = min(10.0, 2.0**failure)
            assert step / 2 <= delay <= step


def test_a_long_outage_stays_at_the_cap() -> None:
    # 2**n must not overflow after days of failures.
    assert delays(backoff(1.0), 2000)[-1] == 10.0


def test_a_success_starts_again_from_the_first_delay() -> None:
    policy = backoff(1.0)
    assert delays(policy, 5)[-1] == 10.0
    assert policy.failing
    policy.succeeded()
    assert not policy.failing
    assert policy.last_error is None
    assert delays(policy, 3) == [1.0, 2.0, 4.0]


def test_initial_above_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="initial <= cap"):
        Backoff("the store", initial=5.0, cap=1.0)


# --- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize("asked", [0.0, 0.3, 7.5, 45.0])
def test_retry_after_is_obeyed_exactly_even_beyond_the_backoff_cap(asked: float) -> None:
    policy = backoff(1.0, cap=1.0)
    assert policy.next_delay(BackendUnavailable("busy", retry_after=asked)) == asked


def test_retry_after_is_capped() -> None:
    policy = backoff(1.0, retry_after_cap=20.0)
    assert policy.next_delay(BackendUnavailable("busy", retry_after=3600)) == 20.0
    default = Backoff("the store")
    assert default.next_delay(BackendUnavailable("busy", retry_after=3600)) == RETRY_AFTER_CAP_S
    assert RETRY_AFTER_CAP_S == 60.0


def test_an_outage_without_retry_after_uses_the_exponential_delays() -> None:
    policy = backoff(1.0)
    assert [policy.next_delay(BackendUnavailable("down")) for _ in range(3)] == [1.0, 2.0, 4.0]


def test_last_error_names_the_failure() -> None:
    policy = backoff(1.0)
    policy.next_delay(OSError("disk full"))
    assert policy.last_error == "OSError: disk full"
    policy.next_delay(BackendUnavailable("InfluxDB answered 503"))
    assert policy.last_error == "InfluxDB answered 503"


# --- logging ----------------------------------------------------------------------------------


def levels(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.levelname for record in caplog.records if record.name == LOGGER]


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    policy = backoff()
    delays(policy, 1)
    assert levels(caplog) == ["WARNING"]
    assert "the store failing" in caplog.records[-1].getMessage()
    assert "OSError: connection refused" in caplog.records[-1].getMessage()
    caplog.clear()
    delays(policy, 5)
    assert levels(caplog) == ["DEBUG"] * 5
    caplog.clear()
    policy.succeeded()
    assert levels(caplog) == ["WARNING"]
    assert "the store recovered" in caplog.records[-1].getMessage()
    caplog.clear()
    policy.succeeded()  # no outage, no recovery to report
    assert levels(caplog) == []


def test_a_quiet_backoff_logs_nothing_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    policy = backoff(quiet=True)
    delays(policy, 6)
    policy.succeeded()
    delays(policy, 2)
    policy.succeeded()
    assert levels(caplog) == ["DEBUG"] * 10


@pytest.mark.parametrize("quiet", [False, True], ids=["loud", "quiet"])
def test_a_capped_retry_after_is_not_warned_about_on_every_retry(
    caplog: pytest.LogCaptureFixture, quiet: bool
) -> None:
    # "once when it starts, once when it ends, the retries in between at debug level"
    # (iotmeter.retry): also when the store keeps asking for more than the cap.
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    policy = backoff(quiet=quiet)
    policy.next_delay(BackendUnavailable("busy", retry_after=3600))
    caplog.clear()
    for _ in range(5):
        policy.next_delay(BackendUnavailable("busy", retry_after=3600))
    assert levels(caplog) == ["DEBUG"] * 5


def test_each_outage_line_carries_the_loops_context(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    policy = Backoff("archive sink", log=logging.getLogger(LOGGER), context={"sink": "archive"})
    policy.next_delay(BackendUnavailable("busy", retry_after=3600))
    policy.next_delay(OSError("refused"))
    policy.succeeded()
    ours = [record for record in caplog.records if record.name == LOGGER]
    assert len(ours) == 4  # failing, Retry-After capped, still failing, recovered
    assert [getattr(record, "sink", None) for record in ours] == ["archive"] * 4


def test_recovered_ends_the_outage_but_keeps_the_delays_growing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A connection that is back but drops at once must not be retried in a tight loop.
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    policy = backoff(1.0)
    assert delays(policy, 3) == [1.0, 2.0, 4.0]
    caplog.clear()
    policy.recovered()
    assert not policy.failing
    assert policy.last_error is None
    assert levels(caplog) == ["WARNING"]
    assert "the store recovered" in caplog.records[-1].getMessage()
    caplog.clear()
    assert delays(policy, 1) == [8.0]  # not the first delay again
    assert levels(caplog) == ["WARNING"]  # a new outage starts
    policy.succeeded()
    assert delays(policy, 1) == [1.0]


# --- waiting ----------------------------------------------------------------------------------


async def test_wait_sleeps_the_delay() -> None:
    policy = Backoff("the store", initial=0.05, cap=0.05, random_fraction=lambda: 1.0)
    started = time.monotonic()
    await policy.wait(OSError("connection refused"))
    assert time.monotonic() - started >= 0.05 - 0.001  # (timer slack)
    assert policy.failures == 1


async def test_wait_is_cancellable_at_once() -> None:
    policy = Backoff("the store", initial=30.0, cap=30.0)
    task = asyncio.create_task(policy.wait(BackendUnavailable("down", retry_after=30)))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.5
