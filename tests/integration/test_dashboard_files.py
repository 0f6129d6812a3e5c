"""The dashboard's files as the app serves them: public, strict about where scripts come from,
nothing outside the package, and off when switched off."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from iotmeter.app import create_app
from iotmeter.web import STATIC_DIR
from tests.conftest import make_settings


async def client_for(
    sqlite_url: str, tmp_path: Path, **settings: object
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(sqlite_url, tmp_path, **settings))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://iotmeter") as client:
            yield client


def assets_of(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/ui/[^"]+)"', html)


async def test_the_page_and_its_assets_are_served_without_a_key_under_a_strict_policy(
    sqlite_url: str, tmp_path: Path
) -> None:
    async for client in client_for(sqlite_url, tmp_path):
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        # One policy (two would be intersected by the browser), own origin only, nothing inline.
        assert page.headers.get_list("content-security-policy") == [policy]
        assert "script-src 'self';" in policy
        assert "unsafe" not in policy
        assert "connect-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert page.headers["cache-control"] == "no-cache"
        # Nothing inline: no script body, no event handler or style attribute.
        assert not re.search(r"<script>|\son[a-z]+=|\sstyle=", page.text)
        assets = assets_of(page.text)
        assert any(a.endswith(".js") for a in assets)
        assert any(a.endswith(".css") for a in assets)
        for asset in assets:
            response = await client.get(asset)
            assert response.status_code == 200, asset
            assert response.headers["content-security-policy"] == policy
            assert response.headers["x-content-type-options"] == "nosniff"
            # Revalidated, not re-downloaded: the ETag answers 304.
            again = await client.get(asset, headers={"If-None-Match": response.headers["etag"]})
            assert again.status_code == 304
        assert (await client.head("/")).status_code == 200
        # The API keeps its own policy.
        api = await client.get("/api/v1/devices")
        assert api.headers["content-security-policy"].startswith("default-src 'none'")


async def test_nothing_outside_the_dashboards_folder_is_served(
    sqlite_url: str, tmp_path: Path
) -> None:
    async for client in client_for(sqlite_url, tmp_path):
        for path in (
            "/ui/../app.py",
            "/ui/%2e%2e/app.py",
            "/ui/..%2fapp.py",
            "/ui/vendor/../../config.py",
            "/ui/missing.js",
            "/ui/",
        ):
            response = await client.get(path)
            assert response.status_code == 404, path
            assert b"import" not in response.content, path


async def test_the_dashboard_can_be_switched_off(sqlite_url: str, tmp_path: Path) -> None:
    async for client in client_for(sqlite_url, tmp_path, ui_enabled=False):
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/ui/app.css")).status_code == 404
        assert (await client.get("/health")).status_code == 200


def test_every_vendored_library_names_its_version_and_licence() -> None:
    vendor = STATIC_DIR / "vendor"
    libraries = [folder for folder in vendor.iterdir() if folder.is_dir()]
    assert libraries
    for folder in libraries:
        assert (folder / "LICENSE").is_file(), folder
        assert (folder / "VERSION").read_text().strip(), folder


async def test_the_api_documentation_loads_nothing_from_elsewhere(
    sqlite_url: str, tmp_path: Path
) -> None:
    async for client in client_for(sqlite_url, tmp_path):
        for page in ("/docs", "/redoc"):
            html = (await client.get(page)).text
            urls = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', html)
            urls += re.findall(r'url:\s*["\']([^"\']+)["\']', html)
            assert urls, page
            for url in urls:
                assert url.startswith("/"), f"{page} loads {url} from elsewhere"
                assert not url.startswith("//"), f"{page} loads {url} from elsewhere"
                assert (await client.get(url)).status_code == 200, (page, url)


def test_vendored_files_are_the_ones_their_version_file_names() -> None:
    """A vendored file changed by hand (or half-upgraded) no longer matches its recorded hash."""
    for version in (STATIC_DIR / "vendor").glob("*/VERSION"):
        recorded = re.findall(r"sha256 ([0-9a-f]{64})\s+(\S+)", version.read_text())
        assert recorded, version
        for digest, name in recorded:
            content = (version.parent / name).read_bytes()
            assert hashlib.sha256(content).hexdigest() == digest, name
