"""The alerts page: acknowledging and resolving there is what the API then says."""

from __future__ import annotations

from typing import Any

from playwright.async_api import Locator, Page, expect

from tests.browser.conftest import Browsing, Dashboard, cut_off, unique
from tests.fixtures.waiting import eventually


def alert_row(page: Page, message: str) -> Locator:
    return page.get_by_role("row").filter(has_text=message)


def status_cell(row: Locator, status: str) -> Locator:
    return row.get_by_role("cell", name=status, exact=True)


async def api_status(dashboard: Dashboard, alert_id: int, status: str) -> dict[str, Any]:
    answer: dict[str, Any] = await eventually(
        lambda: dashboard.get_json(f"/api/v1/alerts/{alert_id}"),
        lambda body: body["status"] == status,
        within=5,
        what=f"the API saying {status}",
    )
    return answer


async def test_acknowledge_then_resolve_in_the_page_changes_the_alert(
    dashboard: Dashboard, browsing: Browsing
) -> None:
    device = unique("alerted")
    await dashboard.create_device(device)
    message = unique("Boiler pressure low")
    alert = await dashboard.create_alert(device, message)
    assert alert["status"] == "active"

    page = await browsing.open(dashboard, "#/alerts", key=dashboard.admin_key)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Alerts")
    row = alert_row(page, message)
    await expect(row).to_have_count(1)
    await expect(status_cell(row, "active")).to_be_visible()
    # On a desktop screen the row's actions are there to click, not behind a sideways scroll.
    for name in ("Acknowledge", "Resolve"):
        assert await cut_off(row.get_by_role("button", name=name)) is None, name

    await row.get_by_role("button", name="Acknowledge").click()
    await expect(status_cell(row, "acknowledged")).to_be_visible()
    await expect(row.get_by_role("button", name="Acknowledge")).to_have_count(0)
    answer = await api_status(dashboard, alert["id"], "acknowledged")
    assert answer["acknowledged_at"] is not None

    await row.get_by_role("button", name="Resolve").click()
    await expect(status_cell(row, "resolved")).to_be_visible()
    await expect(row.get_by_role("button", name="Resolve")).to_have_count(0)
    answer = await api_status(dashboard, alert["id"], "resolved")
    assert answer["resolved_at"] is not None
