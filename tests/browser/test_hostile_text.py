"""Text from devices and users is shown as text: markup in a device's name, location and
metadata, in an alert's message, a rule's name and a dead letter's payload never runs and never
becomes markup (the page builds its DOM from text nodes; the CSP would also block it)."""

from __future__ import annotations

from playwright.async_api import expect

from tests.browser.conftest import Browsing, Dashboard, device_route, unique

MARKUP = '<img src=x onerror="window.__owned=1"><script>window.__owned=2</script>'


async def test_markup_from_the_api_is_shown_as_text_and_never_runs(
    dashboard: Dashboard, browsing: Browsing
) -> None:
    device = unique("html")
    created = await dashboard.api.post(
        "/api/v1/devices",
        json={
            "id": device,
            "name": f"name {MARKUP}",
            "type": "temperature",
            "location": f"loc {MARKUP}",
            "metadata": {"note": MARKUP},
        },
    )
    assert created.status_code == 201, created.text
    await dashboard.create_alert(device, f"alert {MARKUP}")
    await dashboard.create_rule(f"rule {MARKUP}"[:100], device)
    await dashboard.publish(device, f'{{"temperature": "{MARKUP}"}}'.encode())
    await dashboard.publish(device, MARKUP.encode())

    page = await browsing.open(dashboard, device_route(device), key=dashboard.viewer_key)
    await expect(page.get_by_role("heading", level=1)).to_have_text(device)
    await expect(page.get_by_text(f"name {MARKUP}")).to_be_visible()
    for route, shown in (
        ("#/devices", f"name {MARKUP}"),
        ("#/alerts", f"alert {MARKUP}"),
        ("#/rules", f"rule {MARKUP}"[:100]),
        ("#/dead-letters", MARKUP),
    ):
        await page.goto(dashboard.base_url + "/" + route)
        await expect(page.get_by_text(shown).first).to_be_visible()
    assert await page.evaluate("() => window.__owned") is None
    assert await page.locator("img[src=x], main script").count() == 0
    log = browsing.log(page)
    assert not log.page_errors, log.page_errors
