"""Fixtures of the API tests: a real uvicorn server on a free port (in a thread, or a subprocess
for restart tests), real httpx / websockets clients, the real Prefect server of tests/conftest.py
(for servers that launch jobs), and a store on SQLite or on a throwaway PostgreSQL cluster
(``@pytest.mark.postgres``; only tests marked ``every_database`` run on both). Request validation,
auth and the OpenAPI document are checked in process (``in_process_factory``): no uvicorn, no Prefect."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from forgeflow.processes import pid_alive
from tests.conftest import free_port, wait_http

TOKEN_HEADER = "Authorization"

THREE_STAGES = [
    {"plugin": "testkit", "tool": "numbers", "config": {}},
    {"plugin": "tk", "tool": "scale", "config": {"factor": 3}},
    {"plugin": "testkit", "tool": "total", "config": {}},
]


# --- PostgreSQL -----------------------------------------------------------------------------------


def _pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


@dataclass
class PostgresCluster:
    admin_url: str  # a database the tests may CREATE DATABASE from
    datadir: Path | None = None
    bindir: Path | None = None
    run_as: list[str] = field(default_factory=list)

    def new_database(self) -> str:
        import psycopg

        name = f"ff_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{name}"


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """FORGEFLOW_TEST_POSTGRES_URL, or a throwaway cluster started with initdb/pg_ctl (skips when
    neither is available; CI installs Debian's ``postgresql`` package)."""
    url = os.environ.get("FORGEFLOW_TEST_POSTGRES_URL")
    if url:
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        yield PostgresCluster(url)
        return
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql) and FORGEFLOW_TEST_POSTGRES_URL is unset")
    root = Path(tempfile.mkdtemp(prefix="forgeflow-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    datadir, sockdir = root / "data", root / "sock"
    subprocess.run([*run_as, "mkdir", "-p", str(sockdir)], check=True)
    subprocess.run(
        [
            *run_as,
            str(bindir / "initdb"),
            "-D",
            str(datadir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    port = free_port()
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(datadir),
            "-l",
            str(root / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {sockdir} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200",
            "start",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield PostgresCluster(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", datadir, bindir, run_as)
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(root, ignore_errors=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """An API test runs on SQLite; one marked ``every_database`` (its behaviour depends on the
    database) runs on PostgreSQL too."""
    if "database_url" not in metafunc.fixturenames:
        return
    params = [pytest.param("sqlite", id="sqlite")]
    if metafunc.definition.get_closest_marker("every_database"):
        params.append(pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"))
    metafunc.parametrize("database_url", params, indirect=True)


def _new_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'api.sqlite'}"
    return request.getfixturevalue("postgres_cluster").new_database()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The API's database: SQLite, or PostgreSQL for tests marked ``every_database``."""
    return _new_database(request, tmp_path)


@pytest.fixture(
    params=[pytest.param("sqlite", marks=pytest.mark.fast), pytest.param("postgres", marks=pytest.mark.postgres)]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database for a store-level test (no API server), on both databases; SQLite is in the fast tier."""
    return _new_database(request, tmp_path)


@pytest.fixture
def store(store_url: str) -> Iterator[Any]:
    """A store at the head revision on ``store_url`` (on SQLite a copy of an empty one: see
    :func:`_copy_empty_store`)."""
    from forgeflow.api.store import Store

    _copy_empty_store(store_url)
    store = Store(store_url)
    store.migrate()  # one query at the head: the migrations' own tests are in test_api_store.py
    yield store
    store.close()


# --- the server -----------------------------------------------------------------------------------


@dataclass
class ApiServer:
    url: str
    settings: Any
    app: Any = None
    server: Any = None
    thread: threading.Thread | None = None
    proc: subprocess.Popen[bytes] | None = None
    token: str | None = None

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")

    @property
    def headers(self) -> dict[str, str]:
        return {TOKEN_HEADER: f"Bearer {self.token}"} if self.token else {}

    @property
    def state(self) -> Any:
        return self.app.state.forgeflow

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30, **kwargs)

    @property
    def ingest_token(self) -> str:
        return self.state.auth.ingest_token

    def ingest(self, events: list[dict[str, Any]]) -> httpx.Response:
        return httpx.post(
            f"{self.url}/internal/v1/events",
            json={"events": events},
            headers={TOKEN_HEADER: f"Bearer {self.ingest_token}"},
            timeout=30,
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            if self.thread is not None:
                self.thread.join(30)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def make_settings(home: Path, port: int, database_url: str | None = None, **overrides: Any) -> Any:
    from forgeflow.settings import Settings

    return Settings(home=home, api_port=port, database_url=database_url, **overrides)


def start_thread_server(
    settings: Any, *, prefect_api_url: str | None, launch_jobs: bool = True, token: str | None = None
) -> ApiServer:
    import uvicorn

    from forgeflow.api.app import create_app
    from forgeflow.api.server import uvicorn_config

    app = create_app(settings, prefect_api_url=prefect_api_url, launch_jobs=launch_jobs)
    config = uvicorn_config(
        app, settings, host="127.0.0.1", log_level="warning", ws_ping_interval=5, ws_ping_timeout=20
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="api-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    return ApiServer(f"http://127.0.0.1:{settings.api_port}", settings, app, server, thread, token=token)


def start_subprocess_server(
    home: Path, port: int, *, database_url: str, prefect_api_url: str, extra_env: dict[str, str] | None = None
) -> ApiServer:
    env = {
        **os.environ,
        "FORGEFLOW_HOME": str(home),
        "FORGEFLOW_API_PORT": str(port),
        "FORGEFLOW_DATABASE_URL": database_url,
        "PREFECT_API_URL": prefect_api_url,
        **(extra_env or {}),
    }
    log = (home / f"api-{port}-{int(time.time() * 1000)}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "forgeflow.api.server"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", timeout=60, proc=proc)
    return ApiServer(url, make_settings(home, port, database_url), proc=proc)


@pytest.fixture
def api_factory(request: pytest.FixtureRequest, tmp_path: Path, database_url: str) -> Iterator[Any]:
    """``api_factory(launch_jobs=True, token=None, **setting_overrides)`` → a running :class:`ApiServer`;
    the session's Prefect server is started only for one that launches jobs."""
    servers: list[ApiServer] = []

    def factory(*, launch_jobs: bool = True, token: str | None = None, **overrides: Any) -> ApiServer:
        from pydantic import SecretStr

        if token is not None:
            overrides["api_token"] = SecretStr(token)
        prefect_api_url = request.getfixturevalue("prefect_api_url") if launch_jobs else None
        settings = make_settings(tmp_path / "home", free_port(), database_url, **overrides)
        server = start_thread_server(settings, prefect_api_url=prefect_api_url, launch_jobs=launch_jobs, token=token)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        launcher = server.app.state.forgeflow.launcher if server.app is not None else None
        server.stop()
        for proc in list(launcher.procs.values()) if launcher else []:
            pid = getattr(proc, "pid", None)  # a test that failed half-way leaves no engine running its job
            if pid is not None and pid_alive(pid, getattr(proc, "create_time", None)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def api(api_factory: Any) -> ApiServer:
    """A running API that launches jobs."""
    return api_factory()


@pytest.fixture
def quiet_api(api_factory: Any) -> ApiServer:
    """A running API whose launcher starts nothing (events are posted to the ingest endpoint by the test)."""
    return api_factory(launch_jobs=False)


# --- in process: no uvicorn, no Prefect, no launcher ----------------------------------------------


@dataclass
class InProcessApi:
    """The app of ``create_app`` driven by an in-process client. Its lifespan never runs: the state
    is what ``build_state`` makes (store migrated, plugins discovered, ingest token settled) with no
    launcher, so no job starts, no engine, no Prefect server, and the event hub is not bound to a loop
    (WebSockets need a real server: see ``api_factory``)."""

    app: Any
    client: Any  # fastapi.testclient.TestClient
    settings: Any
    token: str | None = None
    portal: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def state(self) -> Any:
        return self.app.state.forgeflow

    @property
    def headers(self) -> dict[str, str]:
        return {TOKEN_HEADER: f"Bearer {self.token}"} if self.token else {}

    def ingest(self, events: list[dict[str, Any]], token: str | None = None) -> Any:
        return self.client.post(
            "/internal/v1/events",
            json={"events": events},
            headers={TOKEN_HEADER: f"Bearer {token or self.state.auth.ingest_token}"},
        )

    def close(self) -> None:
        try:
            self.client.close()
        finally:  # the portal's thread is not a daemon: left open, it would keep pytest from exiting
            self.portal.close()
            self.state.store.close()


_EMPTY_STORE: list[Path] = []


def _copy_empty_store(database_url: str) -> None:
    """Put an empty store at the head revision where ``database_url`` names a SQLite file that does
    not exist yet: a copy of one this process migrated once (any other URL is left alone). Running
    every migration again costs ~60 ms per store; the migrations themselves are the store tests'
    subject (``test_api_store.py``), and every uvicorn-served API still runs them."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or Path(url.database).exists():
        return
    database = Path(url.database)
    if not _EMPTY_STORE:
        from forgeflow.api.store import Store

        template = Path(tempfile.mkdtemp(prefix="forgeflow-empty-store-")) / "api.sqlite"
        store = Store(f"sqlite:///{template}")
        store.migrate()
        store.close()  # the last connection closed: the WAL is checkpointed into the file
        _EMPTY_STORE.append(template)
    database.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_EMPTY_STORE[0], database)


class _OneHopTransport(httpx.BaseTransport):
    """The app called in the client's event-loop thread with the whole request, its response read
    whole there: one thread hop per request. TestClient's own transport hops for every ASGI message
    and body chunk (~15 per request, ~4 of a ~7 ms request here). Same scope as TestClient's
    (client ``testclient:50000``); an exception in the app still reaches the test. WebSockets go to
    TestClient's transport."""

    def __init__(self, app: Any, portal: Any, websockets: httpx.BaseTransport) -> None:
        self._asgi = httpx.ASGITransport(app=app, client=("testclient", 50000))
        self._portal = portal
        self._websockets = websockets

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme in ("ws", "wss"):
            return self._websockets.handle_request(request)
        whole = httpx.Request(
            request.method, request.url, headers=request.headers, content=request.read(), extensions=request.extensions
        )

        async def call() -> tuple[int, httpx.Headers, bytes]:
            response = await self._asgi.handle_async_request(whole)
            raw = b"".join([chunk async for chunk in response.aiter_raw()])  # as sent: httpx decodes it once
            return response.status_code, response.headers, raw

        status, headers, raw = self._portal.call(call)
        return httpx.Response(status, headers=headers, content=raw, request=request)


def start_in_process(settings: Any, *, token: str | None = None) -> InProcessApi:
    from anyio.from_thread import start_blocking_portal
    from fastapi.testclient import TestClient

    from forgeflow.api.app import build_state, create_app, local_api_url

    _copy_empty_store(settings.resolved_database_url)
    app = create_app(settings, launch_jobs=False)
    app.state.forgeflow = build_state(settings, api_url=local_api_url(settings), prefect_api_url=None)
    # Not entered as a context manager: that would run the lifespan (launcher, spool import, engine).
    client = TestClient(app, headers={TOKEN_HEADER: f"Bearer {token}"} if token else None)
    api = InProcessApi(app, client, settings, token)
    # One event loop thread for all of the client's requests: by default TestClient starts a thread
    # and a loop per request (~2 ms of a ~9 ms request here).
    portal = api.portal.enter_context(start_blocking_portal(**client.async_backend))
    client.portal = portal
    client._transport = _OneHopTransport(app, portal, client._transport)
    return api


@pytest.fixture
def in_process_factory(tmp_path: Path) -> Iterator[Any]:
    """``in_process_factory(token=None, **setting_overrides)`` → a fresh :class:`InProcessApi` (SQLite)."""
    made: list[InProcessApi] = []

    def factory(*, token: str | None = None, **overrides: Any) -> InProcessApi:
        from pydantic import SecretStr

        if token is not None:
            overrides["api_token"] = SecretStr(token)
        home = tmp_path / f"home{len(made)}"
        api = start_in_process(make_settings(home, 8999, f"sqlite:///{home / 'api.sqlite'}", **overrides), token=token)
        made.append(api)
        return api

    yield factory
    for api in made:
        api.close()


@pytest.fixture
def in_process_api(in_process_factory: Any) -> InProcessApi:
    """A fresh in-process API of its own (for tests that store something)."""
    return in_process_factory()


@pytest.fixture(scope="module")
def shared_in_process_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessApi]:
    """One in-process API for a whole module: for requests that must store nothing."""
    home = tmp_path_factory.mktemp("shared-api") / "home"
    api = start_in_process(make_settings(home, 8999, f"sqlite:///{home / 'api.sqlite'}"))
    yield api
    api.close()


# --- helpers --------------------------------------------------------------------------------------


def wait_job(
    client: httpx.Client, job_id: str, statuses: set[str] | None = None, timeout: float = 120
) -> dict[str, Any]:
    statuses = statuses or {"succeeded", "failed", "cancelled", "crashed"}
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
        time.sleep(0.1)


def ws_collect(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    until_close: bool = True,
    count: int | None = None,
    timeout: float = 120,
) -> tuple[list[dict[str, Any]], Any]:
    """Messages of a WebSocket until it closes (or ``count`` arrived); returns them and the close frame."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with connect(url, additional_headers=headers or {}, open_timeout=30) as ws:
        try:
            while count is None or len(messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"got {len(messages)} messages before the timeout")
                messages.append(json.loads(ws.recv(timeout=remaining)))
        except ConnectionClosed:
            pass
        close = ws.protocol.close_rcvd
    return messages, close


def event(job_id: str, kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "job_id": job_id, "event_id": uuid.uuid4().hex, **fields}


def stage_events(
    job_id: str, index: int, plugin: str = "testkit", tool: str = "numbers", ok: bool = True, total: int = 3
) -> list[dict[str, Any]]:
    out = [
        event(job_id, "pipeline_stage_start", stage_index=index, plugin=plugin, tool=tool),
        event(
            job_id,
            "pipeline_stage_end",
            stage_index=index,
            plugin=plugin,
            tool=tool,
            duration_ms=12 + index,
            ok=ok,
            result_size_bytes=100,
        ),
    ]
    if ok:
        out.append(
            event(
                job_id,
                "pipeline_progress",
                stages_total=total,
                stages_completed=index + 1,
                percent=round(100 * (index + 1) / total),
            )
        )
    return out
