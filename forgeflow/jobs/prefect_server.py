"""A local Prefect server as a child process, for the embedded mode, the tests and the benchmarks.

Prefect's ephemeral mode starts a server per process (8–14 s each); a service that launches one
process per job needs one shared server instead. SQLite lives under ``home``.

It is Prefect's own server app (what ``prefect server start`` runs: ``create_app(final=True)`` under
uvicorn) with two additions for SQLite, where the server answered 503 when a write met another one
(``database is locked``, typically ``POST /flow_runs/`` while task-run events were being written):

* its write transactions begin ``IMMEDIATE`` (:func:`_sqlite_writes_wait_their_turn`): a write waits
  for the one writer instead of failing when another committed between its read and its write;
* a 503 answer still carries a short ``Retry-After`` (0.05–0.5 s): without it Prefect's client waits
  2 s (± 20 %) before it retries, which made most back-to-back flow runs take 2.2–2.6 s instead of
  0.25 s.

With PostgreSQL behind Prefect the conflict does not arise.

``python -m forgeflow.jobs.prefect_server --host H --port P`` runs it in the foreground.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil

from forgeflow.jobs import prefect_db_cache
from forgeflow.processes import die_with_parent, pid_alive, process_create_time

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.types import ASGIApp, Message, Receive, Scope, Send


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Services of Prefect's server that a server of one host's engine does without: no deployments to
#: schedule or mark late, no Prefect workers to watch, no pauses, no automations. Task runs
#: (task_run_recorder), events and the clean-up of cancelled runs stay. Off, a server starts with
#: ~40 % less CPU (6 instead of 10 core-s on the 2-core VM) and polls its database less while jobs run.
LEAN_SERVICES_OFF = (
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED",
)


#: How Prefect's task-run recorder writes here (the caller's environment still wins). Prefect's default
#: writes every task-run event in a transaction of its own (batch size 1): a stage's Pending, Running
#: and Completed are three upserts of its ``task_run`` row and three state rows, each behind SQLite's
#: one writer, which made the recorder the Prefect server's largest cost per job. Batched, up to
#: ``BATCH_SIZE`` events (or what came within ``FLUSH_INTERVAL``) are written in one transaction with
#: bulk statements (Prefect's own ``record_bulk_task_run_events``). A task run then reaches the Prefect
#: UI up to a second later; the interval cannot be shorter (Prefect takes its whole seconds: 0.5
#: would be 0, a loop that never sleeps).
TASK_RUN_RECORDER_BATCHING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "50",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}


class LocalPrefectServer:
    """``prefect server start`` on 127.0.0.1 as a child process in its own process group."""

    def __init__(
        self, home: Path, port: int | None = None, *, db_cache: Path | None = None, lean: bool = False
    ) -> None:
        """``db_cache``: where an empty migrated database is kept (:mod:`.prefect_db_cache`): a home
        without a database starts from it, and a server that migrated a fresh one keeps a copy.
        ``lean``: without the services that a server of one host's engine has no use for
        (:data:`LEAN_SERVICES_OFF`; the caller's environment still wins)."""
        self.home = Path(home)
        self.port = port or free_port()
        self.db_cache = db_cache
        self.lean = lean
        self.proc: subprocess.Popen[bytes] | None = None
        self._fresh_database = False

    @property
    def pid_file(self) -> Path:
        return self.home / "server.pid"

    def stop_stale(self) -> bool:
        """Stop a server of this home whose owner is gone (the pid file names both); True if there was
        one. A server also dies with its owner (parent-death signal), so this is the second line: a
        server left by an older ForgeFlow, say. A server whose owner still runs is left alone."""
        try:
            fields = self.pid_file.read_text().split()
            pid, owner = int(fields[0]), int(fields[2])
            created, owner_created = float(fields[1]), float(fields[3])
        except (OSError, ValueError, IndexError):
            return False
        if pid_alive(owner, owner_created) or not pid_alive(pid, created):
            return False
        self.pid_file.unlink(missing_ok=True)
        try:
            if "forgeflow.jobs.prefect_server" not in " ".join(psutil.Process(pid).cmdline()):
                return False
            os.killpg(pid, signal.SIGTERM)
            psutil.Process(pid).wait(15)
        except psutil.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
        return True

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 120.0) -> str:
        """Start it and wait until ``/api/health`` answers; returns the API URL."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> str:
        """Start the server process and return its API URL at once (it answers once its database is
        migrated: :meth:`wait_ready`), so that the caller does other work meanwhile."""
        self.home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
        }
        env.pop("PREFECT_API_URL", None)
        self.stop_stale()
        self._fresh_database = prefect_db_cache.prepare_home(self.home, self.db_cache, env)
        if self.lean:
            for name in LEAN_SERVICES_OFF:
                env.setdefault(name, "false")
        with (self.home / "server.log").open("ab") as log_file:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "forgeflow.jobs.prefect_server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--parent-pid",
                    str(os.getpid()),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        created = process_create_time(self.proc.pid) or 0.0
        owner_created = process_create_time(os.getpid()) or 0.0
        self.pid_file.write_text(f"{self.proc.pid} {created} {os.getpid()} {owner_created}\n")
        return self.api_url

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Wait until the launched server's ``/api/health`` answers; returns the API URL. Stops it and
        raises when it exits or does not answer in time."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        # One client for every poll: a new one loads the CA bundle each time (~20 ms of CPU), which
        # was ~1.5 core-s of a new user's first run while the server started.
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the local Prefect server exited with {self.proc.returncode}; see {self.home / 'server.log'}"
                    )
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        if self._fresh_database:  # migrated just now, nothing run yet: keep a copy
                            self._fresh_database = False
                            prefect_db_cache.keep_copy(self.home, self.db_cache)
                        return self.api_url
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the local Prefect server did not answer within {timeout:g}s")

    def stop(self) -> None:
        self.pid_file.unlink(missing_ok=True)
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


#: What a 503 of the Prefect server tells its clients to wait before retrying: a random delay in
#: this range (seconds), so that clients that collided do not collide again in step.
RETRY_AFTER_S = (0.05, 0.5)


class RetryAfterOn503:
    """ASGI wrapper: every 503 response gets ``Retry-After`` (unless it has one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_hint(message: Message) -> None:
            if message["type"] == "http.response.start" and message.get("status") == 503:
                headers = list(message.get("headers") or [])
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    delay = random.uniform(*RETRY_AFTER_S)
                    headers.append((b"retry-after", f"{delay:.3f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_hint)


def _sqlite_writes_wait_their_turn() -> None:
    """Every write transaction of Prefect's server on SQLite begins ``IMMEDIATE`` (it waits for the
    one writer, up to Prefect's busy timeout), not ``DEFERRED``.

    A deferred transaction that reads and then writes fails at once with "database is locked" when
    another writer committed in between (SQLite cannot upgrade its snapshot); Prefect answers 503 and
    the client sends the request again. In a burst of 20 jobs most flow-run creations went that way
    (33 of 42 requests in one bench run). Prefect's own configuration names the cure; it uses it only
    where it locks rows (``with_for_update``). Left as it is when this Prefect has no such hook."""
    from prefect.server.database import configurations

    config = getattr(configurations, "AioSqliteConfiguration", None)
    begin = getattr(config, "begin_transaction", None)
    if config is None or begin is None or begin.__name__ == "begin_immediate":
        return

    @contextlib.asynccontextmanager
    async def begin_immediate(self: Any, session: Any, with_for_update: bool = False) -> AsyncIterator[Any]:
        async with begin(self, session, with_for_update=True) as transaction:
            yield transaction

    config.begin_transaction = begin_immediate


def main(argv: list[str] | None = None) -> int:
    """Run Prefect's server app (API, UI unless disabled, services) with :class:`RetryAfterOn503`, its
    SQLite writes beginning IMMEDIATE."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m forgeflow.jobs.prefect_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--parent-pid", type=int, default=None, help="stop (SIGTERM) when this process ends")
    args = parser.parse_args(argv)
    from forgeflow.redact import install_log_redaction

    install_log_redaction()  # its access log is one of the stack's logs
    for name, value in TASK_RUN_RECORDER_BATCHING.items():
        os.environ.setdefault(name, value)
    if args.parent_pid is not None:
        # Whoever started the server may be SIGKILLed: the kernel then stops the server too.
        die_with_parent(args.parent_pid, signal.SIGTERM)
    import uvicorn
    from prefect.server.api.server import create_app

    _sqlite_writes_wait_their_turn()

    uvicorn.run(
        RetryAfterOn503(create_app(final=True)),
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_keep_alive=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
