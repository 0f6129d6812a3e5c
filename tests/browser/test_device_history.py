"""A week of history: the device page draws long ranges from windows, never from raw points."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from playwright.async_api import Page, Request, expect

from tests.browser.conftest import (
    Browsing,
    Dashboard,
    device_route,
    duration_s,
    query_of,
    unique,
    until,
)

STEP = timedelta(minutes=10)
DAYS = 7
READINGS = DAYS * 24 * 6  # one every 10 minutes for 7 days
BATCH = 144  # a day per message
RANGES = {
    # button: (span, the window the page must ask for)
    "1 h": (timedelta(hours=1), "10s"),
    "24 h": (timedelta(hours=24), "2m"),
    "7 d": (timedelta(days=7), "15m"),
}


def instant(text: str, now: datetime) -> datetime:
    """A time as the API takes it: `now`, relative (`-7d`) or RFC 3339."""
    if text == "now":
        return now
    if text.startswith("-"):
        return now - timedelta(seconds=duration_s(text[1:]))
    return datetime.fromisoformat(text)


def span_of(request: Request) -> timedelta:
    query = query_of(request)
    now = datetime.now(UTC)
    return instant(query.get("stop", "now"), now) - instant(query.get("start", "-1h"), now)


async def seed_week(dashboard: Dashboard, device: str) -> datetime:
    """READINGS readings, one every 10 minutes up to a few minutes ago; returns the newest."""
    await dashboard.create_device(device)
    newest = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=2)
    readings = [
        {"ts": int((newest - index * STEP).timestamp() * 1000), "temperature": 20 + index % 7}
        for index in range(READINGS)
    ]
    for first in range(0, READINGS, BATCH):
        await dashboard.publish(device, readings[first : first + BATCH])
    await dashboard.wait_for_points(device, READINGS, start=f"-{DAYS + 1}d")
    return newest


async def windows_in(dashboard: Dashboard, device: str, span: timedelta, every: str) -> int:
    """The points the API answers for the range in windows: what the chart should show."""
    answer = await dashboard.get_json(
        f"/api/v1/devices/{quote(device, safe='')}/telemetry",
        start=f"-{int(span.total_seconds())}s",
        every=every,
    )
    return sum(len(series["points"]) for series in answer["series"])


async def shown_points(page: Page) -> int:
    return int(await page.get_by_test_id("chart-temperature").get_attribute("data-points") or 0)


async def test_the_7_day_chart_is_drawn_from_windows(
    dashboard: Dashboard, browsing: Browsing
) -> None:
    device = unique("week")
    newest = await seed_week(dashboard, device)

    page = await browsing.open(dashboard, device_route(device), key=dashboard.viewer_key)
    log = browsing.log(page)
    await expect(page.get_by_role("heading", level=1)).to_have_text(device)
    chart = page.get_by_test_id("chart-temperature")
    mark = 0
    for button, (span, every) in RANGES.items():
        if button != "1 h":  # the default
            mark = len(log.requests)
            await page.get_by_role("button", name=button, exact=True).click()
        await expect(page.get_by_role("button", name=button, exact=True)).to_have_attribute(
            "aria-pressed", "true"
        )
        expected = await windows_in(dashboard, device, span, every)
        await until(
            lambda: shown_points(page),
            lambda shown, expected=expected: abs(shown - expected) <= 1,
            what=f"about {expected} points on the {button} chart",
        )
        asked = log.telemetry_requests(since=mark)
        assert asked, f"no telemetry request for {button}"
        for request in asked:
            query = query_of(request)
            assert "every" in query, f"{button}: raw points asked for: {request.url}"
            assert duration_s(query["every"]) >= duration_s(every), request.url
            assert abs(span_of(request) - span) < timedelta(minutes=1), request.url

    # The whole week is drawn, in windows: each 15-minute window holds one or two of the
    # readings 10 minutes apart, so there are 2/3 as many points as readings (raw: all).
    week = await shown_points(page)
    assert abs(week - READINGS * 2 / 3) <= 2, week
    last = await chart.get_attribute("data-last-time")
    assert last is not None
    assert newest - timedelta(minutes=15) <= datetime.fromisoformat(last) <= newest

    # "Download CSV" gives what the chart shows.
    async with page.expect_download() as started:
        await page.get_by_role("button", name="Download CSV").click()
    download = await started.value
    lines = Path(await download.path()).read_text().splitlines()
    assert lines[0] == "device_id,field,ts,value"
    assert abs(len(lines) - 1 - week) <= 1, (len(lines), week)
    assert all(line.startswith(f"{device},temperature,") for line in lines[1:])
