"""``serve(settings)``: run the API with uvicorn (and a local Prefect server when none is configured).

Binds ``settings.api_host`` (127.0.0.1 by default); a non-loopback bind without
``FORGEFLOW_API_TOKEN`` refuses to start. When ``PREFECT_API_URL`` is not set, a local
``prefect server start`` runs as a child process on 127.0.0.1 and a free port, with its SQLite
database under ``FORGEFLOW_HOME/prefect``; job processes get its URL; it stops with the service.

``python -m forgeflow.api.server`` runs the service from the environment's settings.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from forgeflow.api.auth import InsecureBind, check_bind
from forgeflow.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalPrefectServer:
    """``prefect server start`` as a child process (its own process group)."""

    def __init__(self, home: Path, port: int | None = None) -> None:
        self.home = Path(home)
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 120.0) -> str:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        log_file = (self.home / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the local Prefect server exited with {self.proc.returncode}; see {self.home / 'server.log'}"
                )
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self.api_url
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"the local Prefect server did not answer within {timeout:g}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)


def serve(settings: Settings | None = None, *, log_level: str = "info") -> None:
    """Run the API until interrupted. Raises :class:`InsecureBind` for a non-loopback bind without a token."""
    import uvicorn

    from forgeflow.api.app import create_app, local_api_url

    settings = settings or get_settings()
    check_bind(settings.api_host, settings.api_token.get_secret_value() if settings.api_token else None)
    prefect: LocalPrefectServer | None = None
    prefect_url = os.environ.get("PREFECT_API_URL")
    if not prefect_url:
        prefect = LocalPrefectServer(settings.home / "prefect")
        log.info("starting a local Prefect server on %s", prefect.api_url)
        prefect_url = prefect.start()
        os.environ["PREFECT_API_URL"] = prefect_url
    try:
        app = create_app(settings, api_url=local_api_url(settings), prefect_api_url=prefect_url)
        config = uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            ws="websockets-sansio",
            ws_ping_interval=settings.ws_ping_interval_s,
            ws_ping_timeout=settings.ws_ping_interval_s,
            log_level=log_level,
            timeout_graceful_shutdown=5,
            proxy_headers=False,
        )
        uvicorn.Server(config).run()
    finally:
        if prefect is not None:
            prefect.stop()
            os.environ.pop("PREFECT_API_URL", None)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve()
    except InsecureBind as exc:
        print(f"forgeflow serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
