"""``/ui``: the web page for people — jobs live, a job's stages as they run, its annotated media,
a form to run a pipeline, templates and plugins.

The page is static files in ``forgeflow/api/ui`` (plain HTML, CSS and JavaScript modules: no build
step, nothing fetched from another origin) that talk to the same REST and WebSocket API as any
client, with the same token. The shell itself holds no data, so it is served without a token; the
page asks for one when the API answers 401. A Content-Security-Policy keeps it to this origin.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import JsonValue

from forgeflow import __version__

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

#: The page may load and connect to this origin only (WebSockets included), show media it fetched
#: as blobs, and run no inline script.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)

#: What the Run form offers as a start: the soccer pipeline of ``examples/soccer-analysis.json``.
EXAMPLE_PIPELINE: list[JsonValue] = [
    {"plugin": "forgesyte-yolo-tracker", "tool": "detect_players", "config": {"device": "auto", "confidence": 0.25}},
    {"plugin": "pose-estimator", "tool": "estimate_poses", "config": {"device": "auto", "model": "light"}},
    {"plugin": "classifier", "tool": "classify_actions", "config": {}},
]

router = APIRouter(include_in_schema=False)


@functools.cache
def _page() -> str:
    """index.html with its boot data in a JSON data block (not script: the CSP allows it; ``<`` is
    escaped so no value can end the block). Made once: the file and the data do not change."""
    boot = {"version": __version__, "example_pipeline": EXAMPLE_PIPELINE}
    text = (UI_DIR / "index.html").read_text(encoding="utf-8")
    return text.replace("{{BOOT}}", json.dumps(boot).replace("<", "\\u003c"))


@router.get("/ui", response_class=HTMLResponse)
async def ui_page() -> HTMLResponse:
    return HTMLResponse(
        _page(),
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


def install_ui(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=UI_DIR / "static"), name="ui-static")
