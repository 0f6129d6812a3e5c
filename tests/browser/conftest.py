"""Fixtures for the browser tests: the whole app as a process, driven through Debian's chromium.

The app runs as `python -m iotmeter serve` (its real lifespan, auth on as by default) on its own
PostgreSQL database and its own Mosquitto; the admin key is the one it wrote at its first start
and a viewer key is made through the API. One app serves all browser tests (tests use their own
devices, alerts and rules, so they do not see each other's); a test module that needs an app to
itself (the overview counts every device) starts its own with `running_dashboard`.

Chromium is Debian's (`/usr/bin/chromium`, or `IOTMETER_TEST_CHROMIUM`): Playwright's own browser
download cannot work here. A missing chromium is an error, never a skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    Request,
    ViewportSize,
    async_playwright,
    expect,
)

from tests.fixtures.delivery import AppProcess, app_environment
from tests.fixtures.devices import publish
from tests.fixtures.services import (
    Mosquitto,
    create_pg_database,
    drop_pg_database,
    running_mosquitto,
)
from tests.fixtures.waiting import eventually

CHROMIUM = Path(os.environ.get("IOTMETER_TEST_CHROMIUM", "/usr/bin/chromium"))
DESKTOP = ViewportSize(width=1280, height=800)
PHONE = ViewportSize(width=390, height=844)
SIMULATED_DEVICES = 3
"""One device of each of the simulator's three kinds."""
EDIT_BUTTONS = ("Register device", "Edit", "Delete", "Save", "Acknowledge", "Resolve", "New rule")
"""What the UI contract says a viewer must never see."""

# Every `expect(...)` waits this long unless it says otherwise.
expect.set_options(timeout=10_000)


# --- the app ----------------------------------------------------------------------------------


@dataclass
class Dashboard:
    """A running app, its broker, and clients of its API."""

    app: AppProcess
    broker: Mosquitto
    api: httpx.AsyncClient
    """Holds the admin key."""
    admin_key: str
    viewer_key: str

    @property
    def base_url(self) -> str:
        return self.app.base_url

    async def publish(self, device_id: str, document: Any) -> None:
        """Publish as a device does (QoS 1, waits for the PUBACK); bytes go as they are."""
        payload = document if isinstance(document, bytes) else json.dumps(document).encode()
        await asyncio.to_thread(
            publish,
            self.broker.port,
            [(f"iot/{device_id}/telemetry", payload)],
            client_id=f"browser-test-{uuid.uuid4().hex[:8]}",
        )

    async def get_json(self, path: str, **params: Any) -> Any:
        response = await self.api.get(path, params=params)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text}"
        return response.json()

    async def create_device(self, device_id: str, type_: str = "temperature") -> dict[str, Any]:
        response = await self.api.post(
            "/api/v1/devices", json={"id": device_id, "name": f"Test {device_id}", "type": type_}
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def create_alert(self, device_id: str, message: str) -> dict[str, Any]:
        response = await self.api.post(
            "/api/v1/alerts",
            json={"device_id": device_id, "severity": "warning", "message": message},
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def create_rule(self, name: str, device_id: str) -> dict[str, Any]:
        response = await self.api.post(
            "/api/v1/alert-rules",
            json={
                "name": name,
                "kind": "threshold",
                "device_id": device_id,
                "field": "temperature",
                "operator": ">",
                "threshold": 30.0,
            },
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait_for_points(self, device_id: str, count: int, start: str = "-1h") -> None:
        """Until the API serves at least `count` raw points of the device (over all fields)."""
        assert count > 0

        async def points() -> int:
            response = await self.api.get(
                f"/api/v1/devices/{quote(device_id, safe='')}/telemetry", params={"start": start}
            )
            if response.status_code != 200:  # 404 until the device is registered
                return 0
            return sum(len(series["points"]) for series in response.json()["series"])

        await eventually(points, lambda n: n >= count, within=30, what=f"{count} points stored")


@asynccontextmanager
async def running_dashboard(workdir: Path, **settings: str) -> AsyncIterator[Dashboard]:
    """The app (auth on) on a fresh database and a private Mosquitto, with a viewer key."""
    database_url = await create_pg_database("iotmeter_browser")
    try:
        with running_mosquitto() as broker:
            environment = app_environment(
                database_url=database_url,
                mqtt_url=broker.url,
                workdir=workdir,
                client_id=f"iotmeter-browser-{uuid.uuid4().hex[:8]}",
                **settings,
            )
            app = AppProcess(environment, workdir / "app")
            try:
                await app.start(wait="ready")
                admin_key = app.headers["Authorization"].removeprefix("Bearer ")
                async with httpx.AsyncClient(
                    base_url=app.base_url, headers=app.headers, timeout=10.0
                ) as api:
                    response = await api.post(
                        "/api/v1/keys", json={"name": "browser-viewer", "role": "viewer"}
                    )
                    assert response.status_code == 201, response.text
                    yield Dashboard(app, broker, api, admin_key, response.json()["key"])
            finally:
                await app.terminate()
                app.close()
    finally:
        await drop_pg_database(database_url)


def simulator_settings(interval_s: float) -> dict[str, str]:
    return {
        "SIMULATOR_ENABLED": "true",
        "SIMULATOR_DEVICES": str(SIMULATED_DEVICES),
        "SIMULATOR_INTERVAL_S": str(interval_s),
    }


@pytest.fixture(scope="package")
async def dashboard(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Dashboard]:
    """The app shared by the browser tests, with simulated devices publishing (so pages have
    life); package-scoped, so it stops when they are done, not at the end of the whole run."""
    async with running_dashboard(
        tmp_path_factory.mktemp("dashboard"), **simulator_settings(2.0)
    ) as running:
        yield running


# --- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="package")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} not found: apt-get install chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            # As root chromium needs --no-sandbox; a container's small /dev/shm crashes its tabs.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            yield browser
        finally:
            await browser.close()


# Collects what the page's Content-Security-Policy refused (the console says so too, but the
# event carries the directive and the blocked address).
CSP_WATCH = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(
    `${event.effectiveDirective} blocked ${event.blockedURI || "(inline)"} in ${event.sourceFile}`
  );
});
"""


@dataclass
class PageLog:
    """Everything a page did that a test may want to check afterwards."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    document_loads: int = 0
    """Main-frame document requests: a reload or a real navigation adds one."""

    def attach(self, page: Page) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("request", self._on_request)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} ({message.location.get('url')})")

    def _on_request(self, request: Request) -> None:
        self.requests.append(request)
        if request.resource_type == "document" and request.frame.parent_frame is None:
            self.document_loads += 1

    def telemetry_requests(self, since: int = 0) -> list[Request]:
        return [
            request
            for request in self.requests[since:]
            if re.search(r"/api/v1/devices/[^/]+/telemetry$", urlsplit(request.url).path)
        ]


@dataclass
class Browsing:
    """Opens pages of a dashboard in fresh browser contexts (own sessionStorage each)."""

    browser: Browser
    contexts: list[BrowserContext] = field(default_factory=list)
    logs: dict[Page, PageLog] = field(default_factory=dict)

    async def open(
        self,
        dashboard: Dashboard,
        route: str = "#/",
        *,
        key: str | None = None,
        viewport: ViewportSize | None = None,
    ) -> Page:
        """A new page at `route`, signed in with `key` through the sign-in form (if given)."""
        context = await self.browser.new_context(
            viewport=viewport or DESKTOP,
            base_url=dashboard.base_url,
        )
        self.contexts.append(context)
        await context.add_init_script(CSP_WATCH)
        page = await context.new_page()
        log = self.logs[page] = PageLog()
        log.attach(page)
        await page.goto("/" + route)
        if key is not None:
            await sign_in(page, key)
        return page

    def log(self, page: Page) -> PageLog:
        return self.logs[page]

    async def keep_evidence(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for number, (page, log) in enumerate(self.logs.items()):
            stem = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{number}"
            if not page.is_closed():
                await page.screenshot(path=stem.with_suffix(".png"), full_page=True)
            stem.with_suffix(".log").write_text(
                "\n".join(
                    [
                        f"url: {page.url}",
                        *(f"console error: {text}" for text in log.console_errors),
                        *(f"page error: {text}" for text in log.page_errors),
                        *(f"request: {request.method} {request.url}" for request in log.requests),
                    ]
                )
                + "\n"
            )

    async def close(self) -> None:
        for context in self.contexts:
            await context.close()


def output_dir() -> Path:
    """The test run's output folder: `IOTMETER_TEST_OUTPUT`, or `test-output/` at the root."""
    configured = os.environ.get("IOTMETER_TEST_OUTPUT")
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "test-output"


CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@pytest.fixture
async def browsing(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Browsing]:
    """Pages for the test; when it fails, a screenshot of each and what its console said go
    to `<output>/browser-failures/`."""
    opened = Browsing(browser)
    try:
        yield opened
        if request.node.stash.get(CALL_FAILED, False):
            await opened.keep_evidence(output_dir() / "browser-failures", request.node.name)
    finally:
        await opened.close()


# --- what a user does -------------------------------------------------------------------------


async def sign_in(page: Page, key: str) -> None:
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("navigation", name="Main")).to_be_visible()


async def go(page: Page, route: str) -> None:
    """Follow the app's own navigation (a hash change, not a reload)."""
    await page.evaluate("route => { window.location.hash = route; }", route)


def device_route(device_id: str) -> str:
    return f"#/devices/{quote(device_id, safe='')}"


# Why an element cannot be seen whole where it is: past the viewport's sides, or cut off by an
# ancestor that clips or scrolls sideways (null: it can be seen whole).
CUT_OFF = """
element => {
  const rect = element.getBoundingClientRect();
  if (rect.left < 0 || rect.right > document.documentElement.clientWidth + 1) {
    return `past the viewport: [${Math.round(rect.left)}, ${Math.round(rect.right)}]`;
  }
  for (let up = element.parentElement; up; up = up.parentElement) {
    if (getComputedStyle(up).overflowX === "visible") continue;
    const box = up.getBoundingClientRect();
    if (rect.left < box.left - 1 || rect.right > box.right + 1) {
      return `cut off by ${up.tagName.toLowerCase()}.${up.className} at ${Math.round(box.right)}` +
        ` (the element spans ${Math.round(rect.left)} to ${Math.round(rect.right)})`;
    }
  }
  return null;
}
"""


async def cut_off(locator: Locator) -> str | None:
    """Why the element is not seen whole without scrolling sideways, or None."""
    reason: str | None = await locator.evaluate(CUT_OFF)
    return reason


async def csp_violations(page: Page) -> list[str]:
    found: list[str] = await page.evaluate("() => window.__cspViolations || []")
    return found


# --- reading what the page shows --------------------------------------------------------------


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def number_in(text: str) -> float:
    """The first number in a text the page shows ("1,204", "3.2 msg/s")."""
    found = NUMBER.search(text)
    if found is None:
        raise AssertionError(f"no number in {text!r}")
    return float(found.group().replace(",", ""))


async def shown_number(page: Page, test_id: str) -> float:
    locator = page.get_by_test_id(test_id)
    await expect(locator).to_have_text(NUMBER)
    return number_in(await locator.inner_text())


async def until(
    probe: Callable[[], Awaitable[Any]],
    accept: Callable[[Any], bool],
    *,
    within: float = 10.0,
    what: str,
) -> Any:
    """Poll `probe` (usually something read from the page) until `accept` holds."""
    return await eventually(probe, accept, within=within, interval=0.05, what=what)


DURATION_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_s(text: str) -> float:
    """Seconds of a window length as the API takes it (`10s`, `2m`, `15m`, `1h`)."""
    total, rest = 0.0, text
    while rest:
        found = re.match(r"(\d+)(ms|s|m|h|d|w)", rest)
        if found is None:
            raise AssertionError(f"{text!r} is not a duration")
        total += int(found.group(1)) * DURATION_S[found.group(2)]
        rest = rest[found.end() :]
    return total


def query_of(request: Request) -> dict[str, str]:
    return {name: values[-1] for name, values in parse_qs(urlsplit(request.url).query).items()}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- ordering: the screenshots come last ------------------------------------------------------

SCREENSHOT_MODULE = "test_screenshots.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Screenshot tests run after every other browser test (the pages then hold the data the
    other tests made), in the places the browser tests took, so other folders keep theirs."""
    here = Path(__file__).parent
    places = [index for index, item in enumerate(items) if here in item.path.parents]
    browser_items = [items[index] for index in places]
    ordered = sorted(browser_items, key=lambda item: item.path.name == SCREENSHOT_MODULE)
    for index, item in zip(places, ordered, strict=True):
        items[index] = item
