"""What a small job costs besides its model, on SQLite and on PostgreSQL, in one run (issue 24).

    .venv/bin/python bench/bench_orchestration.py [--stores sqlite,postgresql] [--jobs 10] [--burst 20]
                                                  [--pipeline soccer|noop] [--profile DIR]

For each store it starts, in a fresh FORGEFLOW_HOME, a local Prefect server and ``forgeflow serve``
(``forgeflow.api.server``, which starts the engine) on that database — PostgreSQL is a throwaway
cluster made with ``initdb`` (fsync on, default settings), one database for Prefect and one for the
API — and measures:

* **one job, POST → terminal, p50**: ``--jobs`` one-image jobs one after the other (all-jobs
  WebSocket clock);
* **``--burst`` one-image jobs at once** → jobs/s, beside the pose model called warm in a loop in
  one process (images/s): the first burst grows plugins' worker pools, which a service does once
  (its row is printed too); bursts repeat until one starts no new worker (at most ``WARM_BURSTS``),
  then the measured burst runs (the workers it started, if any, are printed with it);
* **orchestration CPU per job**: the CPU seconds of every process (API, Prefect server, engine and
  its workers, via psutil) over the burst, per job, minus the CPU the same three stages take when
  called directly in one warm process (the model's share);
* **submissions/s** and **WebSocket fan-out p99 at 100 clients**: ``bench_api.py``'s measurements
  against an API on the same database (launcher off, so only the service's cost counts).

``--pipeline noop``: three testkit no-op stages instead of the soccer model (pure orchestration;
needs the test plugins on PYTHONPATH). ``--profile DIR``: py-spy samples every process during the
burst and writes each one's top functions to DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import bench_api  # noqa: E402
from bench_deployment import wait_healthy  # noqa: E402
from bench_engine import (  # noqa: E402
    SOCCER,
    Watcher,
    cpu_seconds,
    free_port,
    p50,
    start_api,
    start_prefect,
    stop_stack,
)

#: Most bursts before the measured one (the first included) while pools still grow.
WARM_BURSTS = 4

NOOP = [
    {"plugin": "testkit", "tool": "noop", "config": {}},
    {"plugin": "testkit", "tool": "noop", "config": {}},
    {"plugin": "testkit", "tool": "noop", "config": {}},
]

DIRECT = r"""
import json, sys, time
from pathlib import Path
from forgeflow.plugins import MediaStore, ToolContext
from forgeflow.plugins.builtin import classifier, pose_estimator, yolo_tracker
from forgeflow.plugins.builtin._vision import bundled_pose_weights, load_yolo, predict
import cv2
image, n = sys.argv[1], int(sys.argv[3])
ctx = ToolContext(media_store=MediaStore(Path(sys.argv[2])), input_roots=[Path(image).parent])
det = yolo_tracker.plugin.tools["detect_players"]; pose = pose_estimator.plugin.tools["estimate_poses"]
cls = classifier.plugin.tools["classify_actions"]
def stages():
    p = det.invoke({"device": "auto", "confidence": 0.25}, {"media": image}, ctx)
    q = pose.invoke({"model": "light"}, {"media": image, "players": p["players"]}, ctx)
    cls.invoke({}, {"players": p["players"], "poses": q["poses"]}, ctx)
model = load_yolo(str(bundled_pose_weights()), "cpu"); img = cv2.imread(image)
def model_once():
    predict(model, [img], device="cpu", imgsz=640, confidence=0.25, classes=None)
for _ in range(2):
    stages(); model_once()
t, c = time.perf_counter(), time.process_time()
for _ in range(n):
    model_once()
loop_s, loop_cpu = time.perf_counter() - t, time.process_time() - c
c = time.process_time()
for _ in range(n):
    stages()
stages_cpu = time.process_time() - c
print(json.dumps({"images_per_s": n / loop_s, "model_cpu_s": loop_cpu / n, "stages_cpu_s": stages_cpu / n}))
"""


# --- PostgreSQL: a throwaway cluster --------------------------------------------------------------


class Postgres:
    """``initdb`` + ``pg_ctl`` in a temp folder (as the ``postgres`` user when run as root), default
    durability settings."""

    def __init__(self) -> None:
        found = shutil.which("initdb")
        if not found:
            raise SystemExit("PostgreSQL is not installed (initdb not found)")
        self.bindir = Path(os.path.realpath(found)).parent
        self.root = Path(tempfile.mkdtemp(prefix="ff-bench-pg-"))
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.run_as:
            shutil.chown(self.root, "postgres", "postgres")
        self.port = free_port()
        data = self.root / "data"
        subprocess.run(
            [*self.run_as, str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            [
                *self.run_as,
                str(self.bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(self.root / "log"),
                "-w",
                "-o",
                f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300",
                "start",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def database(self, driver: str) -> str:
        import psycopg

        name = f"ff_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{name}"

    def pids(self) -> list[int]:
        import psutil

        pid_file = self.root / "data" / "postmaster.pid"
        try:
            return [int(pid_file.read_text().split()[0])]
        except (OSError, ValueError, IndexError):
            return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]

    def stop(self) -> None:
        subprocess.run(
            [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(self.root, ignore_errors=True)


# --- one store -----------------------------------------------------------------------------------


def submit_all(
    client: httpx.Client, ws: Watcher, media: str | None, ids: list[str], pipeline: list[dict[str, Any]]
) -> float:
    """Submit jobs at once, wait for all to end succeeded; seconds from the first POST to the last end.

    The client is made before the clock starts: making one (its TLS context, even for http://) takes
    30-200 ms here, which is the bench's cost, not the job's."""
    body_input = {"media": media} if media else {}
    t = time.perf_counter()
    for job_id in ids:
        r = client.post("/v1/jobs", json={"job_id": job_id, "pipeline": pipeline, "input": body_input})
        assert r.status_code == 202, r.text
    deadline = time.monotonic() + 600
    while not all(j in ws.terminal for j in ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sum(j in ws.terminal for j in ids)} of {len(ids)} jobs ended")
        time.sleep(0.005)
    bad = {j: ws.status[j] for j in ids if ws.status[j] != "succeeded"}
    assert not bad, bad
    return max(ws.terminal[j] for j in ids) - t


def completed_task_runs(prefect_url: str) -> int:
    body = {"task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    return int(httpx.post(f"{prefect_url}/task_runs/count", json=body, timeout=30).json())


def wait_recorded(prefect_url: str, count: int, timeout: float = 60.0) -> None:
    """Until Prefect's database holds ``count`` completed task runs."""
    deadline = time.monotonic() + timeout
    while completed_task_runs(prefect_url) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Prefect recorded fewer than {count} completed task runs in {timeout:g}s")
        time.sleep(0.1)


def profile_start(pids: dict[str, int], out: Path, seconds: float) -> list[subprocess.Popen[bytes]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                *(spy, "record", "--pid", str(pid), "--subprocesses", "--format", "raw", "--rate", "200"),
                *("--nonblocking", "--duration", str(int(seconds)), "-o", str(out / f"{name}.txt")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]


def top_functions(path: Path, n: int = 25) -> list[tuple[str, float]]:
    """Self-and-below share of the samples per function (collapsed stacks from ``py-spy --format raw``)."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for frame in set(stack.split(";")):
            counts[frame] = counts.get(frame, 0) + int(count)
    return [(f, c / max(total, 1)) for f, c in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]


def run_store(store: str, args: argparse.Namespace, direct: dict[str, float] | None) -> dict[str, Any]:
    from ultralytics import ASSETS

    home = Path(tempfile.mkdtemp(prefix=f"ff-bench-orch-{store}-"))
    pg = Postgres() if store == "postgresql" else None
    env = {**os.environ, "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    if args.torch_threads:  # the service's workers only: the direct loop keeps the default
        env["FORGEFLOW_TORCH_THREADS"] = str(args.torch_threads)
    api_db = None
    if pg is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = pg.database("asyncpg")
        api_db = pg.database("psycopg")
    prefect, prefect_url = start_prefect(home / "prefect", env)
    port = free_port()
    env.update(
        {
            "FORGEFLOW_HOME": str(home / "ff"),
            "PREFECT_API_URL": prefect_url,
            "FORGEFLOW_API_PORT": str(port),
            **({"FORGEFLOW_DATABASE_URL": api_db} if api_db else {}),
        }
    )
    api = start_api(env)
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"store": store}
    try:
        wait_healthy(url)
        pipeline = SOCCER if args.pipeline == "soccer" else NOOP
        media = None
        if args.pipeline == "soccer":
            with open(Path(ASSETS) / "bus.jpg", "rb") as fh:
                media = httpx.post(f"{url}/v1/media", files={"file": ("bus.jpg", fh, "image/jpeg")}).json()["ref"]
        ws = Watcher(url.replace("http", "ws") + "/v1/ws/jobs")
        client = httpx.Client(base_url=url, timeout=60)
        for i in range(2):
            submit_all(client, ws, media, [f"warm-{i}"], pipeline)
        ends = []
        for i in range(args.jobs):
            job_id = f"seq-{i}"
            t = time.perf_counter()
            submit_all(client, ws, media, [job_id], pipeline)
            ends.append(ws.terminal[job_id] - t)
        engine_pid = httpx.get(f"{url}/v1/engine").json()["pid"]
        pids = {
            "engine (incl. workers)": (engine_pid, True),
            "API": (api.pid, False),
            "Prefect server": (prefect.proc.pid if prefect.proc else 0, True),
        }
        if pg is not None:
            pids["PostgreSQL"] = (pg.pids()[0], True)
        model = direct["stages_cpu_s"] if direct and args.pipeline == "soccer" else 0.0

        def burst(name: str, profile: bool) -> tuple[float, dict[str, float]]:
            """``--burst`` jobs at once: seconds to the last end, and CPU per job of each process."""
            spies = []
            if profile:
                spies = profile_start(
                    {"engine": engine_pid, "api": api.pid, "prefect": pids["Prefect server"][0]},
                    Path(args.profile) / store,
                    seconds=max(5.0, args.burst * 1.5),
                )
                time.sleep(1.0)
            recorded = completed_task_runs(prefect_url)
            before = cpu_seconds(pids)
            elapsed = submit_all(client, ws, media, [f"{name}-{i}" for i in range(args.burst)], pipeline)
            # Prefect records task runs from their events a little later (in batches): the CPU counts
            # until every stage of the burst is a completed task run in Prefect's database.
            wait_recorded(prefect_url, recorded + args.burst * len(pipeline))
            time.sleep(0.5)  # the last events' ingest
            after = cpu_seconds(pids)
            for spy in spies:
                spy.wait()
            return elapsed, {k: round((after[k] - before.get(k, 0.0)) / args.burst, 3) for k in after}

        def worker_pids() -> set[int]:
            return {w["pid"] for w in httpx.get(f"{url}/v1/engine", timeout=30).json().get("workers", [])}

        # The first burst finds one warm worker per plugin and grows pools (a worker's start is a torch
        # import and a model load, seconds of CPU). Which burst a pool grows in depends on timing (a
        # second pose worker started in the second burst in some runs, ~0.3 core-s per job of it), so
        # bursts repeat until one starts no worker (at most WARM_BURSTS): the measured burst finds the
        # pools as a service that has seen such bursts keeps them. The first burst is reported too;
        # the targets read the measured one, and workers it started are reported with it.
        first_elapsed, first_cpu = burst("first-burst", profile=False)
        warm_bursts = 1
        pids_before = worker_pids()
        while warm_bursts < WARM_BURSTS:
            burst(f"warm-burst-{warm_bursts}", profile=False)
            warm_bursts += 1
            pids_after = worker_pids()
            if pids_after <= pids_before:
                break
            pids_before = pids_after
        elapsed, cpu = burst("burst", profile=bool(args.profile))
        started_in_burst = len(worker_pids() - pids_before)
        total = sum(cpu.values())
        result.update(
            {
                "post_to_terminal_p50_s": p50(ends),
                "burst_jobs_per_s": args.burst / elapsed,
                "cpu_per_job": cpu,
                "cpu_per_job_total": total,
                "orchestration_cpu_per_job": total - model,
                "first_burst_jobs_per_s": args.burst / first_elapsed,
                "first_burst_cpu_per_job": first_cpu,
                "first_burst_orchestration_cpu_per_job": sum(first_cpu.values()) - model,
                "bursts_before_measured": warm_bursts,
                "workers_started_in_measured_burst": started_in_burst,
            }
        )
        client.close()
        if args.profile:
            for name in ("engine", "api", "prefect"):
                path = Path(args.profile) / store / f"{name}.txt"
                if path.exists():
                    lines = [f"{share:6.1%}  {frame}" for frame, share in top_functions(path, 40)]
                    (path.with_suffix(".top")).write_text("\n".join(lines) + "\n")
    finally:
        stop_stack(api, home / "ff", prefect)
    # submissions/s and WebSocket fan-out: the API alone on the same kind of database
    server, api_url, api_home = bench_api.start_server(pg.database("psycopg") if pg else None)
    try:
        token = bench_api.ingest_token(api_home, None if pg is None else _api_db_of(server))
        fanout = asyncio.run(bench_api.latency(api_url, token, 100, args.events, server.pid))
        result["ws_p99_100_clients_ms"] = fanout["p99"]
        result["ws_p50_100_clients_ms"] = fanout["p50"]
        result["ws_server_cpu_ms_per_event"] = fanout["server_cpu_ms_per_event"]
        rate, submit_cpu = asyncio.run(bench_api.submissions(api_url, args.submissions, 16, server.pid))
        result["submissions_per_s"], result["submission_server_cpu_ms"] = rate, submit_cpu
    finally:
        server.terminate()
        server.wait(10)
        if pg is not None:
            pg.stop()
    return result


def _api_db_of(server: subprocess.Popen[bytes]) -> str:
    args = list(server.args)  # type: ignore[arg-type]
    return str(args[args.index("--database-url") + 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--torch-threads", type=int, default=None, help="FORGEFLOW_TORCH_THREADS for the workers")
    parser.add_argument("--events", type=int, default=200, help="events sent to the 100 WebSocket clients")
    parser.add_argument("--submissions", type=int, default=400)
    parser.add_argument("--pipeline", choices=["soccer", "noop"], default="soccer")
    parser.add_argument("--profile", default=None)
    args = parser.parse_args()
    load = os.getloadavg()
    direct = None
    if args.pipeline == "soccer":
        from ultralytics import ASSETS

        done = subprocess.run(
            [sys.executable, "-c", DIRECT, str(Path(ASSETS) / "bus.jpg"), tempfile.mkdtemp(), str(args.jobs)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        direct = json.loads(done.stdout.strip().splitlines()[-1])
    results = [run_store(store, args, direct) for store in args.stores.split(",")]
    print(f"\nload average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs")
    if direct:
        print(
            f"direct: pose model warm in a loop {direct['images_per_s']:.2f} images/s "
            f"({direct['model_cpu_s']:.3f} core-s each); the three stages called directly "
            f"{direct['stages_cpu_s']:.3f} core-s per image"
        )
    head = "| metric | " + " | ".join(r["store"] for r in results) + " | target |"
    print(head)
    print("|---|" + "---:|" * len(results) + "---:|")
    rows = [
        (
            f"{args.burst} one-image jobs at once (jobs/s; × the direct loop) [bursts before it; workers it started]",
            lambda r: (
                f"{r['burst_jobs_per_s']:.2f}"
                + (f" ({r['burst_jobs_per_s'] / direct['images_per_s']:.2f}×)" if direct else "")
                + f" [{r['bursts_before_measured']}; {r['workers_started_in_measured_burst']}]"
            ),
            "≥ 0.5×",
        ),
        (
            "orchestration CPU per job (all processes minus the stages' direct CPU)",
            lambda r: f"{r['orchestration_cpu_per_job']:.3f} core-s",
            "≤ 0.25",
        ),
        (
            f"the first {args.burst} at once, pools growing (jobs/s; orchestration CPU per job)",
            lambda r: (
                f"{r['first_burst_jobs_per_s']:.2f}"
                + (f" ({r['first_burst_jobs_per_s'] / direct['images_per_s']:.2f}×)" if direct else "")
                + f"; {r['first_burst_orchestration_cpu_per_job']:.3f} core-s"
            ),
            "—",
        ),
        ("one job, POST → terminal, p50", lambda r: f"{r['post_to_terminal_p50_s']:.3f} s", "≤ 0.3 s"),
        (
            "job submissions accepted and stored (API CPU each)",
            lambda r: f"{r['submissions_per_s']:.0f}/s ({r['submission_server_cpu_ms']:.1f} ms)",
            "≥ 200/s",
        ),
        (
            "WebSocket fan-out p99, 100 clients (API CPU per message to all 100)",
            lambda r: f"{r['ws_p99_100_clients_ms']:.1f} ms ({r['ws_server_cpu_ms_per_event']:.1f} ms)",
            "≤ 20 ms",
        ),
    ]
    for name, cell, target in rows:
        print(f"| {name} | " + " | ".join(cell(r) for r in results) + f" | {target} |")
    for r in results:
        print(f"\nCPU per job, {r['store']}: {json.dumps(r['cpu_per_job'])}")
    print("\nraw:", json.dumps({"direct": direct, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
