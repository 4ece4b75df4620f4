"""``/healthz``: liveness and readiness of the service (open even when a token is required)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from forgeflow import __version__
from forgeflow.api.deps import ApiState, get_state
from forgeflow.api.models import Health

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    summary="Service health",
    responses={503: {"model": Health, "description": "The database does not answer."}},
)
async def healthz(state: ApiState = Depends(get_state)) -> dict[str, object] | JSONResponse:
    try:
        await run_in_threadpool(state.store.ping)
        database = "ok"
    except Exception as exc:
        database = f"error: {type(exc).__name__}"
    launcher = state.launcher
    body: dict[str, object] = {
        "status": "ok" if database == "ok" else "degraded",
        "version": __version__,
        "database": database,
        "jobs_running": launcher.running_count if launcher else 0,
        "jobs_queued": 0,
        "websocket_clients": state.hub.subscriber_count,
    }
    if database == "ok":
        _rows, total = await run_in_threadpool(state.store.list_jobs, ["queued"], 1, 0)
        body["jobs_queued"] = total
        return body
    return JSONResponse(body, status_code=503)
