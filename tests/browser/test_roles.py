"""Roles: a viewer is shown no edit control anywhere; an admin is shown them on the same pages."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import (
    EDIT_BUTTONS,
    Browsing,
    Dashboard,
    device_route,
    go,
    unique,
)


@dataclass
class Scene:
    device: str
    alert_message: str
    rule_name: str


@pytest.fixture
async def scene(dashboard: Dashboard) -> Scene:
    """A device with a reading, an active alert and a rule: every page has rows to act on."""
    device = unique("roles")
    await dashboard.publish(device, {"type": "temperature", "metrics": {"temperature": 19.0}})
    await dashboard.wait_for_points(device, 1)
    message = unique("Door open")
    await dashboard.create_alert(device, message)
    rule = unique("Too warm")
    await dashboard.create_rule(rule, device)
    return Scene(device, message, rule)


async def visit(page: Page, scene: Scene, where: str) -> None:
    """Go to a page and wait until its rows are there (an absence means nothing before)."""
    if where == "devices":
        await go(page, "#/devices")
        await expect(page.get_by_role("heading", level=1)).to_have_text("Devices")
        await page.get_by_label("Search").fill(scene.device)
        await expect(page.get_by_role("link", name=scene.device, exact=True)).to_be_visible()
    elif where == "device":
        await go(page, device_route(scene.device))
        await expect(page.get_by_role("heading", level=1)).to_have_text(scene.device)
        await expect(page.get_by_role("heading", name="Configuration")).to_be_visible()
        await expect(page.get_by_test_id("chart-temperature")).to_have_attribute("data-points", "1")
    elif where == "alerts":
        await go(page, "#/alerts")
        await expect(page.get_by_role("heading", level=1)).to_have_text("Alerts")
        await expect(page.get_by_role("row").filter(has_text=scene.alert_message)).to_be_visible()
    else:
        await go(page, "#/rules")
        await expect(page.get_by_role("heading", level=1)).to_have_text("Alert rules")
        await expect(page.get_by_role("row").filter(has_text=scene.rule_name)).to_be_visible()


PAGES = ("devices", "device", "alerts", "rules")
ADMIN_SEES = {
    "devices": ("Register device", "Edit", "Delete"),
    "alerts": ("Acknowledge", "Resolve"),
    "rules": ("New rule",),
}


async def test_a_viewer_sees_no_edit_buttons(
    dashboard: Dashboard, browsing: Browsing, scene: Scene
) -> None:
    page = await browsing.open(dashboard, "#/", key=dashboard.viewer_key)
    for where in PAGES:
        await visit(page, scene, where)
        for name in EDIT_BUTTONS:
            await expect(
                page.get_by_role("button", name=name), f"{name!r} on the {where} page"
            ).to_have_count(0)


async def test_an_admin_sees_them(dashboard: Dashboard, browsing: Browsing, scene: Scene) -> None:
    page = await browsing.open(dashboard, "#/", key=dashboard.admin_key)
    for where in PAGES:
        await visit(page, scene, where)
        for name in ADMIN_SEES.get(where, ()):
            await expect(
                page.get_by_role("button", name=name).first, f"{name!r} on the {where} page"
            ).to_be_visible()
        if where == "device":
            # The contract names no edit control of the device page; it must have one at least.
            shown = [
                name for name in EDIT_BUTTONS if await page.get_by_role("button", name=name).count()
            ]
            assert shown, "an admin sees no edit control on the device page"
