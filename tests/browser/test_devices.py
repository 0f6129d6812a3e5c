"""The devices page: register, edit and delete a device, as the API then sees it."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from playwright.async_api import Dialog, Locator, Page, expect

from tests.browser.conftest import Browsing, Dashboard, unique
from tests.fixtures.waiting import eventually


def device_row(page: Page, device: str) -> Locator:
    return page.get_by_role("row").filter(has=page.get_by_role("link", name=device, exact=True))


async def api_device(dashboard: Dashboard, device: str) -> tuple[int, dict[str, Any]]:
    response = await dashboard.api.get(f"/api/v1/devices/{quote(device, safe='')}")
    return response.status_code, response.json()


async def test_register_edit_and_delete_a_device(dashboard: Dashboard, browsing: Browsing) -> None:
    page = await browsing.open(dashboard, "#/devices", key=dashboard.admin_key)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Devices")
    confirmations: list[str] = []

    async def accept(dialog: Dialog) -> None:
        confirmations.append(dialog.message)
        await dialog.accept()

    page.on("dialog", accept)
    device = unique("boiler")

    await page.get_by_role("button", name="Register device").click()
    # The form takes the list's place: its fields are the only ones with these labels.
    await page.get_by_label("Device ID").fill(device)
    await page.get_by_label("Name", exact=True).fill("Boiler room")
    await page.get_by_label("Type", exact=True).fill("heating")
    await page.get_by_label("Location").fill("Basement")
    await page.get_by_role("button", name="Save").click()
    status, body = await eventually(
        lambda: api_device(dashboard, device),
        lambda answer: answer[0] == 200,
        within=5,
        what="the device registered",
    )
    assert (body["name"], body["type"], body["location"]) == ("Boiler room", "heating", "Basement")

    await page.get_by_label("Search").fill(device)
    row = device_row(page, device)
    await expect(row).to_contain_text("Boiler room")
    await row.get_by_role("button", name="Edit").click()
    await page.get_by_label("Name", exact=True).fill("Boiler room, east")
    await page.get_by_role("button", name="Save").click()
    await expect(device_row(page, device)).to_contain_text("Boiler room, east")
    status, body = await api_device(dashboard, device)
    assert (status, body["name"], body["location"]) == (200, "Boiler room, east", "Basement")

    await device_row(page, device).get_by_role("button", name="Delete").click()
    await expect(device_row(page, device)).to_have_count(0)
    assert len(confirmations) == 1, "deleted without asking"
    assert device in confirmations[0]
    await eventually(
        lambda: api_device(dashboard, device),
        lambda answer: answer[0] == 404,
        within=5,
        what="the device gone from the API",
    )
