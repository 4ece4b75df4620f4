"""The engine daemon's control endpoint: HTTP/1.1 on a Unix socket (``<home>/engine.sock``, mode 0600).

Only processes of this host that may open the socket file can reach it: no port, no token. The
engine knows nothing of FastAPI; the API (and ``forgeflow run``, and flow runs that Prefect workers
start) talk to it with :class:`forgeflow.engine.client.EngineClient`. Every body below is a model of
:mod:`forgeflow.engine.control`, which both sides use.

=========================  ===============================================================
``GET /status``            pools, workers, warm models, job queue, device slots
``GET /jobs``              every job the engine knows: status, waiting_for
                          (``?active=1``: only the queued and running ones)
``POST /jobs``             ``{job_id, pipeline, input, sink: {api_url, ingest_token}}`` → 202;
                           with ``"stream": true`` the answer streams the job's events as
                           NDJSON lines (``{"event": ...}``), then ``{"envelope": ...}``
``POST /jobs/{id}/cancel`` stop a job (queued: never starts; running: its stage is killed)
``POST /calls``            run one ``ToolCall`` on the warm pools (admission applies) → CallResult;
                           ``/calls?progress=1`` streams NDJSON: ``{"progress": {done, total,
                           message}}`` lines while the tool runs, then ``{"result": CallResult}``
``POST /warm``             ``{"plugins": [...]}``: start workers ahead of their first call
``POST /owner``            ``{"pid": N}``: the engine leaves once N is gone and no job runs
                           (its owner decides its life: no idle stop from then on)
``POST /idle-stop``        ``{"seconds": S}``: leave after S s without a job or call (0: never)
``POST /shutdown``         ``{"drain": true}``: leave once the running jobs end; else now
=========================  ===============================================================

Run it with ``forgeflow engine start`` (background), ``forgeflow engine run`` (foreground) or
``python -m forgeflow.host``;
``forgeflow run`` starts one in the background when none runs (``--started-by "forgeflow run"``,
``--idle-stop-s`` from ``FORGEFLOW_ENGINE_IDLE_STOP_S``).

Start-up overlaps what the first job waits for: the socket answers at once; the engine's own
Prefect server (when ``PREFECT_API_URL`` names none) starts in its own process while the plugins
named by ``--warm`` (and those of each submitted job) start their workers and load their models;
a job's flow run begins once Prefect answers. A stop, however it comes (idle time, owner gone,
``/shutdown``, SIGTERM), ends the workers, the Prefect server it started and the socket file.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from forgeflow.engine import control
from forgeflow.engine.runners.base import Progress, ToolCall
from forgeflow.events.sinks import EventSink
from forgeflow.host.job import EngineJob, NotAPipelineRun, StreamSink
from forgeflow.processes import pid_alive

if TYPE_CHECKING:  # the core imports jobs (and Prefect with them): only main() imports it, when a daemon starts
    from forgeflow.host.core import Engine
    from forgeflow.jobs.prefect_server import LocalPrefectServer

log = logging.getLogger("forgeflow.engine")

#: How often the engine checks whether its owner is gone.
OWNER_CHECK_S = 1.0


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # many jobs and stage calls connect at once (the default 5 refuses them)


class EngineService:
    """The engine behind its socket, plus its life rules (owner pid, drain)."""

    def __init__(
        self,
        engine: Engine,
        socket_path: Path,
        owner_pid: int | None = None,
        *,
        idle_stop_s: float = 0.0,
        started_by: str | None = None,
    ) -> None:
        self.engine = engine
        self.socket_path = socket_path
        self.owner_pid = owner_pid
        #: Stop after this long without a job or call (0: never).
        self.idle_stop_s = idle_stop_s
        self.started_by = started_by
        self.stopping = False
        self.draining = False
        self.stopped = threading.Event()
        self._server: _Server | None = None

    def serve(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            if _answers(self.socket_path):
                raise RuntimeError(f"an engine already answers on {self.socket_path}")
            self.socket_path.unlink()
        handler = type("Handler", (_Handler,), {"service": self})
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            self._server = _Server(str(self.socket_path), handler)
        finally:
            os.umask(old_umask)
        threading.Thread(target=self._watch, name="engine-owner-watch", daemon=True).start()
        log.info("engine pid %s listening on %s", os.getpid(), self.socket_path)
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._server.server_close()
            try:
                if self.socket_path.exists() and not _answers(self.socket_path):
                    self.socket_path.unlink()
            except OSError:
                pass
            self.engine.close()
            self.stopped.set()

    def stop(self) -> None:
        self.stopping = True
        if self._server is not None:
            threading.Thread(target=self._server.shutdown, daemon=True).start()

    def status(self) -> control.EngineStatus:
        """The engine's status with who started it and when it stops by itself (``forgeflow engine status``)."""
        idle = self.engine.idle_s()
        return self.engine.status().model_copy(
            update={
                "started_by": self.started_by,
                "owner_pid": self.owner_pid,
                "idle_stop_s": self.idle_stop_s,
                "idle_stop_in_s": round(max(0.0, self.idle_stop_s - idle), 1) if self.idle_stop_s else None,
                "draining": self.draining,
                "stopping": self.stopping,
            }
        )

    def _watch(self) -> None:
        while not self.stopped.is_set():
            time.sleep(OWNER_CHECK_S)
            owner_gone = self.owner_pid is not None and not pid_alive(self.owner_pid)
            if (self.draining or owner_gone) and self.engine.active_jobs == 0:
                log.info("engine leaving: %s", "drained" if self.draining else f"owner {self.owner_pid} is gone")
                self.stop()
                return
            if self.idle_stop_s and self.engine.close_if_idle(self.idle_stop_s):
                log.info("engine leaving: no job or call for %g s (idle stop)", self.idle_stop_s)
                self.stop()
                return


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    service: EngineService

    def log_message(self, format: str, *args: object) -> None:
        log.debug("engine request: " + format, *args)

    def address_string(self) -> str:
        return "unix"

    # --- plumbing ----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b"{}"

    def _send(self, status: int, payload: BaseModel | dict[str, control.JobView]) -> None:
        if isinstance(payload, BaseModel):
            data = payload.model_dump_json(fallback=str).encode()  # a pool's extra fields may hold paths
        else:
            data = control.JOBS_ANSWER.dump_json(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, control.ErrorAnswer(error=message))

    def _start_lines(self) -> None:
        """Start an NDJSON answer (one JSON object per line, sent as it comes; the connection closes after)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _line(self, payload: BaseModel) -> None:
        self.wfile.write(payload.model_dump_json(exclude_unset=True, fallback=str).encode() + b"\n")
        self.wfile.flush()

    def _job_or_404(self, job: EngineJob | None) -> None:
        self._send(200, job.view()) if job else self._error(404, "unknown job")

    def do_GET(self) -> None:
        engine = self.service.engine
        if self.path == control.STATUS:
            self._send(200, self.service.status())
        elif self.path == control.JOBS:
            self._send(200, engine.jobs())
        elif self.path == control.ACTIVE_JOBS:
            self._send(200, engine.jobs(active_only=True))
        elif self.path.startswith(control.JOBS + "/"):
            self._job_or_404(engine.job(self.path.split("/", 2)[2]))
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        route = _POST_ROUTES.get(self.path)
        if route is None and self.path.startswith(control.JOBS + "/") and self.path.endswith("/cancel"):
            route = _Handler._cancel
        if route is None:
            self._error(404, f"no route {self.path}")
            return
        body = self._body()
        try:
            route(self, body)
        except ValidationError as exc:  # a body that is not the route's model: say what is wrong
            self._error(400, f"bad request body for {self.path}: {exc}")
        except Exception as exc:  # an engine bug answers 500, never kills the engine
            log.exception("engine request %s failed", self.path)
            try:
                self._error(500, f"{type(exc).__name__}: {exc}")
            except OSError:
                pass

    # --- routes (each validates its body with its model of forgeflow.engine.control) ------------------
    def _submit(self, body: bytes) -> None:
        service, engine = self.service, self.service.engine
        request = control.JOB_REQUEST.validate_json(body)
        if engine.closed:
            self._error(503, "the engine is stopping: start a new one")
            return
        if service.draining:
            service.draining = False  # a new job: whoever sends it wants the engine
        stream = isinstance(request, control.SubmitJob) and request.stream
        sink: EventSink
        if stream:
            sink = StreamSink()
        elif request.sink is not None:
            sink = engine.http_sink(request.sink.api_url, request.sink.ingest_token)
        else:
            self._error(400, "a job needs a sink (api_url) or stream: true")
            return
        if isinstance(request, control.HandOverFlowRun):
            try:
                job = engine.submit_flow_run(request.flow_run_id, sink, handed_by=request.handed_by)
            except NotAPipelineRun as exc:
                self._error(409, str(exc))
                return
        else:
            job = engine.submit(request.job_id, request.pipeline, request.input, sink)
        if not stream:
            self._send(202, job.view())
            return
        self._start_lines()
        for event in engine.stream(job):
            self._line(
                control.JobStreamLine(event=event.model_dump(mode="json"))
                if event is not None
                else control.JobStreamLine(envelope=job.envelope, status=job.status)
            )

    def _cancel(self, body: bytes) -> None:
        self._job_or_404(self.service.engine.cancel(self.path.split("/")[2]))

    def _call(self, body: bytes) -> None:
        result = self.service.engine.call(ToolCall.model_validate_json(body))
        self._send(200, result)

    def _call_with_progress(self, body: bytes) -> None:
        call = ToolCall.model_validate_json(body)
        self._start_lines()
        client_gone = False

        def send_progress(progress: Progress) -> None:
            nonlocal client_gone
            if not client_gone:
                try:
                    self._line(control.CallStreamLine(progress=progress))
                except OSError:  # the caller went away; the call still ends normally
                    client_gone = True

        result = self.service.engine.call(call, send_progress)
        if not client_gone:
            self._line(control.CallStreamLine(result=result))

    def _warm(self, body: bytes) -> None:
        request = control.WarmRequest.model_validate_json(body)
        self._send(200, control.WarmAnswer(started=self.service.engine.warm(request.plugins)))

    def _owner(self, body: bytes) -> None:
        service = self.service
        service.owner_pid = control.OwnerRequest.model_validate_json(body).pid
        service.draining = False
        if service.owner_pid is not None:
            service.idle_stop_s = 0.0  # its owner decides when it goes
        self._send(200, control.OwnerAnswer(owner_pid=service.owner_pid))

    def _idle_stop(self, body: bytes) -> None:
        try:
            request = control.IdleStopRequest.model_validate_json(body)
        except ValidationError:
            self._error(400, "seconds must be a number >= 0")
            return
        self.service.idle_stop_s = request.seconds
        self._send(200, self.service.status())

    def _shutdown(self, body: bytes) -> None:
        service = self.service
        if control.ShutdownRequest.model_validate_json(body).drain:
            service.draining = True
            self._send(200, control.ShutdownAnswer(draining=True, active_jobs=service.engine.active_jobs))
        else:
            self._send(200, control.ShutdownAnswer(stopping=True))
            service.stop()


#: ``POST`` routes by path (a job's cancel, whose path names the job, is matched apart).
_POST_ROUTES: dict[str, Callable[[_Handler, bytes], None]] = {
    control.JOBS: _Handler._submit,
    control.CALLS: _Handler._call,
    control.CALLS_WITH_PROGRESS: _Handler._call_with_progress,
    control.WARM: _Handler._warm,
    control.OWNER: _Handler._owner,
    control.IDLE_STOP: _Handler._idle_stop,
    control.SHUTDOWN: _Handler._shutdown,
}


def _answers(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


class PrefectReadiness:
    """Prefect for the engine's jobs, made ready in the background while the engine already takes
    jobs and starts workers: ``import prefect`` and, for a server of the engine's own, its first
    answer. :meth:`wait` is what a job waits for before its flow run."""

    def __init__(self, server: LocalPrefectServer | None, api_url: str, timeout_s: float = 300.0) -> None:
        self.server = server
        self.api_url = api_url
        self.timeout_s = timeout_s
        self.error: BaseException | None = None
        self._done = threading.Event()
        threading.Thread(target=self._prepare, name="engine-prefect-ready", daemon=True).start()

    def _prepare(self) -> None:
        started = time.monotonic()
        try:
            import prefect  # noqa: F401 - imported before the first job, not during it

            if self.server is not None:
                self.server.wait_ready(self.timeout_s)
            log.info("Prefect at %s ready after %.2f s", self.api_url, time.monotonic() - started)
        except BaseException as exc:
            log.error("Prefect at %s did not start: %s", self.api_url, exc)
            self.error = exc
        finally:
            self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise RuntimeError(f"Prefect at {self.api_url} did not start: {self.error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forgeflow.host", description="ForgeFlow's engine for this host.")
    parser.add_argument("--owner-pid", type=int, default=None, help="leave once this process is gone and no job runs")
    parser.add_argument(
        "--idle-stop-s", type=float, default=0.0, help="leave after this many seconds without a job or call (0: never)"
    )
    parser.add_argument("--started-by", default=None, help="who started it (forgeflow engine status shows it)")
    parser.add_argument("--warm", default="", help="plugins (comma-separated) whose workers start at once, in order")
    args = parser.parse_args(argv)
    os.environ["FORGEFLOW_ENGINE_PROCESS"] = "1"  # its flow runs use its own pools (jobs.stages.ENGINE_PROCESS_ENV)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # before Prefect is imported
    # Many flow runs at once meet SQLite's write lock on a local Prefect server (503, retried after
    # a short Retry-After): allow more retries than Prefect's 5 before a run fails to start.
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "30")
    from forgeflow.engine.locks import hold_lifetime_lock
    from forgeflow.redact import install_log_redaction
    from forgeflow.settings import get_settings

    install_log_redaction()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    forgeflow_log = logging.getLogger("forgeflow")
    forgeflow_log.addHandler(handler)
    forgeflow_log.setLevel(logging.INFO)
    forgeflow_log.propagate = False  # Prefect's own handlers would print each line twice
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    if hold_lifetime_lock(settings.home) is None:
        print(f"forgeflow engine: an engine of {settings.home} already runs", file=sys.stderr)
        return 1
    log.info("engine pid %s starting (started by %s)", os.getpid(), args.started_by or "hand")
    prefect_server = None
    if not os.environ.get("PREFECT_API_URL"):  # no server named: one of the engine's own, stopped with it
        from forgeflow.jobs.prefect_server import LocalPrefectServer

        prefect_server = LocalPrefectServer(settings.home / "prefect", db_cache=settings.prefect_db_cache, lean=True)
        os.environ["PREFECT_API_URL"] = prefect_server.launch()  # it migrates its database meanwhile
    try:
        readiness = PrefectReadiness(prefect_server, os.environ["PREFECT_API_URL"])
        from forgeflow.host.core import Engine

        engine = Engine(settings, prefect_ready=readiness.wait)
        service = EngineService(
            engine,
            settings.engine_socket_path,
            args.owner_pid,
            idle_stop_s=max(0.0, args.idle_stop_s),
            started_by=args.started_by,
        )
        signal.signal(signal.SIGTERM, lambda *_: service.stop())
        signal.signal(signal.SIGINT, lambda *_: service.stop())
        warm = [name for name in args.warm.split(",") if name.strip()]
        if warm:
            threading.Thread(target=engine.warm, args=(warm,), name="engine-warm", daemon=True).start()
        try:
            service.serve()
        except RuntimeError as exc:
            print(f"forgeflow engine: {exc}", file=sys.stderr)
            return 1
        return 0
    finally:
        if prefect_server is not None:
            prefect_server.stop()
        log.info("engine pid %s stopped", os.getpid())
