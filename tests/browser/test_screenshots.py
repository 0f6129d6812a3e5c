"""Screenshots of every page at 1280 x 800, after the other browser tests (see conftest).

They go to `test-output/screenshots/` at the repository root, or under `IOTMETER_TEST_OUTPUT`.
Three of them (overview, device, alerts) are the README's, in `docs/screenshots/`: written there
when missing, or every run with `IOTMETER_TEST_UPDATE_SCREENSHOTS=1` (so a test run does not
change tracked files by itself).
"""

from __future__ import annotations

import math
import os
import random
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.browser.conftest import Browsing, Dashboard, device_route, go, output_dir
from tests.fixtures.waiting import eventually

FOR_README = ("overview", "device", "alerts")


@pytest.fixture
def screenshot_dir() -> Path:
    folder = output_dir() / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def with_an_hour_of_history(dashboard: Dashboard, kind: str) -> str:
    """A simulated device of the kind, given the hour before its first message (the session's
    app has run for a minute only: its charts would be a line at the right edge)."""
    listed = await dashboard.get_json("/api/v1/devices", type=kind, limit=100)
    device = next(item for item in listed["items"] if item["id"].startswith("sim-"))
    latest = await eventually(
        lambda: dashboard.get_json(f"/api/v1/devices/{device['id']}/latest"),
        lambda body: len(body["fields"]) >= 2,
        what="the simulated device's first readings",
    )
    now = {name: point["value"] for name, point in latest["fields"].items()}
    began = datetime.fromisoformat(device["created_at"])
    steps = 120  # one every 30 s
    noise = random.Random(7)
    history = [
        {
            "ts": (began - timedelta(seconds=30 * step)).isoformat(),
            **{
                name: round(
                    value
                    + (3 if name == "humidity" else 0.8) * math.sin(step / 19)
                    + noise.gauss(0, 0.08),
                    2,
                )
                for name, value in now.items()
            },
        }
        for step in range(1, steps + 1)
    ]
    await dashboard.publish(device["id"], history)
    await dashboard.wait_for_points(device["id"], steps * len(now), start="-2h")
    return str(device["id"])


async def test_screenshots_of_every_page(
    dashboard: Dashboard, browsing: Browsing, screenshot_dir: Path, repo_root: Path
) -> None:
    device = await with_an_hour_of_history(dashboard, "humidity")
    for severity, message in (
        ("critical", "Temperature above 30 °C for 5 min"),
        ("warning", "No data for 10 min"),
    ):
        response = await dashboard.api.post(
            "/api/v1/alerts", json={"device_id": device, "severity": severity, "message": message}
        )
        assert response.status_code == 201, response.text

    page = await browsing.open(dashboard, "#/", key=dashboard.admin_key)
    shots = {
        "overview": ("#/", "Overview", page.get_by_test_id("devices-by-type")),
        "devices": ("#/devices", "Devices", page.get_by_role("link", name=device, exact=True)),
        "device": (device_route(device), device, page.get_by_test_id("chart-humidity")),
        "alerts": ("#/alerts", "Alerts", page.get_by_role("row").filter(has_text=device).first),
        "rules": ("#/rules", "Alert rules", page.get_by_role("button", name="New rule")),
        "dead-letters": ("#/dead-letters", "Dead letters", page.get_by_role("table")),
    }
    for name, (route, heading, content) in shots.items():
        await go(page, route)
        await expect(page.get_by_role("heading", level=1)).to_have_text(heading)
        await expect(content).to_be_visible()
        if name == "device":
            await expect(content).not_to_have_attribute("data-points", "0")
        path = screenshot_dir / f"{name}.png"
        await page.screenshot(path=path)
        assert path.stat().st_size > 10_000, f"{path} looks empty"

    docs = repo_root / "docs" / "screenshots"
    update = os.environ.get("IOTMETER_TEST_UPDATE_SCREENSHOTS") == "1"
    for name in FOR_README:
        target = docs / f"{name}.png"
        if update or not target.exists():
            docs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(screenshot_dir / f"{name}.png", target)
