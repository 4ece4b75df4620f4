"""``GET /v1/engine``: this host's engine — pools, workers and their warm models, job queue, device slots."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from forgeflow.api.deps import ApiState, ScopedRoute, get_state

router = APIRouter(tags=["engine"], route_class=ScopedRoute)


@router.get(
    "/v1/engine",
    summary="The engine of this host",
    description="`running: false` with the reason when no engine runs (it starts with the first job). "
    "Otherwise its pid, jobs (running, queued), `devices` (slots, running and waiting stages), `pools` "
    "(size, busy, idle, waiting calls per plugin), `workers` (pid, plugin, state, calls, `model_loads`, "
    "resident memory) and the idle-memory budget.",
)
async def engine_status(state: ApiState = Depends(get_state)) -> dict[str, object]:
    from forgeflow.engine.client import EngineClient, EngineUnavailable

    client = EngineClient(state.settings.engine_socket_path, timeout=10.0)
    try:
        return {"running": True, **(await run_in_threadpool(client.status))}
    except EngineUnavailable as exc:
        return {"running": False, "reason": str(exc)}
    finally:
        client.close()
