"""Fixtures shared by every test: an isolated FORGEFLOW_HOME, the real plugin registry, and a real
Prefect server started once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# Hermetic Prefect and Ultralytics before anything imports them.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="forgeflow-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_DIR / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("FORGEFLOW_HOME", str(_SESSION_DIR / "home"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Prefect reads PREFECT_API_URL once, when it is first imported: point it at the session's server
# now, before any test imports Prefect; the server itself starts when a test first needs it.
_OWN_PREFECT_PORT = free_port()
os.environ.setdefault("PREFECT_API_URL", f"http://127.0.0.1:{_OWN_PREFECT_PORT}/api")


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture
def ff_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh FORGEFLOW_HOME for one test; settings are re-read."""
    from forgeflow.settings import get_settings

    home = tmp_path / "ffhome"
    monkeypatch.setenv("FORGEFLOW_HOME", str(home))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture
def registry(ff_home: Path):
    """The registry of installed plugins (built-ins and the test plugins), with its own lifecycle file."""
    from forgeflow.engine.lifecycle import LifecycleStore
    from forgeflow.engine.registry import PluginRegistry

    return PluginRegistry.discover(LifecycleStore(ff_home / "plugins.sqlite"))


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """A real Prefect server (SQLite) for the whole session, at the PREFECT_API_URL set above."""
    from forgeflow.jobs.prefect_server import LocalPrefectServer

    url = os.environ["PREFECT_API_URL"]
    if url != f"http://127.0.0.1:{_OWN_PREFECT_PORT}/api":
        yield url  # the caller brought their own Prefect server
        return
    os.environ["PREFECT_UI_ENABLED"] = "false"
    server = LocalPrefectServer(_SESSION_DIR / "prefect-server", port=_OWN_PREFECT_PORT)
    server.start(timeout=180)
    try:
        yield url
    finally:
        server.stop()
