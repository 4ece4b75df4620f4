"""The FastAPI application: ``create_app(settings) -> FastAPI``.

Start-up (lifespan): open the store and migrate it, discover plugins, settle the ingest token,
bind the event hub to the loop, then the launcher imports spooled events, re-attaches or
reconciles the jobs of an earlier run and launches queued ones. Shut-down stops the launcher but
leaves job processes running (a restarted service picks them up).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forgeflow import __version__
from forgeflow.api.auth import Authenticator, check_access_settings
from forgeflow.api.deps import ApiState
from forgeflow.api.errors import install_error_handlers
from forgeflow.api.hub import EventHub
from forgeflow.api.models import ErrorBody
from forgeflow.api.quota import SubmissionQuota
from forgeflow.api.routers import access, batches, engine, events, health, jobs, media, outputs, pipelines, plugins
from forgeflow.api.routers.ui import install_ui
from forgeflow.api.store import Store
from forgeflow.settings import Settings, get_settings

log = logging.getLogger(__name__)

DESCRIPTION = """\
ForgeFlow runs multi-plugin computer-vision pipelines: each job is a Prefect flow run with one
isolated task per stage, and every stage reports realtime messages.

* **Jobs**: `POST /v1/jobs` with `{"pipeline": [stages], "input": {...}}`, a saved template
  `{"pipeline_id", "input"}`, or the legacy `{"plugin_id", "tool_name", "config", "input"}`.
* **Realtime**: `WS /v1/ws/jobs/{job_id}?after_seq=N` (one job) and `WS /v1/ws/jobs?after_cursor=N`
  (all jobs). Messages: `pipeline_stage_start`, `pipeline_stage_progress` (in-stage: `done`,
  `total`, `fraction`, `message`), `pipeline_stage_end`, `pipeline_error`, `pipeline_progress`,
  `job_status` (the terminal one carries the result envelope with the result's size instead of the
  result: `GET /v1/jobs/{id}` has it), each with `type`, `job_id`, `seq` (1, 2, 3 … per job),
  `timestamp` and `event_id`. Stored before they are sent: reconnect with the last `seq` you saw.
* **Auth**: with tokens configured (`FORGEFLOW_API_TOKEN`, named tokens in `FORGEFLOW_API_TOKENS_FILE`;
  required off loopback) every call needs `Authorization: Bearer <token>`; a browser's WebSocket offers
  the subprotocols `forgeflow.v1` and `forgeflow.bearer.<base64url of the token>` instead. A token in a
  URL (`?token=`) is refused. Scopes: `read` (GET, streams), `run` (submit, upload, save templates,
  cancel one's own jobs), `admin` (the rest); each operation lists what it needs, and a call outside
  them is a 403 naming the scope. `GET /v1/auth/me` says what the token may do. Submissions are
  rate-limited per token (429 with `Retry-After`).
* **Errors**: `{"error", "error_type", "field"?, "issues"?}` with a 4xx status; a body that is not
  JSON is a 422 saying `malformed JSON at line L, column C: reason`, with `line` and `column`.
"""

TAGS = [
    {"name": "jobs", "description": "Submit, follow and cancel jobs."},
    {"name": "outputs", "description": "A job's per-frame outputs: listed, paged by frame, downloaded as Parquet."},
    {"name": "pipelines", "description": "Saved pipeline templates and their statistics."},
    {"name": "plugins", "description": "Installed plugins, tools, schemas, lifecycle and health."},
    {"name": "media", "description": "Upload images and videos; use the ref as job input."},
    {"name": "realtime", "description": "Event ingest (internal) and WebSocket streams."},
    {"name": "engine", "description": "This host's engine: warm worker pools, job queue, device slots."},
    {"name": "auth", "description": "The calling token's name and scopes; who cancelled and deleted what."},
    {"name": "health", "description": "Service health."},
]


class BodyLimit:
    """Refuse (413) a request body over ``limit`` bytes (uploads have their own limit): at once when its
    Content-Length says so, else while it streams in (a chunked body is read up to the limit, then
    handed on)."""

    def __init__(self, app: ASGIApp, limit: int, exempt_prefix: str) -> None:
        self.app = app
        self.limit = limit
        self.exempt_prefix = exempt_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt_prefix):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = {
            "error": f"request body over the limit of {self.limit} bytes (FORGEFLOW_MAX_REQUEST_BYTES)",
            "error_type": "RequestTooLarge",
        }
        await JSONResponse(body, status_code=413)(scope, receive, send)


#: What every route behind a token may answer.
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API token."},
    403: {"model": ErrorBody, "description": "The token lacks the scope the operation needs (`missing_scope`)."},
}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


def document_common_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """The errors FastAPI and this app answer outside the routes' own code, in the OpenAPI document:
    a request validation error is an :class:`~forgeflow.api.models.ErrorBody` (not FastAPI's
    ``HTTPValidationError``); an operation with a JSON body answers 400 for a body that cannot be parsed
    (not UTF-8, nested past the parser's limit) and 413 for one over ``FORGEFLOW_MAX_REQUEST_BYTES``."""
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                responses.setdefault("400", _error_response("The body cannot be parsed (not UTF-8 JSON)."))
                responses.setdefault("413", _error_response("Request body over FORGEFLOW_MAX_REQUEST_BYTES."))
            for response in responses.values():
                body = response.get("content", {}).get("application/json", {})
                if body.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                    response["description"] = "Invalid request (the error names the field)."
                    body["schema"] = {"$ref": "#/components/schemas/ErrorBody"}
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def local_api_url(settings: Settings, port: int | None = None) -> str:
    """The URL job processes on this machine use to reach the service."""
    if settings.api_url:
        return settings.api_url.rstrip("/")
    host = settings.api_host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port if port is not None else settings.api_port}"


def build_state(settings: Settings, *, api_url: str, prefect_api_url: str | None) -> ApiState:
    from forgeflow.plugins import MediaStore
    from forgeflow.plugins.lifecycle import LifecycleStore
    from forgeflow.plugins.registry import PluginRegistry

    settings.home.mkdir(parents=True, exist_ok=True)
    store = Store(settings.resolved_database_url)
    store.migrate()
    registry = PluginRegistry.discover(LifecycleStore(settings.lifecycle_db))
    if settings.ingest_token is not None:
        ingest_token = settings.ingest_token.get_secret_value()
    else:
        ingest_token = store.meta_value("ingest_token", lambda: secrets.token_urlsafe(32))
    api_token = settings.api_token.get_secret_value() if settings.api_token else None
    return ApiState(
        settings=settings,
        store=store,
        hub=EventHub(settings.ws_queue_size),
        registry=registry,
        media=MediaStore(settings.media_root),
        auth=Authenticator(api_token, ingest_token, settings.api_tokens_file),
        quota=SubmissionQuota(settings.submit_rate_per_minute, settings.submit_burst),
        api_url=api_url,
        prefect_api_url=prefect_api_url,
    )


#: The OpenAPI document, built once per process: it is a function of the code alone (the routes,
#: their models, the title and version; no setting enters it), and building it costs ~0.3-0.5 s of CPU.
#: The 405 answer's ``Allow`` reads it too. Nothing changes it once built.
_OPENAPI_DOCUMENT: list[dict[str, Any]] = []


def create_app(
    settings: Settings | None = None,
    *,
    api_url: str | None = None,
    prefect_api_url: str | None = None,
    launch_jobs: bool = True,
    prestart_engine: bool = False,
) -> FastAPI:
    """The ForgeFlow API. ``api_url``: where job processes send events (default: the bind address);
    ``prefect_api_url``: the Prefect server job processes use (default: ``PREFECT_API_URL``)."""
    settings = settings or get_settings()
    check_access_settings(settings.api_host, settings.has_api_tokens, settings.api_tokens_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import os

        from forgeflow.api.launching import launcher_for

        state = await run_in_threadpool(
            build_state,
            settings,
            api_url=api_url or local_api_url(settings),
            prefect_api_url=prefect_api_url or os.environ.get("PREFECT_API_URL"),
        )
        state.hub.bind(asyncio.get_running_loop())
        app.state.forgeflow = state
        launcher = launcher_for(state)
        launcher.enabled = launch_jobs
        state.launcher = launcher
        await launcher.start()
        if launch_jobs and prestart_engine:
            launcher.prestart_engine()
        try:
            yield
        finally:
            await launcher.stop()
            state.store.close()

    app = FastAPI(
        title="ForgeFlow",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    install_error_handlers(app)

    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, exempt_prefix="/v1/media")

    # Each of these routers' routes is guarded by the scope it declares or its method implies (ScopedRoute).
    for router in (
        jobs.router,
        batches.router,
        outputs.router,
        pipelines.router,
        pipelines.checks_router,
        plugins.router,
        engine.router,
        media.router,
        access.router,
    ):
        app.include_router(router, responses=UNAUTHORIZED)
    app.include_router(events.router)  # ingest: its own token check; WebSockets check in the handler
    app.include_router(health.router)
    install_ui(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            if not _OPENAPI_DOCUMENT:
                _OPENAPI_DOCUMENT.append(document_common_errors(FastAPI.openapi(app)))
            app.openapi_schema = _OPENAPI_DOCUMENT[0]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
