"""``forgeflow up`` / ``forgeflow down``: the production shape on one machine, in the background.

``up`` starts, each in its own session with its log under ``FORGEFLOW_HOME/stack/``:

1. a Prefect server (API and UI on ``prefect_port``, 4200; its SQLite under ``FORGEFLOW_HOME/prefect``,
   a new one started from the machine's kept empty database (:mod:`forgeflow.jobs.prefect_db_cache`),
   unless ``PREFECT_API_DATABASE_CONNECTION_URL`` names PostgreSQL), then the ``forgeflow-process``
   work pool (``deployments/work-pools/forgeflow-process.json``) and the deployments of
   ``prefect.yaml`` (``prefect deploy --all``);
2. the API on ``api_port`` (8700) in deployment mode: ``POST /v1/jobs`` creates a flow run of
   ``forgeflow-pipeline/pipeline``;
3. this host's engine and ``workers`` Prefect workers polling the pool every second, whose flow runs
   send their messages to the API with the stack's ingest token.

``stack.json`` in the same folder names every process (pid and start time), so ``down`` stops
exactly those: workers first, then the API, the engine and the Prefect server.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from forgeflow.jobs import prefect_db_cache
from forgeflow.processes import pid_alive, process_create_time
from forgeflow.settings import Settings

if TYPE_CHECKING:
    from forgeflow.canonical import JsonObject

#: Where ``prefect.yaml`` and the work pool's template are: the source tree ForgeFlow runs from.
CODE_DIR = Path(__file__).resolve().parents[2]
WORK_POOL = "forgeflow-process"
#: How often a worker asks Prefect for scheduled flow runs (Prefect's default is 10 s).
WORKER_QUERY_S = 1


class StackError(RuntimeError):
    """A part of the stack could not start; the message says which and where its log is."""


@dataclass
class StackProcess:
    name: str
    pid: int
    create_time: float | None
    log: str


@dataclass
class Stack:
    """What ``up`` started, as kept in ``stack.json``."""

    prefect_api_url: str
    api_url: str
    processes: list[StackProcess] = field(default_factory=list)

    @property
    def ui_url(self) -> str:
        return self.prefect_api_url.removesuffix("/api")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Stack:
        data = json.loads(path.read_text())
        return cls(data["prefect_api_url"], data["api_url"], [StackProcess(**p) for p in data["processes"]])


def stack_dir(settings: Settings) -> Path:
    return settings.home / "stack"


def _claim_home(settings: Settings) -> Path:
    """The home's ``stack.json`` path, after making sure no stack of this home runs."""
    folder = stack_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    state = folder / "stack.json"
    if state.exists() and any(pid_alive(p.pid, p.create_time) for p in Stack.load(state).processes):
        raise StackError(f"a stack of {settings.home} is running: `forgeflow down` stops it")
    return state


#: What only the API process holds: the Prefect server, the engine and the workers (which run plugin
#: code and reach the API with the ingest token) never see an API token.
API_CREDENTIALS = ("FORGEFLOW_API_TOKEN", "FORGEFLOW_API_TOKENS_FILE")


def _base_env(settings: Settings) -> dict[str, str]:
    """This process's environment for a part of the stack: its home, no Prefect URL of its own, no API token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL") and k not in API_CREDENTIALS}
    env["FORGEFLOW_HOME"] = str(settings.home)
    return env


def _api_credentials(settings: Settings) -> dict[str, str]:
    env = {}
    if settings.api_token is not None:
        env["FORGEFLOW_API_TOKEN"] = settings.api_token.get_secret_value()
    if settings.api_tokens_file is not None:
        env["FORGEFLOW_API_TOKENS_FILE"] = str(settings.api_tokens_file)
    return env


def _start(name: str, argv: list[str], env: dict[str, str], folder: Path, cwd: Path | None = None) -> StackProcess:
    log = folder / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return StackProcess(name, proc.pid, process_create_time(proc.pid), str(log))


def _wait_http(url: str, part: StackProcess, timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2, headers=headers) as client:  # one CA bundle load, not one per poll
        while time.monotonic() < deadline:
            if not pid_alive(part.pid, part.create_time):
                raise StackError(f"{part.name} exited while starting; see {part.log}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
    raise StackError(f"{part.name} did not answer at {url} within {timeout:g} s; see {part.log}")


def _run(argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None, timeout: float = 300) -> None:
    with log.open("ab") as out:
        code = subprocess.run(
            argv, check=False, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
    if code != 0:
        raise StackError(f"{' '.join(argv[:4])} … failed with exit code {code}; see {log}")


def up(
    settings: Settings,
    *,
    prefect_port: int = 4200,
    api_port: int = 8700,
    workers: int = 1,
    jobs_per_worker: int | None = None,
    worker_env: dict[str, str] | None = None,
    bind: str = "127.0.0.1",
) -> Stack:
    """Start the stack (see the module's docstring); raises :class:`StackError` naming the part that
    failed, after stopping what had started. ``bind``: the address the Prefect server and the API
    listen on (another host's workers need a reachable one; the API then requires its token)."""
    state = _claim_home(settings)
    folder = state.parent
    if not (CODE_DIR / "prefect.yaml").is_file():
        raise StackError(f"prefect.yaml not found in {CODE_DIR}: `forgeflow up` runs from a ForgeFlow source tree")
    python = sys.executable
    prefect_cli = str(Path(python).with_name("prefect"))
    forgeflow_cli = str(Path(python).with_name("forgeflow"))
    base = _base_env(settings)
    # What workers are told: this host's name when the services listen beyond loopback.
    advertised = "127.0.0.1" if bind in ("127.0.0.1", "localhost", "::1") else socket.getfqdn()
    prefect_url = f"http://{advertised}:{prefect_port}/api"
    api_url = f"http://{advertised}:{api_port}"
    stack = Stack(prefect_url, api_url)
    try:
        prefect_home = settings.home / "prefect"
        prefect_home.mkdir(parents=True, exist_ok=True)
        server_env = {**base, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        # A new home's server starts from the machine's kept empty database instead of migrating one.
        fresh_database = prefect_db_cache.prepare_home(prefect_home, settings.prefect_db_cache, server_env)
        server = _start(
            "prefect-server",
            [python, "-m", "forgeflow.jobs.prefect_server", "--host", bind, "--port", str(prefect_port)],
            server_env,
            folder,
        )
        stack.processes.append(server)
        stack.save(state)
        _wait_http(f"{prefect_url}/health", server, 180)
        if fresh_database:  # migrated just now, nothing run yet: the next new home starts from a copy
            prefect_db_cache.keep_copy(prefect_home, settings.prefect_db_cache)

        client_env = {**base, "PREFECT_API_URL": prefect_url, "FORGEFLOW_CODE_DIR": str(CODE_DIR)}
        setup_log = folder / "setup.log"
        _run(
            [prefect_cli, "--no-prompt", "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite",
             "--base-job-template", str(CODE_DIR / "deployments/work-pools/forgeflow-process.json")],
            client_env, setup_log,
        )  # fmt: skip
        _run([prefect_cli, "--no-prompt", "deploy", "--all"], client_env, setup_log, cwd=CODE_DIR)

        ingest_token = settings.ingest_token.get_secret_value() if settings.ingest_token else secrets.token_urlsafe(32)
        token_file = folder / "ingest-token"  # for worker hosts (`forgeflow up --join`); readable by the owner only
        token_file.touch(mode=0o600)
        token_file.write_text(ingest_token + "\n")
        api_env = {
            **client_env,
            "FORGEFLOW_LAUNCH": "deployment",
            "FORGEFLOW_API_HOST": bind,
            "FORGEFLOW_API_PORT": str(api_port),
            "FORGEFLOW_API_URL": api_url,
            "FORGEFLOW_INGEST_TOKEN": ingest_token,
            **_api_credentials(settings),
        }
        if advertised != "127.0.0.1" and not settings.has_api_tokens:
            raise StackError(f"--bind {bind} exposes the API: set FORGEFLOW_API_TOKEN or FORGEFLOW_API_TOKENS_FILE")
        api = _start("api", [forgeflow_cli, "serve"], api_env, folder)
        stack.processes.append(api)
        stack.save(state)
        token = settings.api_token.get_secret_value() if settings.api_token else None
        _wait_http(f"{api_url}/healthz", api, 120, headers={"Authorization": f"Bearer {token}"} if token else None)

        _start_host(settings, prefect_url, api_url, ingest_token, workers, jobs_per_worker, worker_env, state, stack)
    except BaseException:
        down(settings)
        raise
    return stack


def join(
    settings: Settings,
    *,
    prefect_api_url: str,
    api_url: str,
    ingest_token: str,
    workers: int = 1,
    jobs_per_worker: int | None = None,
    worker_env: dict[str, str] | None = None,
) -> Stack:
    """Make this host a worker host of a stack started elsewhere: its engine and ``workers`` Prefect
    workers, which reach the rest only through ``prefect_api_url`` and ``api_url``."""
    state = _claim_home(settings)
    stack = Stack(prefect_api_url.rstrip("/"), api_url.rstrip("/"))
    try:
        _start_host(
            settings,
            stack.prefect_api_url,
            stack.api_url,
            ingest_token,
            workers,
            jobs_per_worker,
            worker_env,
            state,
            stack,
        )
    except BaseException:
        down(settings)
        raise
    return stack


def _start_host(
    settings: Settings,
    prefect_url: str,
    api_url: str,
    ingest_token: str,
    workers: int,
    jobs_per_worker: int | None,
    worker_env: dict[str, str] | None,
    state: Path,
    stack: Stack,
) -> list[StackProcess]:
    """This host's engine and Prefect workers (added to ``stack`` and saved as they start); each
    worker runs at most ``jobs_per_worker`` flow runs at once (None: no limit)."""
    python = sys.executable
    folder = state.parent
    run_env = {
        **_base_env(settings),
        "FORGEFLOW_CODE_DIR": str(CODE_DIR),
        "PREFECT_API_URL": prefect_url,
        "FORGEFLOW_API_URL": api_url,
        "FORGEFLOW_INGEST_TOKEN": ingest_token,
        "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_QUERY_S),
        "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        **(worker_env or {}),
    }
    started: list[StackProcess] = []
    engine = _start("engine", [str(Path(python).with_name("forgeflow")), "engine", "run"], run_env, folder)
    stack.processes.append(engine)
    started.append(engine)
    stack.save(state)
    # Unique per host and home: two homes on one machine stand for two hosts.
    host = f"{os.uname().nodename}-{hashlib.sha256(str(settings.home).encode()).hexdigest()[:6]}"
    names = [f"{host}-{index}" for index in range(1, workers + 1)]
    for index, name in enumerate(names, start=1):
        part = _start(
            f"worker-{index}",
            [python, "-m", "forgeflow.jobs.prefect_worker", "--pool", WORK_POOL, "--name", name]
            + (["--limit", str(jobs_per_worker)] if jobs_per_worker else []),
            run_env,
            folder,
            cwd=CODE_DIR,
        )
        stack.processes.append(part)
        started.append(part)
    stack.save(state)
    _wait_workers(prefect_url, names, started[1:])
    return started


def _wait_workers(prefect_url: str, names: list[str], parts: list[StackProcess], timeout: float = 120) -> None:
    """Until the workers ``names`` of the pool say they are online."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for part in parts:
            if not pid_alive(part.pid, part.create_time):
                raise StackError(f"{part.name} exited while starting; see {part.log}")
        try:
            answer = httpx.post(f"{prefect_url}/work_pools/{WORK_POOL}/workers/filter", json={}, timeout=5)
            online = (
                {w["name"] for w in answer.json() if w.get("status") == "ONLINE"}
                if answer.status_code == 200
                else set()
            )
            if online >= set(names):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise StackError(f"{len(names)} worker(s) did not come online within {timeout:g} s; see {parts[0].log}")


def down(settings: Settings, grace_s: float = 20.0) -> list[str]:
    """Stop what ``up`` started (workers, API, engine, Prefect server: the reverse order); the names
    of the parts that were still running."""
    state = stack_dir(settings) / "stack.json"
    if not state.exists():
        return []
    stopped: list[str] = []
    for part in reversed(Stack.load(state).processes):
        if not pid_alive(part.pid, part.create_time):
            continue
        _stop_group(part.pid, part.create_time, grace_s)
        stopped.append(part.name)
    state.unlink(missing_ok=True)
    return stopped


def _stop_group(pid: int, create_time: float | None, grace_s: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid, create_time):
                return
            time.sleep(0.1)


def status(settings: Settings) -> JsonObject | None:
    """The stack as ``stack.json`` names it, with each process's liveness; None when there is none."""
    state = stack_dir(settings) / "stack.json"
    if not state.exists():
        return None
    stack = Stack.load(state)
    return {
        "prefect_ui": stack.ui_url,
        "prefect_api_url": stack.prefect_api_url,
        "api_url": stack.api_url,
        "processes": [{**asdict(p), "alive": pid_alive(p.pid, p.create_time)} for p in stack.processes],
    }


__all__ = ["Stack", "StackError", "down", "status", "up"]
