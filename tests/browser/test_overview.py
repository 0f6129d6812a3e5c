"""The overview: what the fleet is and that data flows, as the simulator makes it."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import (
    SIMULATED_DEVICES,
    Browsing,
    Dashboard,
    number_in,
    running_dashboard,
    shown_number,
    simulator_settings,
    unique,
    until,
)
from tests.fixtures.waiting import eventually


@pytest.fixture(scope="module")
async def simulated(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Dashboard]:
    """An app of its own: the only devices in it are the simulator's."""
    async with running_dashboard(
        tmp_path_factory.mktemp("overview"), **simulator_settings(0.5)
    ) as running:
        yield running


async def shown_by_type(page: Page) -> dict[str, int]:
    """The `devices-by-type` items as {type: count}, read as a user reads them."""
    container = page.get_by_test_id("devices-by-type")
    await expect(container).to_be_visible()
    texts: list[str] = await container.evaluate(
        """element => {
          const items = element.querySelectorAll("li, tr, dt, [data-type]");
          const chosen = items.length ? [...items] : [...element.children];
          return chosen.map(item => item.innerText);
        }"""
    )
    shown: dict[str, int] = {}
    for text in texts:
        name = re.search(r"[a-z][a-z0-9_]*", text)
        if name is None or not re.search(r"\d", text):
            continue  # a header row
        shown[name.group()] = int(number_in(text[name.end() :]))
    return shown


async def test_overview_shows_the_simulated_fleet_and_live_ingest(
    simulated: Dashboard, browsing: Browsing
) -> None:
    stats = await eventually(
        lambda: simulated.get_json("/api/v1/stats"),
        lambda body: (
            body["devices"]["total"] == SIMULATED_DEVICES
            and body["devices"]["online"] == SIMULATED_DEVICES
        ),
        within=30,
        what="the simulator's devices registered and online",
    )
    listed = await simulated.get_json("/api/v1/devices", limit=100)
    by_type = dict(Counter(device["type"] for device in listed["items"]))
    # The setup itself: one device of each simulated kind, as the API reports them.
    assert by_type == {"temperature": 1, "humidity": 1, "power_meter": 1}
    assert stats["devices"]["by_type"] == by_type

    page = await browsing.open(simulated, "#/", key=simulated.viewer_key)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Overview")
    await expect(page.get_by_test_id("devices-total")).to_have_text(
        re.compile(rf"^\s*{SIMULATED_DEVICES}\s*$")
    )
    await expect(page.get_by_test_id("devices-online")).to_have_text(
        re.compile(rf"^\s*{SIMULATED_DEVICES}\s*$")
    )
    assert await until(lambda: shown_by_type(page), lambda shown: shown == by_type, what="by type")
    await until(
        lambda: shown_number(page, "ingest-rate"),
        lambda rate: rate > 0,
        within=15,
        what="the ingest rate shown above 0",
    )
    await expect(page.get_by_test_id("live-status")).to_have_text(re.compile(r"^\s*live\s*$"))
    assert await shown_number(page, "alerts-active") == 0
    assert await shown_number(page, "spool-depth") >= 0
    dead_letters = page.get_by_test_id("rejected-by-reason").get_by_role(
        "link", name="Dead letters"
    )
    await expect(dead_letters).to_have_attribute("href", re.compile(r"#/dead-letters$"))

    # The page follows the fleet by itself: a new device shows up without a reload.
    newcomer = unique("overview-new")
    await simulated.publish(newcomer, {"type": "pressure", "metrics": {"pressure": 1013.2}})
    await expect(page.get_by_test_id("devices-total")).to_have_text(
        re.compile(rf"^\s*{SIMULATED_DEVICES + 1}\s*$"), timeout=20_000
    )
    assert await until(
        lambda: shown_by_type(page),
        lambda shown: shown == {**by_type, "pressure": 1},
        within=5,
        what="the new type in the by-type list",
    )
    assert browsing.log(page).document_loads == 1
