"""``/v1/plugins``: installed plugins, their tools and JSON Schemas, lifecycle and health."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from forgeflow.api.deps import ApiState, ScopedRoute, get_state
from forgeflow.api.errors import ApiError, ApiErrorType
from forgeflow.api.models import ErrorBody, PluginDetail, PluginHealth, PluginSummary
from forgeflow.api.store.rows import PluginObservedRow
from forgeflow.plugins.errors import UnknownPlugin

router = APIRouter(prefix="/v1/plugins", tags=["plugins"], route_class=ScopedRoute)

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API token."},
    404: {"model": ErrorBody, "description": "Unknown plugin."},
}


def merged_lifecycle(state: ApiState, name: str, observed: dict[str, PluginObservedRow]) -> dict[str, object]:
    """The lifecycle file (written by this host's workers) merged with what ingested stage events say."""
    return state.registry.status(name).merged_with(observed.get(name)).to_dict()


def _describe(state: ApiState, name: str, schemas: bool) -> PluginDetail:
    try:
        info = state.registry.describe(name, schemas=schemas)
    except UnknownPlugin as exc:
        raise ApiError(404, exc.message, ApiErrorType.NOT_FOUND) from None
    info["lifecycle"] = merged_lifecycle(state, info["name"], state.store.observed_plugins())
    return PluginDetail.model_validate(info)


@router.get("", response_model=list[PluginSummary], summary="Installed plugins", responses=ERRORS)
async def list_plugins(state: ApiState = Depends(get_state)) -> list[PluginSummary]:
    """Every discovered plugin, the unavailable ones too (with the reason)."""

    def run() -> list[PluginSummary]:
        observed = state.store.observed_plugins()
        out = []
        for name in state.registry.names():
            info = state.registry.describe(name)
            info["lifecycle"] = merged_lifecycle(state, name, observed)
            out.append(PluginSummary.model_validate(info))
        return out

    return await run_in_threadpool(run)


@router.get(
    "/{name}", response_model=PluginDetail, summary="A plugin: tools with JSON Schemas, lifecycle", responses=ERRORS
)
async def get_plugin(name: str, state: ApiState = Depends(get_state)) -> PluginDetail:
    """Aliases resolve to the plugin (`videotracker` → `forgesyte-yolo-tracker`)."""
    return await run_in_threadpool(_describe, state, name, True)


@router.get("/{name}/health", response_model=PluginHealth, summary="Health of one plugin", responses=ERRORS)
async def plugin_health(name: str, state: ApiState = Depends(get_state)) -> PluginHealth:
    """`healthy` is false when the plugin is UNAVAILABLE (with the reason) or its last call FAILED."""
    info = await run_in_threadpool(_describe, state, name, False)
    life = info.lifecycle
    return PluginHealth(
        plugin=info.name,
        healthy=info.available and life.state not in ("FAILED", "UNAVAILABLE"),
        state=life.state.value,
        available=info.available,
        reason=info.unavailable_reason or (life.last_error if life.state == "FAILED" else None),
        last_error=life.last_error,
        last_error_type=life.last_error_type,
        calls=life.calls or 0,
        failures=life.failures or 0,
        last_duration_ms=life.last_duration_ms,
        updated_at=life.updated_at or 0.0,
    )
