"""ForgeFlow's API service: FastAPI routers per resource, the store, the event hub, the launcher.

``create_app(settings)`` builds the application; ``serve(settings)`` runs it with uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forgeflow.api.app import create_app
    from forgeflow.api.server import serve

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> object:
    if name == "create_app":
        from forgeflow.api.app import create_app

        return create_app
    if name == "serve":
        from forgeflow.api.server import serve

        return serve
    raise AttributeError(name)
