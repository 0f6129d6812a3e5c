"""The rules page: a backtest shows what the rule would have raised, and raises nothing."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from playwright.async_api import expect

from tests.browser.conftest import Browsing, Dashboard, unique

TEMPERATURES = (25.0, 31.5, 33.0, 26.0)
"""Over 30 from the second reading to the third: one alert that fired and resolved."""


async def test_backtest_shows_the_alert_the_rule_would_have_raised(
    dashboard: Dashboard, browsing: Browsing
) -> None:
    device = unique("backtested")
    await dashboard.create_device(device)
    first = datetime.now(UTC) - timedelta(minutes=40)
    await dashboard.publish(
        device,
        [
            {"ts": (first + timedelta(minutes=index)).isoformat(), "temperature": value}
            for index, value in enumerate(TEMPERATURES)
        ],
    )
    await dashboard.wait_for_points(device, len(TEMPERATURES))
    # Made after the readings: only a backtest sees them.
    rule = await dashboard.create_rule(unique("Too warm"), device)

    page = await browsing.open(dashboard, "#/rules", key=dashboard.admin_key)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Alert rules")
    row = page.get_by_role("row").filter(has_text=rule["name"])
    await row.get_by_role("button", name="Backtest").click()
    result = page.get_by_test_id("backtest-result")
    await expect(result).to_contain_text(re.compile(r"(?<![0-9])1 alert\b"))
    found = result.get_by_role("row").filter(has_text=device)
    await expect(found).to_have_count(1)
    await expect(found.get_by_role("cell", name="31.5", exact=True)).to_be_visible()  # fired on
    await expect(found.get_by_role("cell", name="33", exact=True)).to_be_visible()  # extreme

    alerts = await dashboard.get_json("/api/v1/alerts", device_id=device)
    assert alerts["total"] == 0, "a backtest raised an alert"
