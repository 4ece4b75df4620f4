"""Talking to this host's engine daemon (:mod:`forgeflow.host`): :class:`EngineClient`,
:class:`EngineRunner`, :func:`ensure_engine`. Requests and answers are the models of
:mod:`forgeflow.engine.control`; the client hands its callers their JSON form."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, JsonValue

from forgeflow.canonical import JsonObject
from forgeflow.engine import control
from forgeflow.engine.locks import start_lock
from forgeflow.engine.runners import progress_relay
from forgeflow.engine.runners.base import CallResult, ProgressCallback, ToolCall
from forgeflow.settings import Settings

__all__ = [
    "STARTED_BY_COMMAND",
    "STARTED_BY_RUN",
    "EngineClient",
    "EngineRunner",
    "EngineUnavailable",
    "ensure_engine",
    "start_engine_process",
]


class EngineUnavailable(RuntimeError):
    """No engine answers on the socket, it went away mid-request, or it refused the request
    (``status_code`` then says how: 404 for a job it does not know)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class EngineClient:
    """HTTP over the engine's Unix socket."""

    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self._client = httpx.Client(
            # No TLS over a Unix socket: verify=False skips loading a CA bundle per client.
            transport=httpx.HTTPTransport(uds=str(self.socket_path), verify=False),
            base_url="http://engine",
            timeout=timeout,
        )

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, body: BaseModel | None = None, timeout: float | None = None) -> bytes:
        """The answer's body of one request; a refusal or no answer raises :class:`EngineUnavailable`."""
        if not self.socket_path.exists():
            raise EngineUnavailable(f"no engine socket at {self.socket_path}")
        content = body.model_dump_json().encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            response = self._client.request(
                method,
                path,
                content=content,
                headers=headers,
                timeout=timeout if timeout is not None else self._client.timeout,
            )
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"the engine on {self.socket_path} does not answer: {exc}") from None
        if response.status_code >= 400:
            raise EngineUnavailable(
                f"engine {method} {path}: {response.status_code} {response.text[:500]}", response.status_code
            )
        return response.content

    def _job(
        self, method: str, path: str, body: BaseModel | None = None, timeout: float | None = None
    ) -> control.JobView:
        return control.JobView.model_validate_json(self._request(method, path, body, timeout))

    def alive(self) -> bool:
        try:
            self._request("GET", control.STATUS, timeout=5.0)
            return True
        except EngineUnavailable:
            return False

    def engine_status(self) -> control.EngineStatus:
        """The engine's status, typed."""
        return control.EngineStatus.model_validate_json(self._request("GET", control.STATUS))

    def status(self) -> dict[str, Any]:
        """The engine's status as JSON (what ``forgeflow engine status --json`` and ``GET /v1/engine`` show)."""
        return self.engine_status().model_dump(mode="json")

    def jobs(self, *, active_only: bool = False) -> dict[str, control.JobView]:
        """The engine's jobs by id (``active_only``: the queued and running ones)."""
        return control.JOBS_ANSWER.validate_json(
            self._request("GET", control.ACTIVE_JOBS if active_only else control.JOBS)
        )

    def submit(
        self, job_id: str, pipeline: JsonValue, input_data: JsonObject, *, api_url: str, ingest_token: str | None
    ) -> control.JobView:
        sink = control.SinkTarget(api_url=api_url, ingest_token=ingest_token)
        return self._job(
            "POST", control.JOBS, control.SubmitJob(job_id=job_id, pipeline=pipeline, input=input_data, sink=sink)
        )

    def submit_flow_run(self, flow_run_id: str, *, api_url: str, ingest_token: str | None) -> control.JobView:
        """Hand over a deployment's flow run (a Prefect worker's): the engine runs it as it is."""
        body = control.HandOverFlowRun(
            flow_run_id=flow_run_id,
            handed_by=os.getpid(),  # the engine cancels the run when this process dies
            sink=control.SinkTarget(api_url=api_url, ingest_token=ingest_token),
        )
        return self._job("POST", control.JOBS, body)

    def stream(self, job_id: str, pipeline: JsonValue, input_data: JsonObject) -> Iterator[JsonObject]:
        """Run a job and yield its events (``{"event": ...}``) then ``{"envelope": ..., "status": ...}``."""
        body = control.SubmitJob(job_id=job_id, pipeline=pipeline, input=input_data, stream=True)
        try:
            with self._client.stream(
                "POST",
                control.JOBS,
                content=body.model_dump_json().encode(),
                headers={"Content-Type": "application/json"},
                timeout=httpx.Timeout(30.0, read=None),
            ) as response:
                if response.status_code >= 400:
                    raise EngineUnavailable(f"engine refused the job: {response.status_code} {response.read()[:500]!r}")
                for line in response.iter_lines():
                    if line.strip():
                        yield control.JobStreamLine.model_validate_json(line).model_dump(
                            mode="json", exclude_unset=True
                        )
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"lost the engine mid-job: {exc}") from None

    def job(self, job_id: str) -> control.JobView:
        return self._job("GET", control.job_path(job_id), timeout=5.0)

    def cancel(self, job_id: str) -> control.JobView:
        return self._job("POST", control.cancel_path(job_id))

    def call(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult:
        """Run ``call`` on the engine; with ``on_progress``, its progress streams back while it runs."""
        if on_progress is None:
            return CallResult.model_validate_json(
                self._request("POST", control.CALLS, call, timeout=call.timeout_s + 120.0)
            )
        if not self.socket_path.exists():
            raise EngineUnavailable(f"no engine socket at {self.socket_path}")
        relay = progress_relay(on_progress)
        assert relay is not None
        try:
            with self._client.stream(
                "POST",
                control.CALLS_WITH_PROGRESS,
                content=call.model_dump_json().encode(),
                headers={"Content-Type": "application/json"},
                timeout=httpx.Timeout(30.0, read=call.timeout_s + 120.0),
            ) as response:
                if response.status_code >= 400:
                    raise EngineUnavailable(
                        f"engine POST /calls: {response.status_code} {response.read()[:500]!r}", response.status_code
                    )
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    message = control.CallStreamLine.model_validate_json(line)
                    if message.progress is not None:
                        relay(message.progress.model_dump(mode="json"))
                    elif message.result is not None:
                        return message.result
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"lost the engine mid-call: {exc}") from None
        raise EngineUnavailable("the engine ended the call's answer without a result")

    def warm(self, plugins: list[str]) -> list[str]:
        answer = self._request("POST", control.WARM, control.WarmRequest(plugins=plugins), timeout=300.0)
        return control.WarmAnswer.model_validate_json(answer).started

    def set_owner(self, pid: int | None) -> None:
        self._request("POST", control.OWNER, control.OwnerRequest(pid=pid))

    def set_idle_stop(self, seconds: float) -> None:
        """Have the engine stop itself after ``seconds`` without work (0: never)."""
        self._request("POST", control.IDLE_STOP, control.IdleStopRequest(seconds=seconds))

    def shutdown(self, *, drain: bool) -> None:
        self._request("POST", control.SHUTDOWN, control.ShutdownRequest(drain=drain))


class EngineRunner:
    """A :class:`~forgeflow.engine.runners.base.Runner` whose calls run on the engine's warm pools.

    What a flow run in another process of this host (a Prefect worker's, say) uses when the host has
    an engine: the stage still runs sandboxed, with its timeout and memory limit, in a worker that
    already holds its model."""

    name = "engine"

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    def run(self, call: ToolCall, on_progress: ProgressCallback | None = None) -> CallResult:
        try:
            return self.client.call(call, on_progress)
        except EngineUnavailable as exc:
            return CallResult.failure("EngineUnavailable", f"{call.plugin}.{call.tool}: {exc}")

    def close(self) -> None:
        self.client.close()


#: Who started an engine, as ``forgeflow engine status`` shows it.
STARTED_BY_RUN = "forgeflow run"
STARTED_BY_COMMAND = "forgeflow engine start"


def start_engine_process(
    settings: Settings,
    *,
    env: dict[str, str] | None = None,
    owner_pid: int | None = None,
    idle_stop_s: float = 0.0,
    started_by: str | None = None,
    warm: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start the engine daemon (``python -m forgeflow.host``) in its own session (it outlives the caller), its output
    appended to ``<home>/logs/engine.log``; ``warm`` names plugins whose workers it starts at once."""
    log_path = settings.logs_dir / "engine.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "forgeflow.host", "--idle-stop-s", f"{idle_stop_s:g}"]
    if started_by:
        cmd += ["--started-by", started_by]
    if owner_pid is not None:
        cmd += ["--owner-pid", str(owner_pid)]
    if warm:
        cmd += ["--warm", ",".join(warm)]
    child_env = {**os.environ, **settings.to_env(), **(env or {})}
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            cmd,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _serving_status(client: EngineClient, wait_s: float) -> dict[str, Any] | None:
    """The engine's status when one answers and takes jobs; None when none does. One that is
    stopping (its idle time ran out, say) is waited for, up to ``wait_s``, and then counts as none."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            status = client.status()
        except EngineUnavailable:
            return None
        if not status["stopping"]:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def ensure_engine(
    settings: Settings,
    *,
    env: dict[str, str] | None = None,
    owner_pid: int | None = None,
    timeout: float = 120.0,
    idle_stop_s: float = 0.0,
    started_by: str | None = None,
    warm: Sequence[str] = (),
) -> tuple[EngineClient, dict[str, Any]]:
    """The engine of ``settings.home``: the running one, or a new one started and waited for (it
    answers before its Prefect server is up: a job sent meanwhile waits inside it). Starters take
    turns (:func:`~forgeflow.engine.locks.start_lock`): concurrent callers get one engine."""
    client = EngineClient(settings.engine_socket_path)
    status = _serving_status(client, wait_s=0.0)
    if status is not None:
        return client, status
    with start_lock(settings.home, timeout):
        status = _serving_status(client, wait_s=30.0)  # another starter's, or one that was leaving
        if status is not None:
            return client, status
        proc = start_engine_process(
            settings, env=env, owner_pid=owner_pid, idle_stop_s=idle_stop_s, started_by=started_by, warm=warm
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return client, client.status()
            except EngineUnavailable:
                code = proc.poll()
                if code is not None:
                    tail = (settings.logs_dir / "engine.log").read_text(errors="replace")[-2000:]
                    raise EngineUnavailable(f"the engine exited with code {code} while starting:\n{tail}") from None
                time.sleep(0.02)
        proc.kill()
    raise EngineUnavailable(f"the engine did not answer within {timeout:g} s")
