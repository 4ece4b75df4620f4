"""``/v1/auth/me`` (who the token is, what it may do: the page shows only that) and ``/v1/audit``
(who cancelled and deleted what)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Security
from fastapi.concurrency import run_in_threadpool

from forgeflow.api.auth import Principal
from forgeflow.api.deps import ApiState, ScopedRoute, authorize, get_state
from forgeflow.api.models import MAX_POSITION, AuditEntry, AuditList, Caller
from forgeflow.api.store import iso

router = APIRouter(tags=["auth"], route_class=ScopedRoute)


@router.get("/v1/auth/me", response_model=Caller, summary="The calling token: its name and scopes")
async def whoami(
    state: ApiState = Depends(get_state),
    principal: Principal = Security(authorize, scopes=[]),  # any valid token may ask what it is
) -> Caller:
    return Caller.model_validate({**principal.to_dict(), "auth_required": state.auth.required})


@router.get("/v1/audit", response_model=AuditList, summary="Who cancelled and deleted what")
async def audit_log(
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_POSITION),
    state: ApiState = Depends(get_state),
) -> AuditList:
    """Cancels of jobs and deletes of templates, newest first, with the name of the token that asked.
    Who submitted a job or saved a template is on the job (`created_by`) and the template."""
    rows, total = await run_in_threadpool(state.store.audit_entries, limit, offset)
    items = [AuditEntry(at=iso(r["at"]), actor=r["actor"], action=r["action"], target=r["target"]) for r in rows]
    return AuditList(items=items, total=total, limit=limit, offset=offset)
