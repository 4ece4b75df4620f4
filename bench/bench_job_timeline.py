"""Where one small job's time goes, from POST to its terminal message on the WebSocket.

    PYTHONPATH=$PWD:$PWD/tests/plugin_packages/forgeflow-testplugins \
        .venv/bin/python bench/bench_job_timeline.py [--jobs 12] [--store sqlite|postgresql] [--pipeline noop|soccer]

A local Prefect server and ``forgeflow serve`` (API + engine) in a fresh home, on SQLite or on a
throwaway PostgreSQL cluster (one database for Prefect, one for the API), as in
``bench_orchestration.py``. Jobs of three testkit no-op stages run one at a time; each stored
message's timestamp is read against the submitting client's clock (same machine), and the median of
each mark is printed (the first two jobs are left out: warm-up). Then the requests a flow run makes
of the Prefect server are timed alone with Prefect's client against the same server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_deployment import wait_healthy
from bench_engine import SOCCER, Watcher, free_port, start_api, start_prefect, stop_stack
from bench_orchestration import Postgres

NOOP = [{"plugin": "testkit", "tool": "noop", "config": {}}] * 3


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _mark(event: dict[str, object]) -> str:
    if event["type"] == "job_status":
        return f"job_status {event['status']}"
    if "stage_index" in event:
        return f"{event['type']} {event['stage_index']}"
    return str(event["type"])


def job_marks(
    url: str, ws: Watcher, job_id: str, pipeline: list[dict[str, object]], job_input: dict[str, object]
) -> dict[str, float]:
    """Seconds from the POST to each message of the job (first of each kind) and to the WebSocket."""
    with httpx.Client(base_url=url, timeout=60) as client:
        start, clock = time.time(), time.perf_counter()
        response = client.post("/v1/jobs", json={"job_id": job_id, "pipeline": pipeline, "input": job_input})
        assert response.status_code == 202, response.text
        marks = {"POST answered": time.perf_counter() - clock}
        while job_id not in ws.terminal:
            time.sleep(0.002)
        seen = ws.terminal[job_id] - clock
        time.sleep(0.05)
        for event in client.get(f"/v1/jobs/{job_id}/events").json()["events"]:
            marks.setdefault(_mark(event), _epoch(event["timestamp"]) - start)
    marks["terminal seen on the WebSocket"] = seen
    return marks


def prefect_requests(rounds: int = 20) -> dict[str, float]:
    """Median seconds of each request a flow run makes, with Prefect's client (PREFECT_API_URL)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Pending, Running

    @flow(name="timeline-probe")
    def probe() -> None:
        pass

    times: dict[str, list[float]] = {}

    @contextmanager
    def timed(name: str) -> Iterator[None]:
        clock = time.perf_counter()
        yield
        times.setdefault(name, []).append(time.perf_counter() - clock)

    with get_client(sync_client=True) as client:
        for i in range(rounds):
            with timed("POST /flows/"):
                client.create_flow(probe)
            with timed("POST /flows/ + POST /flow_runs/"):
                run = client.create_flow_run(probe, state=Pending())
            with timed("the run's name"):
                client.set_flow_run_name(run.id, f"job-{i}")
            with timed("state Running"):
                client.set_flow_run_state(run.id, Running())
            with timed("state Completed"):
                client.set_flow_run_state(run.id, Completed())
    return {name: statistics.median(values[3:]) for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--pipeline", choices=["noop", "soccer"], default="noop")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ff-bench-timeline-"))
    env = {**os.environ, "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    pg = Postgres() if args.store == "postgresql" else None
    if pg is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = pg.database("asyncpg")
        env["FORGEFLOW_DATABASE_URL"] = pg.database("psycopg")
    prefect, prefect_url = start_prefect(home / "prefect", env)
    port = free_port()
    env.update({"FORGEFLOW_HOME": str(home / "ff"), "PREFECT_API_URL": prefect_url, "FORGEFLOW_API_PORT": str(port)})
    api = start_api(env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        ws = Watcher(url.replace("http", "ws") + "/v1/ws/jobs")
        pipeline, job_input = NOOP, {}
        if args.pipeline == "soccer":  # one image (Ultralytics' bus.jpg) through the three vision stages
            from ultralytics import ASSETS

            with open(Path(ASSETS) / "bus.jpg", "rb") as fh:
                media = httpx.post(f"{url}/v1/media", files={"file": ("bus.jpg", fh, "image/jpeg")}).json()["ref"]
            pipeline, job_input = SOCCER, {"media": media}
        runs = [job_marks(url, ws, f"timeline-{i}", pipeline, job_input) for i in range(args.jobs + 2)][2:]
        stages = "three no-op stages" if args.pipeline == "noop" else "the soccer pipeline on one image"
        print(f"{args.store}: one job of {stages} at a time, median of {len(runs)} (ms from the POST):")
        for name in runs[-1]:
            values = [marks[name] for marks in runs if name in marks]
            print(f"  {name:40s} {statistics.median(values) * 1000:7.1f}")
        os.environ["PREFECT_API_URL"] = prefect_url
        print("the Prefect server's requests of a flow run, alone (median ms):")
        for name, seconds in prefect_requests().items():
            print(f"  {name:40s} {seconds * 1000:7.1f}")
    finally:
        stop_stack(api, home / "ff", prefect)
        if pg is not None:
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
