"""Signing in and out: the key is asked for, checked, kept for the tab, and forgotten."""

from __future__ import annotations

from playwright.async_api import expect

from tests.browser.conftest import Browsing, Dashboard


async def test_sign_in_keeps_the_key_for_the_tab_and_sign_out_forgets_it(
    dashboard: Dashboard, browsing: Browsing
) -> None:
    page = await browsing.open(dashboard, "#/devices")
    navigation = page.get_by_role("navigation", name="Main")
    await expect(page.get_by_label("API key")).to_be_visible()
    await expect(navigation).to_be_hidden()

    await page.get_by_label("API key").fill("iotm_000000000000_not-a-key")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_be_visible()
    await expect(navigation).to_be_hidden()

    await page.get_by_label("API key").fill(dashboard.viewer_key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Devices")  # where it was
    await page.reload()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Devices")  # still signed in
    assert dashboard.viewer_key not in await page.evaluate("() => JSON.stringify(localStorage)")

    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_label("API key")).to_be_visible()
    await expect(navigation).to_be_hidden()
    await page.reload()
    await expect(page.get_by_label("API key")).to_be_visible()
