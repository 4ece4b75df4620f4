"""``serve(settings)``: run the API with uvicorn (and a local Prefect server when none is configured).

Binds ``settings.api_host`` (127.0.0.1 by default); a non-loopback bind without
``FORGEFLOW_API_TOKEN`` refuses to start. When ``PREFECT_API_URL`` is not set, a local
``prefect server start`` runs as a child process on 127.0.0.1 and a free port, with its SQLite
database under ``FORGEFLOW_HOME/prefect``; job processes get its URL; it stops with the service
(SIGTERM, SIGINT) and cannot outlive it (it dies with its parent, even a SIGKILLed one).

``python -m forgeflow.api.server`` runs the service from the environment's settings.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from forgeflow.api.auth import InsecureBind, InvalidTokens, check_access_settings
from forgeflow.jobs.prefect_server import LocalPrefectServer
from forgeflow.settings import Settings, get_settings

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)


def uvicorn_config(app: Any, settings: Settings, *, host: str, log_level: str, **overrides: Any) -> uvicorn.Config:
    """How uvicorn serves the API (``serve`` and the tests' in-process servers alike)."""
    import uvicorn

    options: dict[str, Any] = {
        "ws": "websockets-sansio",
        "ws_ping_interval": settings.ws_ping_interval_s,
        "ws_ping_timeout": settings.ws_ping_interval_s,
        "ws_per_message_deflate": settings.ws_compression,
        "timeout_keep_alive": settings.http_keep_alive_s,
        "timeout_graceful_shutdown": 5,
        "proxy_headers": False,
        **overrides,
    }
    return uvicorn.Config(app, host=host, port=settings.api_port, log_level=log_level, **options)


def serve(settings: Settings | None = None, *, log_level: str = "info") -> None:
    """Run the API until interrupted. Raises :class:`InsecureBind` for a non-loopback bind without a token,
    :class:`InvalidTokens` for a tokens file that is missing or invalid (before anything starts)."""
    import uvicorn

    from forgeflow.api.app import create_app, local_api_url

    settings = settings or get_settings()
    check_access_settings(settings.api_host, settings.has_api_tokens, settings.api_tokens_file)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; with the default handler
    # that ends the process before the `finally` below stops the Prefect server. Exit through it.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    prefect: LocalPrefectServer | None = None
    prefect_url = os.environ.get("PREFECT_API_URL")
    if not prefect_url:
        prefect = LocalPrefectServer(settings.home / "prefect", db_cache=settings.prefect_db_cache)
        log.info("starting a local Prefect server on %s", prefect.api_url)
        prefect_url = prefect.start()
        os.environ["PREFECT_API_URL"] = prefect_url
    try:
        app = create_app(settings, api_url=local_api_url(settings), prefect_api_url=prefect_url, prestart_engine=True)
        uvicorn.Server(uvicorn_config(app, settings, host=settings.api_host, log_level=log_level)).run()
    finally:
        if prefect is not None:
            prefect.stop()
            os.environ.pop("PREFECT_API_URL", None)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main() -> int:
    from forgeflow.redact import install_log_redaction

    install_log_redaction()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve()
    except (InsecureBind, InvalidTokens) as exc:
        print(f"forgeflow serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
