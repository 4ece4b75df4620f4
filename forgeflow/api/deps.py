"""The service's shared state and the FastAPI dependencies that hand it to routes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials
from starlette.requests import HTTPConnection

from forgeflow.api.auth import Authenticator, bearer_scheme
from forgeflow.api.hub import EventHub
from forgeflow.api.store import Store, StoredEvent
from forgeflow.engine.registry import PluginRegistry
from forgeflow.plugins import MediaStore
from forgeflow.settings import Settings

if TYPE_CHECKING:
    from forgeflow.api.launcher import Launcher


@dataclass
class ApiState:
    settings: Settings
    store: Store
    hub: EventHub
    registry: PluginRegistry
    media: MediaStore
    auth: Authenticator
    api_url: str
    prefect_api_url: str | None
    launcher: Launcher | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def publish(self, stored: list[StoredEvent]) -> None:
        self.hub.publish_threadsafe(stored)

    def resolve_plugin(self, name: str) -> str:
        try:
            return self.registry.resolve(name).name
        except Exception:
            return name


def get_state(conn: HTTPConnection) -> ApiState:
    return conn.app.state.forgeflow  # type: ignore[no-any-return]


def require_auth(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
) -> None:
    """Dependency of every REST router: the bearer token, when the service requires one. Through
    :data:`~forgeflow.api.auth.bearer_scheme`, so OpenAPI lists the scheme on every route it guards."""
    get_state(request).auth.check_token(credentials.credentials if credentials else None)


def require_worker_auth(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
) -> None:
    """Dependency of the media router: like :func:`require_auth`, and the ingest token also serves
    (worker hosts hold it, not the API token)."""
    get_state(request).auth.check_token(credentials.credentials if credentials else None, worker=True)
