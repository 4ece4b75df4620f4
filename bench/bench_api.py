"""API benchmark: event latency from the ingest POST to WebSocket clients, and job submissions/s.

    .venv/bin/python bench/bench_api.py [--events 200] [--clients 1,100] [--jobs 400]
                                        [--concurrency 16] [--database-url URL] [--out bench/results/api.md]

The API runs in its own process (uvicorn, ``create_app(settings, launch_jobs=False)``: the launcher
starts nothing, so the numbers are the service's own cost; running jobs is benchmarked elsewhere).

* **Latency**: N clients subscribe to ``WS /v1/ws/jobs/{job_id}``; one event at a time is POSTed to
  ``/internal/v1/events`` and the time until *each* client has it is recorded (the clock starts
  before the POST, so it covers HTTP, validation, the store transaction, the hub and the socket).
* **Submissions/s**: ``POST /v1/jobs`` of the seed-shaped 3-stage testkit pipeline (validated against
  the installed plugins, stored, first message published) from ``--concurrency`` parallel clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = [
    {"plugin": "testkit", "tool": "numbers", "config": {}},
    {"plugin": "testkit", "tool": "scale", "config": {"factor": 3}},
    {"plugin": "testkit", "tool": "total", "config": {}},
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(port: int, home: str, database_url: str | None) -> None:
    import uvicorn

    from forgeflow.api.app import create_app
    from forgeflow.settings import Settings

    settings = Settings(home=Path(home), api_port=port, database_url=database_url, ws_queue_size=100_000)
    app = create_app(settings, launch_jobs=False)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws="websockets-sansio",
        ws_per_message_deflate=settings.ws_compression,  # as `forgeflow serve` runs it
    )


def start_server(database_url: str | None) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    home = tempfile.mkdtemp(prefix="forgeflow-bench-")
    cmd = [sys.executable, __file__, "--serve", str(port), "--home", home]
    if database_url:
        cmd += ["--database-url", database_url]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url, home
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the API did not start")


def ingest_token(home: str, database_url: str | None) -> str:
    from forgeflow.api.store import Store

    store = Store(database_url or f"sqlite:///{Path(home) / 'forgeflow.sqlite'}")
    try:
        return store.meta_value("ingest_token", lambda: "")
    finally:
        store.close()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def server_cpu_s(pid: int | None) -> float:
    """CPU seconds the server process has used (0 without a pid): what a message or a submission costs
    the service, which a loaded machine's clock blurs but does not change much."""
    if pid is None:
        return 0.0
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def latency(url: str, token: str, clients: int, events: int, server_pid: int | None = None) -> dict[str, float]:
    from websockets.asyncio.client import connect

    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
        first = {"type": "job_status", "job_id": job_id, "status": "running", "event_id": uuid.uuid4().hex}
        (await http.post("/internal/v1/events", json={"events": [first]})).raise_for_status()
        ws_url = url.replace("http://", "ws://") + f"/v1/ws/jobs/{job_id}"
        sockets = [await connect(ws_url, max_queue=None) for _ in range(clients)]
        for ws in sockets:  # the replayed first message
            json.loads(await ws.recv())
        samples: list[float] = []
        cpu0 = server_cpu_s(server_pid)

        async def receive(ws, event_id: str, t0: float) -> float:  # type: ignore[no-untyped-def]
            # The clients share this process (and the machine) with the server: each looks for the
            # event's id in the text rather than parsing every message, so that the 100th client's
            # clock measures the service more than the 99 parses before it.
            while True:
                if event_id in await ws.recv():
                    return (time.perf_counter() - t0) * 1000

        for i in range(events):
            event = {
                "type": "pipeline_progress",
                "job_id": job_id,
                "stages_total": events,
                "stages_completed": i,
                "percent": round(100 * i / events),
                "event_id": uuid.uuid4().hex,
            }
            t0 = time.perf_counter()
            waiters = [asyncio.create_task(receive(ws, event["event_id"], t0)) for ws in sockets]
            (await http.post("/internal/v1/events", json={"events": [event]})).raise_for_status()
            samples.extend(await asyncio.gather(*waiters))
        cpu = server_cpu_s(server_pid) - cpu0
        for ws in sockets:
            await ws.close()
    return {
        "p50": pct(samples, 50),
        "p99": pct(samples, 99),
        "mean": statistics.fmean(samples),
        "samples": float(len(samples)),
        "server_cpu_ms_per_event": cpu / events * 1000,
    }


async def submissions(url: str, jobs: int, concurrency: int, server_pid: int | None = None) -> tuple[float, float]:
    """Submissions per second, and the server's CPU milliseconds per submission."""
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as http:
        sem = asyncio.Semaphore(concurrency)

        async def one(n: int) -> None:
            async with sem:
                r = await http.post("/v1/jobs", json={"pipeline": PIPELINE, "input": {"count": n % 100}})
                assert r.status_code == 202, r.text

        for n in range(20):  # warm-up
            await one(n)
        cpu0 = server_cpu_s(server_pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(jobs)))
        rate = jobs / (time.perf_counter() - t0)
        return rate, (server_cpu_s(server_pid) - cpu0) / jobs * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--clients", default="1,100")
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--out", default=None, help="Append a markdown table to this file.")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.home, args.database_url)
        return 0

    load = os.getloadavg()[0]
    proc, url, home = start_server(args.database_url)
    try:
        token = ingest_token(home, args.database_url)
        rows = []
        for n in [int(c) for c in args.clients.split(",")]:
            result = asyncio.run(latency(url, token, n, args.events, proc.pid))
            rows.append((n, result))
            print(
                f"{n:>4} clients: p50 {result['p50']:.2f} ms  p99 {result['p99']:.2f} ms  "
                f"({int(result['samples'])} deliveries; server CPU {result['server_cpu_ms_per_event']:.2f} ms/event)"
            )
        rate, submit_cpu = asyncio.run(submissions(url, args.jobs, args.concurrency, proc.pid))
        print(
            f"submissions: {rate:.0f} jobs/s ({args.jobs} jobs, concurrency {args.concurrency}; "
            f"server CPU {submit_cpu:.2f} ms each)"
        )
    finally:
        proc.terminate()
        proc.wait(10)
    if args.out:
        store = "PostgreSQL" if args.database_url else "SQLite (WAL)"
        lines = [
            "",
            f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — {store}, {platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load average before the run {load:.2f}",
            "",
            "| measurement | clients | p50 | p99 | mean |",
            "|---|---:|---:|---:|---:|",
        ]
        for n, r in rows:
            lines.append(
                f"| ingest POST → WebSocket client ({args.events} events) | {n} | {r['p50']:.2f} ms | "
                f"{r['p99']:.2f} ms | {r['mean']:.2f} ms |"
            )
        lines += [
            "",
            "| measurement | result |",
            "|---|---:|",
            f"| job submissions (POST /v1/jobs, 3-stage pipeline, validated + stored), concurrency "
            f"{args.concurrency} | {rate:.0f} jobs/s |",
            "",
        ]
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
