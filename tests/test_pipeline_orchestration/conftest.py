"""Fixtures for the pipeline engine: real process runner, real Prefect server, a real HTTP ingest."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port


@pytest.fixture
def services(ff_home: Path, prefect_api_url: str):
    """Services as a flow run uses them: settings, registry, the real process runner, a MemorySink."""
    from forgeflow.events.sinks import MemorySink
    from forgeflow.jobs.stages import Services
    from forgeflow.settings import get_settings

    svc = Services.from_settings(get_settings(), sink=MemorySink())
    yield svc
    svc.close()


@pytest.fixture
def executor(services):
    from forgeflow.jobs.executor import PipelineExecutor

    return PipelineExecutor(services)


def chain(*tools: str, **configs: dict[str, Any]) -> dict[str, Any]:
    """A seed-form pipeline of testkit tools."""
    return {"pipeline": [{"plugin": "testkit", "tool": t, "config": configs.get(t, {})} for t in tools]}


class IngestServer:
    """A real HTTP server standing in for the API's ingest endpoint: stores events, numbers them."""

    def __init__(self, token: str = "ingest-secret") -> None:
        self.token = token
        self.port = free_port()
        self.events: list[dict[str, Any]] = []
        self.batches = 0
        self.heartbeats: list[list[str]] = []  # each batch's "alive" list, in arrival order
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                if self.headers.get("Authorization") != f"Bearer {owner.token}":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner._lock:
                    owner.batches += 1
                    if body.get("alive"):
                        owner.heartbeats.append(body["alive"])
                    for event in body["events"]:
                        if event["event_id"] in owner._ids:
                            continue
                        owner._ids.add(event["event_id"])
                        seq = 1 + sum(1 for e in owner.events if e["job_id"] == event["job_id"])
                        owner.events.append({**event, "seq": seq})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"stored": true}')

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["job_id"] == job_id]

    def wait_for(self, predicate: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [e for e in self.events if predicate(e)]
            if found:
                return found
            time.sleep(0.05)
        raise TimeoutError("no matching event arrived")


@pytest.fixture
def ingest() -> Iterator[IngestServer]:
    server = IngestServer()
    server.start()
    yield server
    server.stop()


def prefect_task_runs(flow_run_id: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The task runs of one flow run, read from the real Prefect server's REST API once ``count`` of
    them are there in a final state: Prefect records task runs from their events in batches, up to a
    second after the flow run ended (``TASK_RUN_RECORDER_BATCHING``)."""
    import os

    import httpx

    body = {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{os.environ['PREFECT_API_URL']}/task_runs/filter", json=body, timeout=10)
        response.raise_for_status()
        runs: list[dict[str, Any]] = response.json()
        final = [r for r in runs if r["state"] and r["state"]["type"] not in ("PENDING", "RUNNING", "SCHEDULED")]
        if len(final) >= count or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)


def prefect_flow_run(flow_run_id: str) -> dict[str, Any]:
    import os

    import httpx

    response = httpx.get(f"{os.environ['PREFECT_API_URL']}/flow_runs/{flow_run_id}", timeout=10)
    response.raise_for_status()
    return response.json()


def run_stage_loop(
    registry: Any,
    stages: list[dict[str, Any]],
    job_input: dict[str, Any],
    job_id: str = "job-loop",
    media_sync: Any = None,
) -> tuple[dict[str, Any], list[Any]]:
    """The stage loop without Prefect (inline runner, in-memory sink): the job's envelope (success or
    failure) and the events it emitted."""
    from forgeflow.engine.runners.inline import InlineRunner
    from forgeflow.events.sinks import MemorySink
    from forgeflow.jobs.stages import JobRun, PipelineFailed, Services, execute
    from forgeflow.pipeline import outcome
    from forgeflow.pipeline.definition import PipelineDefinition
    from forgeflow.settings import get_settings

    settings = get_settings()
    sink = MemorySink()
    services = Services(settings, registry, InlineRunner(settings, registry), sink, media_sync=media_sync)
    definition = PipelineDefinition.model_validate({"stages": stages})
    run = JobRun(job_id, services, outcome.pending_reports(definition.stages))
    try:
        envelope = execute(run, definition, None, job_input).to_dict()
    except PipelineFailed as failed:
        envelope = failed.envelope.to_dict()
    return envelope, list(sink.events)
