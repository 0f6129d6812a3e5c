"""The web dashboard: static pages served by the app (`/` and `/ui/...`), no build step.

The pages hold no data: they ask the API for it with the key the user gives them (kept in the
tab's `sessionStorage`), so serving them needs no authentication. Their Content-Security-Policy
(set with the other security headers by `api.guard`) allows nothing but the app's own origin:
no inline script or style, no CDN, so the dashboard and its vendored chart library work
offline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from iotmeter.errors import NotFound

STATIC_DIR = Path(__file__).parent / "static"
INDEX = STATIC_DIR / "index.html"
# Revalidated on every load (ETag / Last-Modified): an upgraded app shows its new pages at once.
CACHE_CONTROL = "no-cache"


class DashboardFiles(StaticFiles):
    """The dashboard's assets, revalidated on every load."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = CACHE_CONTROL
        return response


async def dashboard_page() -> Response:
    """The dashboard's single page (its own routes are in the URL's fragment)."""
    if not INDEX.is_file():
        raise NotFound("the dashboard's files are not installed with this package")
    return FileResponse(INDEX, headers={"Cache-Control": CACHE_CONTROL})


def install_dashboard(app: FastAPI) -> None:
    app.add_api_route("/", dashboard_page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/ui", DashboardFiles(directory=STATIC_DIR, check_dir=False), name="ui")
