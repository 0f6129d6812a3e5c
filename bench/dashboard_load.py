"""How fast the dashboard opens: first paint, first data, and what a first load downloads.

    .venv/bin/python bench/dashboard_load.py                  # 100 simulated devices, 10 loads
    .venv/bin/python bench/dashboard_load.py --devices 1000 --loads 20

Starts `iotmeter serve` in a subprocess (SQLite in a temporary folder, the simulator publishing
every second to the broker at --mqtt-url, auth on) and opens the dashboard in Debian's chromium
(Playwright, headless) with a fresh browser context for each load (a cold cache), the admin key
put in the tab's sessionStorage as the sign-in form would. Per load: first contentful paint
(the browser's own Paint Timing entry), the time until the overview shows the device count
(first data: the page, its modules, `/api/v1/whoami` and `/api/v1/stats`), the time until a
device page's first chart has points, and the JavaScript + CSS bytes of the first load.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Page, Response, async_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures.delivery import AppProcess, app_environment

CHROMIUM = "/usr/bin/chromium"
KEY_STORAGE = "iotmeter.apiKey"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--devices", type=int, default=100, help="simulated devices")
    parser.add_argument("--loads", type=int, default=10)
    parser.add_argument(
        "--registered",
        type=int,
        default=0,
        help="also register this many devices (through the API) and time the devices page",
    )
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    return parser.parse_args()


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return (
        f"median {statistics.median(ordered):7.1f}   p90 {p90:7.1f}   "
        f"min {ordered[0]:7.1f}   max {ordered[-1]:7.1f}"
    )


async def one_load(
    browser: Any, base_url: str, key: str, device: str, args: Any
) -> dict[str, float]:
    context = await browser.new_context(viewport={"width": args.width, "height": args.height})
    await context.add_init_script(f"window.sessionStorage.setItem({KEY_STORAGE!r}, {key!r});")
    page: Page = await context.new_page()
    sizes: dict[str, int] = {}

    async def count(response: Response) -> None:
        kind = response.headers.get("content-type", "")
        if "javascript" in kind or "text/css" in kind:
            sizes[response.url] = len(await response.body())

    page.on("response", lambda response: asyncio.ensure_future(count(response)))
    started = time.perf_counter()
    await page.goto(base_url + "/")
    await page.wait_for_function(
        "() => { const e = document.querySelector('[data-testid=devices-total]');"
        " return e && /^[0-9]/.test(e.textContent.trim()) && e.textContent.trim() !== '0'; }"
    )
    first_data_ms = (time.perf_counter() - started) * 1000
    paint = await page.evaluate(
        "() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime"
    )
    await page.wait_for_load_state("load")  # not networkidle: the live stream stays open
    css_js = sum(sizes.values())
    started = time.perf_counter()
    await page.goto(f"{base_url}/#/devices/{device}")
    await page.wait_for_function(
        "() => [...document.querySelectorAll('figure[data-points]')]"
        ".some(f => Number(f.dataset.points) > 0)"
    )
    chart_ms = (time.perf_counter() - started) * 1000
    timings = {
        "first_paint_ms": float(paint or 0),
        "first_data_ms": first_data_ms,
        "device_chart_ms": chart_ms,
        "js_css_bytes": float(css_js),
    }
    if args.registered:
        started = time.perf_counter()
        await page.goto(f"{base_url}/#/devices")
        await page.wait_for_function("() => document.querySelectorAll('tbody tr a').length >= 50")
        timings["devices_page_ms"] = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        first = await page.evaluate("() => document.querySelector('tbody tr a').textContent")
        await page.get_by_role("button", name="Next").click()
        await page.wait_for_function(
            "(first) => { const a = document.querySelector('tbody tr a');"
            " return a && a.textContent !== first; }",
            arg=first,
        )
        timings["devices_next_page_ms"] = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        await page.get_by_label("Search").fill("reg-0099")
        await page.wait_for_function(
            "() => [...document.querySelectorAll('tbody tr a')].every("
            "a => a.textContent.includes('reg-0099'))"
            " && document.querySelectorAll('tbody tr a').length > 0"
        )
        timings["devices_search_ms"] = (time.perf_counter() - started) * 1000
    await context.close()
    return timings


async def register(base_url: str, headers: dict[str, str], count: int) -> None:
    """`count` devices through the API, 16 requests at a time."""
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
        queue = iter(range(count))

        async def worker() -> None:
            for n in queue:
                device = {"id": f"reg-{n:06d}", "name": f"Registered {n}", "type": "meter"}
                response = await client.post("/api/v1/devices", json=device)
                assert response.status_code == 201, response.text

        await asyncio.gather(*(worker() for _ in range(16)))


async def main() -> int:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="iotmeter-dashboard-bench-"))
    env = app_environment(
        database_url=f"sqlite+aiosqlite:///{workdir / 'iotmeter.db'}",
        mqtt_url=args.mqtt_url,
        workdir=workdir,
        client_id=f"dashboard-bench-{time.monotonic_ns()}",
        IOTMETER_SIMULATOR_ENABLED="true",
        IOTMETER_SIMULATOR_DEVICES=str(args.devices),
        IOTMETER_SIMULATOR_INTERVAL_S="1",
        IOTMETER_LOG_LEVEL="WARNING",
    )
    app = AppProcess(env, workdir)
    await app.start(wait="ready")
    try:
        key = app.headers["Authorization"].removeprefix("Bearer ")
        await asyncio.sleep(3)  # a few readings of every simulated device
        if args.registered:
            await register(app.base_url, app.headers, args.registered)
        results: list[dict[str, float]] = []
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM)
            device = "sim-temperature-0001"
            await one_load(browser, app.base_url, key, device, args)  # warms the app, not timed
            for _ in range(args.loads):
                results.append(await one_load(browser, app.base_url, key, device, args))
            await browser.close()
        print(
            f"dashboard, {args.devices} simulated devices publishing every 1 s, "
            f"{args.loads} cold loads at {args.width}x{args.height} (ms):"
        )
        names = ["first_paint_ms", "first_data_ms", "device_chart_ms"]
        if args.registered:
            print(f"  (+ {args.registered:,} registered devices)")
            names += ["devices_page_ms", "devices_next_page_ms", "devices_search_ms"]
        for name in names:
            print(f"  {name:<18} {summary([r[name] for r in results])}")
        sizes = {r["js_css_bytes"] for r in results}
        print(
            f"  JS + CSS of a first load: {', '.join(f'{s / 1024:.1f} KiB' for s in sorted(sizes))}"
        )
    finally:
        await app.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
