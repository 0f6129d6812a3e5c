"""The dashboard without a mouse: sign in, move between pages and open a device with the
keyboard alone, always seeing where the focus is."""

from __future__ import annotations

from playwright.async_api import Page, expect

from tests.browser.conftest import Browsing, Dashboard, unique


async def tab_to(page: Page, name: str, *, limit: int = 40) -> None:
    """Press Tab until the focused element's accessible text is `name`."""
    for _ in range(limit):
        await page.keyboard.press("Tab")
        focused = await page.evaluate(
            "() => { const e = document.activeElement;"
            " const label = e.labels && e.labels.length ? e.labels[0].textContent : '';"
            " return (e.getAttribute('aria-label') || label || e.textContent || '').trim(); }"
        )
        if focused == name:
            # Where the focus is can be seen: an outline or a box shadow.
            visible = await page.evaluate(
                "() => { const s = getComputedStyle(document.activeElement);"
                " return (s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) > 0)"
                " || s.boxShadow !== 'none'; }"
            )
            assert visible, f"{name!r} has the focus but shows no focus ring"
            return
    raise AssertionError(f"{name!r} not reached with {limit} Tabs")


async def test_sign_in_and_open_a_device_with_the_keyboard_alone(
    dashboard: Dashboard, browsing: Browsing
) -> None:
    device = unique("keys")
    await dashboard.create_device(device)
    page = await browsing.open(dashboard, "#/")
    await expect(page.get_by_label("API key")).to_be_visible()
    await page.get_by_label("API key").focus()
    await page.keyboard.type(dashboard.viewer_key)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Overview")

    await tab_to(page, "Devices")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Devices")

    await tab_to(page, "Search")
    await page.keyboard.type(device)
    await expect(page.get_by_role("link", name=device, exact=True)).to_be_visible()
    await tab_to(page, device)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", level=1)).to_have_text(device)

    await tab_to(page, "24 h")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("button", name="24 h", exact=True)).to_have_attribute(
        "aria-pressed", "true"
    )
