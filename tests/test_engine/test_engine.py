"""The engine: a real ``python -m forgeflow.host`` process per test (its own FORGEFLOW_HOME), the
session's real Prefect server, real sandboxed workers and, for the vision tests, real Ultralytics."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forgeflow.engine.client import EngineClient, ensure_engine
from forgeflow.settings import Settings

SLEEP = {"plugin": "testkit", "tool": "sleep"}


def run(
    client: EngineClient, job_id: str, stages: list[dict[str, Any]], job_input: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run a job on the engine: its events and the final line (envelope, status)."""
    events, last = [], {}
    for line in client.stream(job_id, {"stages": stages}, job_input or {}):
        if "event" in line:
            events.append(line["event"])
        else:
            last = line
    return events, last


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, box


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def workers_of(client: EngineClient, plugin: str) -> list[dict[str, Any]]:
    return [w for w in client.status()["workers"] if w["plugin"] == plugin]


@pytest.mark.vision
def test_second_job_reuses_the_warm_worker_and_its_model(start_engine: Any) -> None:
    from ultralytics import ASSETS

    client = start_engine(media_input_roots=[Path(ASSETS)])
    stage = {"plugin": "videotracker", "tool": "detect_players", "config": {"device": "cpu", "imgsz": 320}}
    bus = str(Path(ASSETS) / "bus.jpg")
    _, first = run(client, "first", [stage], {"media": bus})
    assert first["status"] == "succeeded", first
    [worker] = workers_of(client, "forgesyte-yolo-tracker")
    assert worker["model_loads"] == 1 and worker["calls"] == 1
    _, second = run(client, "second", [stage], {"media": bus})
    assert second["status"] == "succeeded"
    assert second["envelope"]["result"] == first["envelope"]["result"]
    [again] = workers_of(client, "forgesyte-yolo-tracker")
    assert again["pid"] == worker["pid"]  # the same warm process ...
    assert again["model_loads"] == 1 and again["calls"] == 2  # ... which did not load the model again


@pytest.mark.parametrize(
    ("tool", "config", "error_type"),
    [
        ("segfault", {}, "WorkerCrashed"),
        ("hang", {"seconds": 60}, "TimeoutError"),
        ("allocate", {"megabytes": 2048}, "MemoryError"),
    ],
)
def test_a_failing_stage_costs_only_its_own_worker(
    start_engine: Any, tool: str, config: dict[str, Any], error_type: str
) -> None:
    client = start_engine(pool_size=2)
    slow = [{**SLEEP, "config": {"seconds": 3}}, {"plugin": "testkit", "tool": "noop"}]
    thread, box = in_thread(lambda: run(client, "healthy", slow))
    wait_for(lambda: any(w["job_id"] == "healthy" for w in workers_of(client, "testkit")))
    [healthy_worker] = [w["pid"] for w in workers_of(client, "testkit") if w["job_id"] == "healthy"]
    # Only the hang needs a short timeout; the others must fail for their own reason, which on a loaded
    # host can take longer than a second (touching 256 MB before the memory limit stops it).
    timeout = 1 if tool == "hang" else 60
    bad = {"plugin": "testkit", "tool": tool, "config": config, "timeout_seconds": timeout, "memory_limit_mb": 256}
    _, failed = run(client, "broken", [bad])
    assert failed["status"] == "failed"
    assert failed["envelope"]["error_type"] == error_type
    thread.join(60)
    events, healthy = box["value"]
    assert healthy["status"] == "succeeded", healthy
    assert [e["type"] for e in events].count("pipeline_stage_end") == 2
    assert healthy_worker in [w["pid"] for w in workers_of(client, "testkit")]  # its worker lives on


def test_admission_queues_stages_beyond_the_device_slots(start_engine: Any) -> None:
    client = start_engine(device_slots={"cpu": 1}, pool_size=2)
    stage = [{**SLEEP, "config": {"seconds": 1.5}}]
    first, first_box = in_thread(lambda: run(client, "first", stage))
    wait_for(lambda: client.status()["devices"].get("cpu", {}).get("running"))
    second, second_box = in_thread(lambda: run(client, "second", stage))
    wait_for(lambda: client.status()["devices"]["cpu"]["waiting"])
    waiting = client.status()["devices"]["cpu"]["waiting"]
    assert [t["job_id"] for t in waiting] == ["second"]
    first.join(60)
    second.join(60)
    first_events, first_end = first_box["value"]
    second_events, second_end = second_box["value"]
    assert first_end["status"] == second_end["status"] == "succeeded"
    waits = [e for e in second_events if e["type"] == "job_status" and e.get("waiting_for")]
    assert waits and "cpu" in waits[0]["waiting_for"]
    first_stage_end = next(e for e in first_events if e["type"] == "pipeline_stage_end")
    second_stage_end = next(e for e in second_events if e["type"] == "pipeline_stage_end")
    # one slot: the second stage ran after the first, so it took its own 1.5 s after the first's end
    assert second_stage_end["timestamp"] > first_stage_end["timestamp"]
    assert second_stage_end["duration_ms"] >= 1400


def test_cancel_stops_the_running_stage_with_one_start_and_one_end(start_engine: Any) -> None:
    client = start_engine()
    stages = [{**SLEEP, "config": {"seconds": 60}}, {"plugin": "testkit", "tool": "noop"}]
    thread, box = in_thread(lambda: run(client, "to-cancel", stages))
    wait_for(lambda: any(w["job_id"] == "to-cancel" for w in workers_of(client, "testkit")))
    started = time.monotonic()
    client.cancel("to-cancel")
    thread.join(60)
    assert time.monotonic() - started < 15
    events, end = box["value"]
    assert end["status"] == "cancelled", end
    envelope = end["envelope"]
    assert envelope["error_type"] == "Cancelled" and envelope["error"] == "cancelled by request"
    assert [s["status"] for s in envelope["stages"]] == ["cancelled", "skipped"]
    kinds = [(e["type"], e.get("stage_index")) for e in events]
    assert kinds.count(("pipeline_stage_start", 0)) == 1 and kinds.count(("pipeline_stage_end", 0)) == 1
    assert ("pipeline_stage_start", 1) not in kinds
    assert [e["status"] for e in events if e["type"] == "job_status"][-1] == "cancelled"
    # the engine keeps serving
    _, after = run(client, "after", [{"plugin": "testkit", "tool": "noop"}])
    assert after["status"] == "succeeded"


def test_idle_memory_budget_stops_the_least_recently_used_worker(ff_home: Path) -> None:
    from forgeflow.engine.runners import ToolCall
    from forgeflow.engine.runners.process import ProcessRunner
    from forgeflow.plugins.lifecycle import LifecycleStore
    from forgeflow.plugins.registry import PluginRegistry

    # Room for one idle testkit worker (~40 MB resident), not two.
    settings = Settings(home=ff_home, pool_size=2, idle_worker_memory_mb=60)
    runner = ProcessRunner(settings, PluginRegistry.discover(LifecycleStore(ff_home / "plugins.sqlite")))
    try:
        short = ToolCall(plugin="testkit", tool="sleep", config={"seconds": 0.3}, job_id="short")
        long = ToolCall(plugin="testkit", tool="sleep", config={"seconds": 1.5}, job_id="long")
        t_long, long_box = in_thread(lambda: runner.run(long))
        wait_for(lambda: any(w["job_id"] == "long" for w in runner.status()["workers"]))
        t_short, short_box = in_thread(lambda: runner.run(short))
        t_short.join(30)
        t_long.join(30)
        assert short_box["value"].ok and long_box["value"].ok
        status = runner.status()
        assert status["evicted"] == 1
        [kept] = status["workers"]
        assert kept["state"] == "idle" and kept["calls"] == 1
        assert status["idle_memory_mb"] <= 60
        assert runner.run(ToolCall(plugin="testkit", tool="noop")).ok  # the pool serves on
    finally:
        runner.close()


@pytest.mark.vision
def test_job_cache_gives_identical_bytes_and_one_model_pass_per_frame(ff_home: Path, sample_clip: Path) -> None:
    """detect → pose → classify on the sample clip with the job cache on and off, through real workers."""
    from forgeflow.engine.runners import ToolCall
    from forgeflow.engine.runners.process import ProcessRunner
    from forgeflow.plugins.lifecycle import LifecycleStore
    from forgeflow.plugins.registry import PluginRegistry

    stages = [
        ("forgesyte-yolo-tracker", "detect_players", {"device": "cpu", "imgsz": 320, "max_frames": 12}),
        ("pose-estimator", "estimate_poses", {"device": "cpu", "imgsz": 320, "max_frames": 12}),
        ("classifier", "classify_actions", {}),
    ]
    fields = {
        "detect_players": ["media"],
        "estimate_poses": ["media", "players"],
        "classify_actions": ["players", "poses"],
    }

    def run_stages(reuse: bool) -> tuple[str, list[Any]]:
        settings = Settings(home=ff_home, reuse_outputs=reuse, media_input_roots=[sample_clip.parent])
        runner = ProcessRunner(settings, PluginRegistry.discover(LifecycleStore(ff_home / "plugins.sqlite")))
        context: dict[str, Any] = {"media": str(sample_clip)}
        results = []
        try:
            for index, (plugin, tool, config) in enumerate(stages):
                inputs = {k: context[k] for k in fields[tool] if k in context}
                result = runner.run(
                    ToolCall(
                        plugin=plugin,
                        tool=tool,
                        config=config,
                        inputs=inputs,
                        job_id=f"cache-{reuse}",
                        stage_index=index,
                        timeout_s=600,
                    )
                )
                assert result.ok, result.error
                context.update(result.outputs or {})
                results.append(result)
        finally:
            runner.close()
        context.pop("media")
        return json.dumps(context, sort_keys=True), results

    with_cache, on = run_stages(True)
    without_cache, off = run_stages(False)
    assert with_cache == without_cache  # byte-identical results
    frames = len(json.loads(with_cache)["players"])
    assert frames == 12
    assert on[0].computed_outputs == frames and on[0].reused_outputs == 0  # detection: one pass per frame
    assert on[1].computed_outputs == 0 and on[1].reused_outputs == frames  # pose: no pass of its own
    assert all(r.computed_outputs == r.reused_outputs == 0 for r in off)


def test_forgeflow_run_uses_the_running_engine(start_engine: Any, tmp_path: Path, prefect_api_url: str) -> None:
    import os

    client = start_engine()
    home = client.socket_path.parent
    pipeline = tmp_path / "p.json"
    pipeline.write_text(
        json.dumps(
            {
                "pipeline": [
                    {"plugin": "testkit", "tool": "numbers", "config": {}},
                    {"plugin": "testkit", "tool": "scale", "config": {"factor": 2}},
                    {"plugin": "testkit", "tool": "total", "config": {}},
                ],
                "input": {"count": 4},
            }
        )
    )
    env = {**os.environ, "FORGEFLOW_HOME": str(home), "PREFECT_API_URL": prefect_api_url}
    done = subprocess.run(
        [sys.executable, "-m", "forgeflow.cli", "run", str(pipeline), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["total"] == 12
    finished = [j for j in client.jobs().values() if j.status == "succeeded"]
    assert len(finished) == 1  # the job ran in the engine, not in the command's own process


def test_a_flow_run_in_another_process_runs_its_stages_on_the_engine(start_engine: Any, prefect_api_url: str) -> None:
    """What a Prefect worker's flow-run process does on a host with an engine: its stage calls go to
    the engine's warm pools (EngineRunner), not to workers of its own."""
    import os

    client = start_engine()
    home = client.socket_path.parent
    script = (
        "import json; from forgeflow.jobs.executor import PipelineExecutor; "
        "from forgeflow.jobs.stages import current_services; "
        "print(current_services().runner.name); "
        "print(json.dumps(PipelineExecutor().execute([{'plugin': 'testkit', 'tool': 'numbers'}, "
        "{'plugin': 'testkit', 'tool': 'scale', 'config': {'factor': 5}}, {'plugin': 'testkit', 'tool': 'total'}], "
        "{'count': 3}, 'from-a-flow-run')))"
    )
    env = {**os.environ, "FORGEFLOW_HOME": str(home), "PREFECT_API_URL": prefect_api_url}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    runner_name, envelope = done.stdout.strip().splitlines()[-2:]
    assert runner_name == "engine"
    assert json.loads(envelope)["result"]["total"] == 15
    [worker] = workers_of(client, "testkit")
    assert worker["calls"] == 3  # all three stages ran in the engine's warm worker


def test_cancel_a_job_waiting_for_a_device_slot(start_engine: Any) -> None:
    client = start_engine(device_slots={"cpu": 1}, pool_size=2)
    first, first_box = in_thread(lambda: run(client, "holds-the-slot", [{**SLEEP, "config": {"seconds": 4}}]))
    wait_for(lambda: client.status()["devices"].get("cpu", {}).get("running"))
    second, second_box = in_thread(
        lambda: run(client, "waits", [{**SLEEP, "config": {"seconds": 4}}, {"plugin": "testkit", "tool": "noop"}])
    )
    wait_for(lambda: client.status()["devices"]["cpu"]["waiting"])
    client.cancel("waits")
    second.join(30)
    _, cancelled = second_box["value"]
    assert cancelled["status"] == "cancelled"
    assert [s["status"] for s in cancelled["envelope"]["stages"]] == ["cancelled", "skipped"]
    assert not client.status()["devices"]["cpu"]["waiting"]
    first.join(30)
    assert first_box["value"][1]["status"] == "succeeded"  # the job holding the slot is untouched


def test_a_tools_progress_streams_back_through_the_engine(start_engine: Any) -> None:
    """Progress crosses the engine socket both ways a stage can run there: a single call from a flow
    run in another process (``/calls?progress=1``) and a job of the engine's own."""
    from forgeflow.engine.client import EngineRunner
    from forgeflow.engine.runners.base import Progress, ToolCall

    client = start_engine(progress_interval_s=0)
    updates: list[Progress] = []
    call = ToolCall(plugin="testkit", tool="steps", config={"steps": 3, "delay_s": 0.05}, job_id="c", stage_index=0)
    result = EngineRunner(client).run(call, updates.append)
    assert result.ok and result.outputs == {"steps": 3}
    assert [(u.done, u.total, u.message) for u in updates] == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
    assert client.call(call).ok  # without a callback: the plain JSON answer

    events, end = run(client, "job-progress", [{"plugin": "testkit", "tool": "steps", "config": {"steps": 2}}])
    assert end["status"] == "succeeded"
    kinds = [e["type"] for e in events if e.get("stage_index") == 0]
    assert kinds == ["pipeline_stage_start", "pipeline_stage_progress", "pipeline_stage_progress", "pipeline_stage_end"]


def test_concurrent_jobs_share_batches_and_keep_their_own_events(start_engine: Any, tmp_path: Path) -> None:
    """Jobs (Prefect flow runs) calling a batchable tool at once: their calls join batches (fewer
    passes than jobs: the one CPU slot is held by the first batch while the others gather), and
    each job still succeeds with its own result and its own events."""
    client = start_engine(device_slots={"cpu": 1})
    record = tmp_path / "passes.txt"
    stage = {"plugin": "testkit", "tool": "batch_probe", "config": {"record": str(record), "hold_s": 0.5}}
    runs = [in_thread(lambda i=i: run(client, f"batched-{i}", [stage], {"value": i})) for i in range(4)]
    for thread, _box in runs:
        thread.join(120)
    for i, (_thread, box) in enumerate(runs):
        events, last = box["value"]
        assert last["status"] == "succeeded", last
        assert last["envelope"]["result"]["doubled"] == 2 * i
        assert {e["job_id"] for e in events} == {f"batched-{i}"}  # its own events, nobody else's
        types = [e["type"] for e in events]
        assert types.count("pipeline_stage_start") == types.count("pipeline_stage_end") == 1
        assert types.index("pipeline_stage_start") < types.index("pipeline_stage_end")
    passes = record.read_text().split()[1::2]
    assert sum(int(groups) for groups in passes) == 4
    assert len(passes) < 4, passes
    assert client.status()["batching"]["batches"] < 4


def test_the_hosts_only_job_does_not_wait_for_company_at_a_batchable_stage(start_engine: Any, tmp_path: Path) -> None:
    """A batch that no other call could join skips its gathering wait (forgeflow/engine/batching.py):
    the host's only job runs its batchable stage at once, though the tool's batches wait 30 s for
    company. (Jobs at once still gather: the test above.)"""
    from datetime import datetime

    client = start_engine(batch_waits_ms={"testkit.batch_probe": 30_000})
    record = tmp_path / "passes.txt"
    stage = {"plugin": "testkit", "tool": "batch_probe", "config": {"record": str(record)}}
    events, last = run(client, "alone", [stage], {"value": 3})
    assert last["status"] == "succeeded", last
    assert last["envelope"]["result"]["doubled"] == 6
    at = {e["type"]: datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")) for e in events}
    took = (at["pipeline_stage_end"] - at["pipeline_stage_start"]).total_seconds()
    assert took < 15, f"the stage waited {took:.1f} s for company that could not come"
    assert client.status()["batching"]["batches"] == 1


class _BusyPrefect:
    """A real HTTP proxy in front of the session's Prefect server that answers 503 (what Prefect's
    SQLite write lock gives under load) to the first ``refusals`` flow-run creations."""

    def __init__(self, upstream: str, refusals: int) -> None:
        import http.server

        import httpx

        self.refused = 0
        proxy = self
        client = httpx.Client(base_url=upstream.removesuffix("/api"), timeout=60)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "POST" and self.path.rstrip("/") == "/api/flow_runs" and proxy.refused < refusals:
                    proxy.refused += 1
                    self._reply(
                        503, b'{"exception_message":"Service Unavailable"}', {"content-type": "application/json"}
                    )
                    return
                skip = {"host", "content-length", "connection", "accept-encoding"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                answer = client.request(self.command, self.path, content=body, headers=headers)
                keep = {"content-type", "location"}
                self._reply(answer.status_code, answer.content, {k: v for k, v in answer.headers.items() if k in keep})

            def _reply(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_a_prefect_server_too_busy_to_create_the_flow_run_delays_the_job_and_fails_nothing(
    tmp_path: Path, prefect_api_url: str
) -> None:
    """Prefect answers 503 to the job's flow-run creation three times (its client's own retries off):
    the engine asks again with backoff, the job says nothing meanwhile, then runs and succeeds."""
    busy = _BusyPrefect(prefect_api_url, refusals=3)
    settings = Settings(home=tmp_path / "home")
    env = {"PREFECT_API_URL": busy.url, "PREFECT_CLIENT_MAX_RETRIES": "0"}
    client, _ = ensure_engine(settings, env=env, timeout=180)
    try:
        events, last = run(client, "busy-prefect", [{"plugin": "testkit", "tool": "noop", "config": {}}])
        assert busy.refused == 3
        assert last["status"] == "succeeded", last
        assert [e["type"] for e in events if e["type"] == "pipeline_error"] == []
        assert events[0]["type"] == "job_status" and events[0]["status"] == "running"
    finally:
        client.shutdown(drain=False)
        busy.close()


class _StalledPrefect:
    """A TCP proxy in front of the session's Prefect server that holds every connection made while
    ``stalled`` until it is cleared: a Prefect server that does not answer yet (still starting)."""

    def __init__(self, upstream: str) -> None:
        import socket
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.stalled = threading.Event()
        self.released = threading.Event()
        self.waiting = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}{target.path}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Any) -> None:
        import socket

        if self.stalled.is_set():
            self.waiting += 1
            self.released.wait(120)
        upstream = socket.create_connection(self.upstream)

        def pump(src: Any, dst: Any) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)

    def close(self) -> None:
        self.released.set()
        self.listener.close()


def test_a_jobs_first_stage_runs_while_its_flow_run_is_made(tmp_path: Path, prefect_api_url: str) -> None:
    """The engine starts a job's first stage call as it takes the job (forgeflow/jobs/head_start.py):
    while Prefect does not answer, the call runs and ends, once. The stage's task takes it over: the
    job is still one flow run with one task run per stage, each stage called once, and its messages
    keep their order, the progress made before the task's start included."""
    import httpx

    proxy = _StalledPrefect(prefect_api_url)
    settings = Settings(home=tmp_path / "home", progress_interval_s=0)
    client, _ = ensure_engine(settings, env={"PREFECT_API_URL": proxy.url}, timeout=180)
    try:
        stages = [
            {"plugin": "testkit", "tool": "steps", "config": {"steps": 3, "delay_s": 0.05}},
            {"plugin": "testkit", "tool": "noop", "config": {}},
        ]
        proxy.stalled.set()
        thread, box = in_thread(lambda: run(client, "ahead", stages))
        wait_for(lambda: sum(w["calls"] for w in workers_of(client, "testkit")) == 1)
        time.sleep(0.5)
        assert proxy.waiting >= 1  # the job's flow run is not made yet
        assert sum(w["calls"] for w in workers_of(client, "testkit")) == 1  # the second stage waits for its task
        assert client.job("ahead").status == "running"
        proxy.released.set()
        thread.join(120)
        events, last = box["value"]
        assert last["status"] == "succeeded", last
        assert last["envelope"]["result"] == {"steps": 3}
        assert sum(w["calls"] for w in workers_of(client, "testkit")) == 2  # each stage's call made once
        assert events[0]["type"] == "job_status" and events[0]["status"] == "running"
        first = [(e["type"], e.get("done")) for e in events if e.get("stage_index") == 0]
        assert first == [
            ("pipeline_stage_start", None),
            *[("pipeline_stage_progress", i) for i in (1, 2, 3)],
            ("pipeline_stage_end", None),
        ]
        kinds = [(e["type"], e.get("stage_index")) for e in events]
        assert kinds.index(("pipeline_stage_end", 0)) < kinds.index(("pipeline_stage_start", 1))
        body = {"task_runs": {"flow_run_id": {"any_": [events[0]["flow_run_id"]]}}}
        deadline = time.monotonic() + 15
        while True:  # Prefect records task runs from their events, up to a second later
            task_runs = httpx.post(f"{prefect_api_url}/task_runs/filter", json=body, timeout=10).json()
            states = sorted((r["name"], r["state"]["type"]) for r in task_runs if r["state"])
            if [t for _, t in states] == ["COMPLETED", "COMPLETED"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert states == [("stage-0: testkit.steps", "COMPLETED"), ("stage-1: testkit.noop", "COMPLETED")]
    finally:
        client.shutdown(drain=False)
        proxy.close()


def test_a_job_whose_flow_run_never_starts_stops_the_call_that_ran_ahead(tmp_path: Path) -> None:
    """The engine's Prefect server never answers: the job fails saying so, and its first stage's
    call, started ahead of the flow run, is stopped with it (no worker is left serving the job)."""
    from forgeflow.host.core import Engine
    from forgeflow.host.job import StreamSink

    def serving() -> bool:
        return any(w["job_id"] == "never" and w["state"] == "busy" for w in engine.pool.status()["workers"])

    def prefect_ready() -> None:
        wait_for(serving)  # the first stage's call runs while Prefect is awaited
        raise RuntimeError("Prefect at http://127.0.0.1:9/api did not start: it exited with 1")

    engine = Engine(Settings(home=tmp_path / "home"), prefect_ready=prefect_ready)
    try:
        job = engine.submit("never", {"stages": [{**SLEEP, "config": {"seconds": 60}}]}, {}, StreamSink())
        assert job.done.wait(45)
        assert job.status == "failed"
        assert job.envelope is not None and job.envelope["error_type"] == "FlowRunError"
        assert "did not start" in job.envelope["error"]
        assert not serving()
        events = [e for e in engine.stream(job) if e is not None]
        assert [e.type for e in events] == ["pipeline_error", "job_status"]
    finally:
        engine.close()
