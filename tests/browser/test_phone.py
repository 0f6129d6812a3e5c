"""On a phone (390 x 844): the menu is reachable and the devices table works."""

from __future__ import annotations

import re

from playwright.async_api import Page, expect

from tests.browser.conftest import PHONE, Browsing, Dashboard, cut_off, unique

# Elements reaching past the viewport's left or right edge, unless a horizontally scrolling
# container that itself fits holds them (a wide table in such a container is fine: it scrolls).
OVERFLOWING = """
() => {
  const width = document.documentElement.clientWidth;
  const fits = (rect) => rect.left >= -1 && rect.right <= width + 1;
  const inScroller = (element) => {
    for (let up = element.parentElement; up && up !== document.body; up = up.parentElement) {
      const style = getComputedStyle(up);
      if (["auto", "scroll"].includes(style.overflowX) && fits(up.getBoundingClientRect())) {
        return true;
      }
    }
    return false;
  };
  const found = [];
  for (const element of document.body.querySelectorAll("*")) {
    const rect = element.getBoundingClientRect();
    if (rect.width <= 1 || rect.height <= 1) continue;  // nothing to see (visually hidden)
    if (getComputedStyle(element).visibility === "hidden") continue;
    if (fits(rect) || inScroller(element)) continue;
    const name = element.tagName.toLowerCase() + (element.id ? "#" + element.id : "") +
      (element.className && typeof element.className === "string"
        ? "." + element.className.trim().split(/\\s+/).join(".") : "");
    found.push(`${name} [${Math.round(rect.left)}, ${Math.round(rect.right)}]`);
  }
  return {width, pageWidth: document.documentElement.scrollWidth, found};
}
"""


async def overflowing(page: Page) -> dict[str, object]:
    result: dict[str, object] = await page.evaluate(OVERFLOWING)
    return result


async def test_menu_and_devices_table_on_a_phone(dashboard: Dashboard, browsing: Browsing) -> None:
    device = unique("pocket")
    await dashboard.publish(device, {"type": "temperature", "metrics": {"temperature": 18.5}})
    await dashboard.wait_for_points(device, 1)

    page = await browsing.open(dashboard, "#/", key=dashboard.viewer_key, viewport=PHONE)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Overview")
    await expect(
        page.get_by_test_id("devices-by-type").get_by_role("listitem").first
    ).to_be_visible()
    # Compared in the same live state ("reconnecting" is wider, and may wrap the header).
    live = page.get_by_test_id("live-status")
    await expect(live).to_have_text("live")
    header_on_overview = await page.get_by_role("banner").bounding_box()
    assert await overflowing(page) == {
        "width": PHONE["width"],
        "pageWidth": PHONE["width"],
        "found": [],
    }

    navigation = page.get_by_role("navigation", name="Main")
    devices = navigation.get_by_role("link", name="Devices")
    if not await devices.is_visible():  # behind a menu button on a narrow screen
        await page.get_by_role("button", name=re.compile("menu|navigation", re.IGNORECASE)).click()
    # Every link of the menu can be brought into view whole (the menu may scroll sideways).
    for name in ("Overview", "Devices", "Alerts", "Rules", "Dead letters"):
        link = navigation.get_by_role("link", name=name, exact=True)
        await link.scroll_into_view_if_needed()
        assert await cut_off(link) is None, name
    await devices.click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Devices")

    await page.get_by_label("Search").fill(device)
    link = page.get_by_role("link", name=device, exact=True)
    await expect(link).to_be_visible()
    await expect(page.get_by_role("row")).to_have_count(2)  # the header and the device found
    row = page.get_by_role("row").filter(has=link)
    await expect(row.get_by_role("cell", name=re.compile(r"^(online|offline)$"))).to_be_visible()
    assert await overflowing(page) == {
        "width": PHONE["width"],
        "pageWidth": PHONE["width"],
        "found": [],
    }
    # The filters and the pager fit and can be used.
    for control in (
        page.get_by_label("Search"),
        page.get_by_label("Type", exact=True),
        page.get_by_label("Status", exact=True),
        page.get_by_role("button", name="Next"),
    ):
        await control.scroll_into_view_if_needed()
        box = await control.bounding_box()
        assert box is not None, control
        assert 0 <= box["x"] <= box["x"] + box["width"] <= PHONE["width"], (control, box)

    # The header keeps its size: a short page (one device found) does not stretch it.
    await expect(live).to_have_text("live")
    header = await page.get_by_role("banner").bounding_box()
    assert header is not None
    assert header_on_overview is not None
    assert abs(header["height"] - header_on_overview["height"]) <= 2, (header, header_on_overview)

    await link.click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(device)
