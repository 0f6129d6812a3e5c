"""What loading the dashboard costs, where it loads from, and what its console says."""

from __future__ import annotations

from urllib.parse import urlsplit

from playwright.async_api import Response, expect

from tests.browser.conftest import (
    Browsing,
    Dashboard,
    csp_violations,
    device_route,
    go,
    sign_in,
    unique,
)

BUDGET_BYTES = 300 * 1024
"""JavaScript and CSS of the first load, uncompressed."""
PAGES = {
    "#/": "Overview",
    "#/devices": "Devices",
    "#/alerts": "Alerts",
    "#/rules": "Alert rules",
    "#/dead-letters": "Dead letters",
}


def is_code(response: Response) -> bool:
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind in ("text/css", "text/javascript", "application/javascript") or kind.endswith(
        ("javascript", "ecmascript")
    )


async def test_first_load_within_budget_from_the_app_alone_without_console_errors(
    dashboard: Dashboard, browsing: Browsing
) -> None:
    device = unique("budget")
    await dashboard.publish(device, {"type": "temperature", "metrics": {"temperature": 21.0}})
    await dashboard.wait_for_points(device, 1)

    page = await browsing.open(dashboard)  # not signed in yet: the sign-in form
    log = browsing.log(page)
    await sign_in(page, dashboard.viewer_key)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Overview")
    await expect(page.get_by_test_id("devices-total")).not_to_be_empty()
    # Everything up to here is the first load (the sign-in form, then the overview).
    code_bytes: dict[str, int] = {}
    for request in list(log.requests):
        response = await request.response()
        if response is not None and is_code(response):
            code_bytes[response.url] = len(await response.body())
    total = sum(code_bytes.values())
    assert code_bytes, "no JavaScript or CSS loaded at all?"
    assert total <= BUDGET_BYTES, f"{total} bytes of JS and CSS: {code_bytes}"

    for route, heading in PAGES.items():
        await go(page, route)
        await expect(page.get_by_role("heading", level=1)).to_have_text(heading)
        # Its data is in (every page has a table), so its requests have all been answered.
        await expect(page.get_by_role("row").nth(1)).to_be_visible()
        await expect(page.locator("[aria-busy='true']")).to_have_count(0)
    await go(page, device_route(device))
    await expect(page.get_by_role("heading", level=1)).to_have_text(device)
    await expect(page.get_by_test_id("chart-temperature")).to_have_attribute("data-points", "1")

    origin = urlsplit(dashboard.base_url)
    foreign = [
        request.url
        for request in log.requests
        if urlsplit(request.url)[:2] != origin[:2] and urlsplit(request.url).scheme != "data"
    ]
    assert foreign == []
    assert log.console_errors == []
    assert log.page_errors == []
    assert await csp_violations(page) == []
    # ...and there is a policy to violate: scripts from the app's origin only.
    policy = (await dashboard.api.get("/")).headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy or (
        "default-src 'self'" in policy and "script-src" not in policy
    ), policy
