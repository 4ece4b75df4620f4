"""Fixtures shared by every test: an isolated FORGEFLOW_HOME, the real plugin registry, and a real
Prefect server started once per test session (per pytest-xdist worker: each has its own server,
port and folders; see below)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

# Hermetic Prefect and Ultralytics before anything imports them. Every pytest process gets its own
# folders and Prefect port: an xdist worker inherits the environment of the pytest process that
# started it, so what that process set here (named in _SET_BY_TESTS) is dropped and set afresh;
# what the caller set before pytest started is kept (and shared).
_OWNER, _SET_BY_TESTS = "FORGEFLOW_TESTS_OWNER_PID", "FORGEFLOW_TESTS_SET_VARS"
if os.environ.get(_OWNER) not in (None, str(os.getpid())):
    for _name in os.environ.get(_SET_BY_TESTS, "").split(","):
        os.environ.pop(_name, None)
_set_here: list[str] = []


def _default_env(name: str, value: str) -> None:
    if name not in os.environ:
        os.environ[name] = value
        _set_here.append(name)


_SESSION_DIR = Path(tempfile.mkdtemp(prefix="forgeflow-tests-"))
_default_env("PREFECT_HOME", str(_SESSION_DIR / "prefect"))
_default_env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_default_env("DO_NOT_TRACK", "1")
_default_env("PREFECT_LOGGING_LEVEL", "WARNING")
_default_env("FORGEFLOW_HOME", str(_SESSION_DIR / "home"))
# The docker runner's tests call the test plugins in containers: the test image (scripts/test.sh builds it
# with deployments/build_image.sh cpu --test-plugins); the production image holds none.
_default_env("FORGEFLOW_DOCKER_IMAGE", "forgeflow-worker:cpu-test")
# `forgeflow run` in a test runs the job in its own process unless the test asks for the background
# engine (tests/test_engine/test_background.py): no engine outlives a test.
_default_env("FORGEFLOW_AUTO_ENGINE", "false")
_default_env("FORGEFLOW_PREFECT_DB_CACHE", str(_SESSION_DIR / "prefect-db-cache"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` an ``xdist_group`` test's node id ends with ``@<group>`` (that is how
    pytest-xdist keeps a group in one worker). Stop the run when it does not: a pytest that keeps node
    ids where pytest-xdist cannot change them (pytest 9 with pytest-xdist 3.8) spreads a group over
    the workers without a word, and the stack tests then bring up a stack per worker at once."""
    if not getattr(config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(
            f"--dist loadgroup does not group {len(lost)} tests (e.g. {lost[0]}) with pytest {pytest.__version__}: "
            "install the pytest that pyproject.toml's dev extra names"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def environment(values: Mapping[str, str], unset: Iterable[str] = ()) -> Iterator[None]:
    """``os.environ`` with ``values`` set and ``unset`` removed, as it was again afterwards: for a
    fixture whose processes (a stack, an executor) read their settings from the environment."""
    saved = {key: os.environ.get(key) for key in (*values, *unset)}
    try:
        for key in unset:
            os.environ.pop(key, None)
        os.environ.update(values)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Prefect reads PREFECT_API_URL once, when it is first imported: point it at the session's server
# now, before any test imports Prefect; the server itself starts when a test first needs it.
_OWN_PREFECT_PORT = free_port()
_default_env("PREFECT_API_URL", f"http://127.0.0.1:{_OWN_PREFECT_PORT}/api")
os.environ[_OWNER] = str(os.getpid())
os.environ[_SET_BY_TESTS] = ",".join(_set_here)


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
    from forgeflow.plugins.lifecycle import LifecycleStore
    from forgeflow.plugins.registry import PluginRegistry

    return PluginRegistry.discover(LifecycleStore(ff_home / "plugins.sqlite"))


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """A real Prefect server (SQLite) for the whole session, at the PREFECT_API_URL set above (under
    pytest-xdist: one per worker, at the worker's own port)."""
    from forgeflow.jobs.prefect_server import LocalPrefectServer

    url = os.environ["PREFECT_API_URL"]
    if url != f"http://127.0.0.1:{_OWN_PREFECT_PORT}/api":
        yield url  # the caller brought their own Prefect server
        return
    os.environ["PREFECT_UI_ENABLED"] = "false"
    cache = os.environ.get("FORGEFLOW_PREFECT_DB_CACHE")
    server = LocalPrefectServer(
        _SESSION_DIR / "prefect-server", port=_OWN_PREFECT_PORT, db_cache=Path(cache) if cache else None
    )
    server.start(timeout=180)
    try:
        yield url
    finally:
        server.stop()


def video_frames_and_size(path: Path | str) -> tuple[int, tuple[int, int]]:
    """How many frames OpenCV reads from a video, and their (width, height)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    return count, size
