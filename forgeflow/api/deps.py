"""The service's shared state and the FastAPI dependencies that hand it to routes."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from fastapi import Request, Security, params
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, SecurityScopes
from starlette.requests import HTTPConnection

from forgeflow.api.auth import Authenticator, Principal, Scope, bearer_scheme, forbidden
from forgeflow.api.errors import ApiError, ApiErrorType
from forgeflow.api.hub import EventHub
from forgeflow.api.quota import SubmissionQuota
from forgeflow.api.store import Store, StoredEvent
from forgeflow.plugins import MediaStore
from forgeflow.plugins.registry import PluginRegistry
from forgeflow.settings import Settings

if TYPE_CHECKING:
    from forgeflow.jobs.launcher import Launcher


@dataclass
class ApiState:
    settings: Settings
    store: Store
    hub: EventHub
    registry: PluginRegistry
    media: MediaStore
    auth: Authenticator
    quota: SubmissionQuota
    api_url: str
    prefect_api_url: str | None
    launcher: Launcher | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def publish(self, stored: list[StoredEvent]) -> None:
        self.hub.publish_threadsafe(stored)

    def resolve_plugin(self, name: str) -> str:
        try:
            return self.registry.resolve(name).name
        except Exception:
            return name


def api_state(conn: HTTPConnection) -> ApiState:
    return cast(ApiState, conn.app.state.forgeflow)  # create_app (and the tests' apps) set it


# The dependencies below are ``async def`` though nothing in them waits (a token is compared and
# hashed, the tokens file stat()ed, a quota bucket counted): FastAPI runs a plain ``def`` dependency
# in its threadpool, a hop there and back per dependency and request, three on a submission.


async def get_state(conn: HTTPConnection) -> ApiState:
    """The API's state (``Depends(get_state)``); :func:`api_state` outside dependencies."""
    return api_state(conn)


def _authorize(
    request: Request, scopes: SecurityScopes, credentials: HTTPAuthorizationCredentials | None, *, worker: bool
) -> Principal:
    principal = api_state(request).auth.identify(credentials.credentials if credentials else None, worker=worker)
    if not principal.worker:
        for scope in scopes.scopes:
            if not principal.may(scope):
                raise forbidden(principal, Scope(scope))
    return principal


async def authorize(
    request: Request,
    scopes: SecurityScopes,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
) -> Principal:
    """The caller, checked against the scopes its route declares (``Security(authorize, scopes=[...])``);
    through :data:`~forgeflow.api.auth.bearer_scheme`, so OpenAPI lists the scheme and the scopes."""
    return _authorize(request, scopes, credentials, worker=False)


async def authorize_worker(
    request: Request,
    scopes: SecurityScopes,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
) -> Principal:
    """Like :func:`authorize`, and the ingest token also serves (worker hosts hold it, not an API token)."""
    return _authorize(request, scopes, credentials, worker=True)


_GUARDS = (authorize, authorize_worker)

#: The scope a route needs unless it declares its own guard: reading is ``read``, deleting ``admin``,
#: any other write ``run``.
METHOD_SCOPES = {"GET": Scope.READ, "HEAD": Scope.READ, "DELETE": Scope.ADMIN}


def method_scope(methods: set[str]) -> Scope:
    scopes = {METHOD_SCOPES.get(m.upper(), Scope.RUN) for m in methods}
    return max(scopes, key=list(Scope).index)  # the strongest, should a route take several methods


def _declares_guard(endpoint: Callable[..., object], dependencies: Sequence[params.Depends] | None) -> bool:
    declared = [d.dependency for d in dependencies or ()]
    declared += [
        p.default.dependency
        for p in inspect.signature(endpoint).parameters.values()
        if isinstance(p.default, params.Depends)
    ]
    return any(d in _GUARDS for d in declared)


class ScopedRoute(APIRoute):
    """A route behind a token: it declares its guard (``Security(authorize, scopes=[...])`` as a
    dependency or a parameter), or gets the one its method implies (:data:`METHOD_SCOPES`)."""

    guard: Callable[..., Awaitable[Principal]] = authorize

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        dependencies = list(kwargs.pop("dependencies", None) or [])
        if not _declares_guard(endpoint, dependencies):
            scope = method_scope(set(kwargs.get("methods") or {"GET"}))
            dependencies.append(Security(type(self).guard, scopes=[scope]))
        super().__init__(path, endpoint, dependencies=dependencies, **kwargs)


class WorkerScopedRoute(ScopedRoute):
    """A route that the ingest token of worker hosts opens too (the media and batch routes)."""

    guard = authorize_worker


async def within_submission_quota(
    request: Request, principal: Principal = Security(authorize, scopes=[Scope.RUN])
) -> None:
    """Dependency of every route that submits work (jobs; batches when the API takes them): one
    submission from the token's bucket, else 429 with ``Retry-After``."""
    state = api_state(request)
    if principal.name is None:  # an open service: one caller, nobody to be fair to
        return
    wait = state.quota.take(principal.name)
    if wait > 0:
        settings = state.settings
        after = SubmissionQuota.retry_after(wait)
        raise ApiError(
            429,
            f"the token {principal.name!r} submitted more than {settings.submit_burst} jobs at once or "
            f"{settings.submit_rate_per_minute:g} a minute (FORGEFLOW_SUBMIT_BURST, "
            f"FORGEFLOW_SUBMIT_RATE_PER_MINUTE): retry in {after} s",
            ApiErrorType.TOO_MANY_REQUESTS,
            headers={"Retry-After": after},
        )
