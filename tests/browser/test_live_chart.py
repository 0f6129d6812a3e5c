"""The device page follows the device live: a reading sent over MQTT reaches its chart by itself."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from playwright.async_api import Page, expect

from tests.browser.conftest import Browsing, Dashboard, device_route, unique, until

WINDOW_1H_S = 10
"""The window of the default range (1 h → every=10s): a live point may be drawn at its start."""


async def chart_state(page: Page, field: str) -> tuple[int, datetime | None]:
    chart = page.get_by_test_id(f"chart-{field}")
    points = await chart.get_attribute("data-points")
    last = await chart.get_attribute("data-last-time")
    return int(points or 0), datetime.fromisoformat(last) if last else None


async def test_a_published_reading_reaches_the_chart_within_2_s_without_reload(
    dashboard: Dashboard, browsing: Browsing
) -> None:
    device = unique("live")
    earlier = datetime.now(UTC) - timedelta(minutes=20)
    await dashboard.publish(
        device,
        {"ts": earlier.isoformat(), "type": "temperature", "metrics": {"temperature": 20.5}},
    )
    await dashboard.wait_for_points(device, 1)

    page = await browsing.open(dashboard, device_route(device), key=dashboard.viewer_key)
    await expect(page.get_by_role("heading", level=1)).to_have_text(device)
    for section in ("Charts", "Raw messages", "Configuration", "Alerts"):
        await expect(page.get_by_role("heading", name=section, exact=True)).to_be_visible()
    chart = page.get_by_test_id("chart-temperature")
    await expect(chart).to_have_attribute("data-points", "1")
    points_before, last_before = await chart_state(page, "temperature")
    assert last_before is not None
    assert last_before <= earlier
    await expect(page.get_by_role("button", name="1 h", exact=True)).to_have_attribute(
        "aria-pressed", "true"
    )
    # A reload or a navigation would lose this.
    await page.evaluate("() => { window.__sameDocument = true; }")

    # Timed from the moment the device starts sending (the publisher's connect included).
    sending = time.monotonic()
    sent_at = datetime.now(UTC)
    sent = asyncio.create_task(
        dashboard.publish(device, {"ts": sent_at.isoformat(), "metrics": {"temperature": 23.25}})
    )
    try:
        await until(
            lambda: chart_state(page, "temperature"),
            lambda state: (
                state[0] == points_before + 1
                and state[1] is not None
                and sent_at - timedelta(seconds=WINDOW_1H_S) < state[1] <= sent_at
            ),
            within=2.0,
            what="the new reading on the chart (data-points + 1, data-last-time at it)",
        )
        took = time.monotonic() - sending
    finally:
        await sent
    assert took <= 2.0, f"the chart took {took:.2f} s"
    assert await page.evaluate("() => window.__sameDocument === true"), "the page was reloaded"
    assert browsing.log(page).document_loads == 1
    latest = page.get_by_test_id("latest-values")
    await expect(latest).to_contain_text("23.25")
