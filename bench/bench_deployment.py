"""Deployment mode: time from ``POST /v1/jobs`` to the job's first ``pipeline_stage_start``.

    .venv/bin/python bench/bench_deployment.py [--jobs 10] [--out bench/results/deployment.md]

Starts the production shape with ``forgeflow up`` in a fresh ``FORGEFLOW_HOME`` (Prefect server, the
API in deployment mode, the engine, one Prefect worker polling every second), and beside it, in the
same run, ``forgeflow serve`` in local mode (jobs on this host's engine) as the baseline. For each
job (one ``testkit.noop`` stage, needs the test plugins) the clock starts before the POST and stops
when the job's WebSocket delivers its first ``pipeline_stage_start``; jobs run one at a time.
In deployment mode that covers the API creating the flow run, the worker's poll, the flow-run process
starting (a new Python process: Prefect's process worker), and the first event's way back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STAGES = [{"plugin": "testkit", "tool": "noop", "config": {}}]


def first_stage_start(api_url: str) -> float:
    """Seconds from the POST of a one-stage job to its first ``pipeline_stage_start``."""
    job_id = f"bench-{uuid.uuid4().hex[:12]}"
    ws_url = api_url.replace("http", "ws", 1) + f"/v1/ws/jobs/{job_id}"
    started = time.perf_counter()
    answer = httpx.post(f"{api_url}/v1/jobs", json={"job_id": job_id, "pipeline": STAGES}, timeout=30)
    answer.raise_for_status()
    with connect(ws_url, open_timeout=30) as ws:
        while True:
            message = json.loads(ws.recv(timeout=120))
            if message["type"] == "pipeline_stage_start":
                elapsed = time.perf_counter() - started
                break
    deadline = time.monotonic() + 120
    while httpx.get(f"{api_url}/v1/jobs/{job_id}", timeout=30).json()["status"] not in ("succeeded", "failed"):
        if time.monotonic() > deadline:
            raise TimeoutError(job_id)
        time.sleep(0.05)
    return elapsed


def measure(api_url: str, jobs: int) -> list[float]:
    first_stage_start(api_url)  # warm-up: the worker's first flow run, the engine's first worker
    return [first_stage_start(api_url) for _ in range(jobs)]


def local_api(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FORGEFLOW_HOME": str(home), "FORGEFLOW_API_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)
    forgeflow = str(Path(sys.executable).with_name("forgeflow"))
    log = (home / "serve.log").open("ab")
    return subprocess.Popen([forgeflow, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def row(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"| {name} | {statistics.median(values):.2f} s | {p95:.2f} s | {min(values):.2f} s | {len(values)} |"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/deployment.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from forgeflow.cli import stack
    from forgeflow.jobs.prefect_server import free_port
    from forgeflow.settings import Settings

    root = Path(tempfile.mkdtemp(prefix="ff-bench-deploy-"))
    deployed_home, local_home = root / "deployed", root / "local"
    local_home.mkdir(parents=True)
    os.environ["FORGEFLOW_HOME"] = str(deployed_home)
    settings = Settings(home=deployed_home)
    local_port = free_port()
    local = local_api(local_home, local_port)
    try:
        started = stack.up(settings, prefect_port=free_port(), api_port=free_port(), workers=1)
        wait_healthy(f"http://127.0.0.1:{local_port}")
        deployed = measure(started.api_url, args.jobs)
        baseline = measure(f"http://127.0.0.1:{local_port}", args.jobs)
    finally:
        stack.down(settings)
        local.terminate()
        local.wait(30)
    lines = [
        f"POST /v1/jobs → first `pipeline_stage_start`, one `testkit.noop` stage, {args.jobs} jobs one at a time "
        f"({platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()})",
        "",
        "| mode | median | p95 | best | jobs |",
        "|---|---:|---:|---:|---:|",
        row("deployment (`forgeflow up`: flow run on a Prefect worker)", deployed),
        row("local (`forgeflow serve`: the host's engine)", baseline),
        "",
        f"deployment / local (medians): {statistics.median(deployed) / statistics.median(baseline):.1f}×",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
