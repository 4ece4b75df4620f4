"""The warm engine against the same work done directly, and against plain Prefect, in one run.

    .venv/bin/python bench/bench_engine.py [--jobs 10] [--burst 20] [--main-runs 3]

Starts a local Prefect server (SQLite) and ``forgeflow serve`` (which starts the engine) in a fresh
FORGEFLOW_HOME, then measures:

* plain Prefect: a sync flow of 3 trivial tasks in one warm process (default, and without the
  heartbeat thread as the engine runs it), p50; 20 such flows at once (threads) → runs/s;
* the one-image soccer job (detect → pose → classify on bus.jpg) through the API, warm:
  POST → first ``pipeline_stage_start`` and POST → terminal message, p50 (all-jobs WebSocket);
* 20 such jobs submitted at once → jobs/s, and the peak resident memory of the engine and its
  workers with 20 queued against one job;
* the same three stages called directly in this process on warm models, p50;
* ``forgeflow run`` of README's main job (engine running) against a one-pass Ultralytics script
  (``YOLO.track`` on the clip plus a per-player rule), whole-process wall, median;
* model passes per frame in the soccer pipeline (from the stage reports).

Prints a markdown table (paste it into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOCCER = [
    {"plugin": "forgesyte-yolo-tracker", "tool": "detect_players", "config": {"device": "auto", "confidence": 0.25}},
    {"plugin": "pose-estimator", "tool": "estimate_poses", "config": {"model": "light"}},
    {"plugin": "classifier", "tool": "classify_actions", "config": {}},
]


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- plain Prefect ----------------------------------------------------------------------------------

PLAIN = r"""
import json, statistics, sys, threading, time
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

@task(cache_policy=NO_CACHE, persist_result=False)
def step(x): return x + 1

@flow(persist_result=False)
def three(x: int = 0):
    for _ in range(3):
        x = step(x)
    return x

def once(heartbeat):
    t = time.perf_counter()
    if heartbeat:
        three()
    else:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            three()
    return time.perf_counter() - t

reps, burst = int(sys.argv[1]), int(sys.argv[2])
once(False)
default = [once(True) for _ in range(reps)]
no_hb = [once(False) for _ in range(reps)]
out = []
threads = [threading.Thread(target=lambda: out.append(once(False))) for _ in range(burst)]
t = time.perf_counter()
[x.start() for x in threads]; [x.join() for x in threads]
total = time.perf_counter() - t
print(json.dumps({"default_p50": statistics.median(default), "no_heartbeat_p50": statistics.median(no_hb),
                  "burst_runs_per_s": burst / total, "default": default, "no_heartbeat": no_hb}))
"""


def plain_prefect(env: dict[str, str], reps: int, burst: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", PLAIN, str(reps), str(burst)], env=env, capture_output=True, text=True, timeout=900
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the API ----------------------------------------------------------------------------------------


class Watcher:
    """All-jobs WebSocket: when each job's first stage started and when it ended."""

    def __init__(self, ws_url: str) -> None:
        self.first_start: dict[str, float] = {}
        self.terminal: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self._ready = threading.Event()
        threading.Thread(target=lambda: asyncio.run(self._run(ws_url)), daemon=True).start()
        self._ready.wait(30)

    async def _run(self, url: str) -> None:
        import websockets

        async with websockets.connect(url, max_size=None) as ws:
            self._ready.set()
            with contextlib.suppress(websockets.ConnectionClosed):  # the API stops at the bench's end
                await self._read(ws)

    async def _read(self, ws: Any) -> None:
        async for raw in ws:
            now = time.perf_counter()
            m = json.loads(raw)
            job = m.get("job_id")
            if m["type"] == "pipeline_stage_start":
                self.first_start.setdefault(job, now)
            if m["type"] == "job_status" and m["status"] in ("succeeded", "failed", "cancelled", "crashed"):
                self.terminal.setdefault(job, now)
                self.status[job] = m["status"]


def tree_rss_mb(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def api_jobs(url: str, ws: Watcher, media: str, n: int, *, prefix: str) -> tuple[list[float], list[float]]:
    firsts, ends = [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(n):
            job_id = f"{prefix}-{i}"
            t = time.perf_counter()
            r = client.post("/v1/jobs", json={"job_id": job_id, "pipeline": SOCCER, "input": {"media": media}})
            assert r.status_code == 202, r.text
            while job_id not in ws.terminal:
                time.sleep(0.002)
            assert ws.status[job_id] == "succeeded", client.get(f"/v1/jobs/{job_id}").json()
            firsts.append(ws.first_start[job_id] - t)
            ends.append(ws.terminal[job_id] - t)
    return firsts, ends


def cpu_seconds(pids: dict[str, tuple[int, bool]]) -> dict[str, float]:
    """CPU seconds used so far by each named process (with its children when asked: the engine's
    workers count with the engine; the API, whose child the engine is, counts alone)."""
    out = {}
    for name, (pid, with_children) in pids.items():
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)] if with_children else [root]
        except psutil.Error:
            continue
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        out[name] = total
    return out


class PeakMemory:
    """Samples the resident memory of a process tree every 50 ms while in the ``with`` block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            time.sleep(0.05)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def burst(url: str, ws: Watcher, media: str, n: int, engine_pid: int) -> tuple[float, float]:
    """Submit ``n`` jobs at once: jobs per second, and the peak memory of the engine and its workers."""
    ids = [f"burst-{i}" for i in range(n)]
    with PeakMemory(engine_pid) as memory, httpx.Client(base_url=url, timeout=60) as client:
        t = time.perf_counter()  # after the client is made (its TLS context alone takes 30-200 ms here)
        for job_id in ids:
            body = {"job_id": job_id, "pipeline": SOCCER, "input": {"media": media}}
            assert client.post("/v1/jobs", json=body).status_code == 202
        while not all(j in ws.terminal for j in ids):
            time.sleep(0.01)
        elapsed = max(ws.terminal[j] for j in ids) - t
    assert all(ws.status[j] == "succeeded" for j in ids), {j: ws.status[j] for j in ids}
    return n / elapsed, memory.peak


def one_job_peak(url: str, ws: Watcher, media: str, engine_pid: int) -> float:
    with PeakMemory(engine_pid) as memory:
        api_jobs(url, ws, media, 1, prefix="peak")
    return memory.peak


# --- direct -----------------------------------------------------------------------------------------

DIRECT = r"""
import json, statistics, sys, time
from pathlib import Path
from forgeflow.plugins import MediaStore, ToolContext
from forgeflow.plugins.builtin import classifier, pose_estimator, yolo_tracker
image = sys.argv[1]
ctx = ToolContext(media_store=MediaStore(Path(sys.argv[2])), input_roots=[Path(image).parent])
det = yolo_tracker.plugin.tools["detect_players"]; pose = pose_estimator.plugin.tools["estimate_poses"]
cls = classifier.plugin.tools["classify_actions"]
def once():
    t = time.perf_counter()
    p = det.invoke({"device": "auto", "confidence": 0.25}, {"media": image}, ctx)
    q = pose.invoke({"model": "light"}, {"media": image, "players": p["players"]}, ctx)
    cls.invoke({}, {"players": p["players"], "poses": q["poses"]}, ctx)
    return time.perf_counter() - t
def model_once():
    from forgeflow.plugins.builtin._vision import bundled_pose_weights, load_yolo, predict
    import cv2
    model = load_yolo(str(bundled_pose_weights()), "cpu"); img = cv2.imread(image)
    t = time.perf_counter(); predict(model, [img], device="cpu", imgsz=640, confidence=0.25, classes=None)
    return time.perf_counter() - t
once(); once(); model_once()
three = [once() for _ in range(int(sys.argv[3]))]
model = [model_once() for _ in range(int(sys.argv[3]))]
print(json.dumps({"three_stages_p50": statistics.median(three), "model_once_p50": statistics.median(model)}))
"""

ONE_PASS = r"""
import os, sys, time
t = time.perf_counter()
os.environ.update(YOLO_OFFLINE="1", YOLO_VERBOSE="False", YOLO_AUTOINSTALL="False")
from ultralytics import YOLO
from forgeflow.plugins.builtin._vision import bundled_pose_weights
model = YOLO(str(bundled_pose_weights()))
actions = {}
last = {}
for result in model.track(sys.argv[1], persist=True, stream=True, verbose=False, tracker="bytetrack.yaml"):
    if result.boxes.id is None:
        continue
    for tid, box in zip(result.boxes.id.tolist(), result.boxes.xyxy.tolist()):
        cx = (box[0] + box[2]) / 2
        actions[tid] = "running" if tid in last and abs(cx - last[tid]) > 4 else "standing"
        last[tid] = cx
print(len(actions), time.perf_counter() - t)
"""


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - t
    if done.returncode:
        raise RuntimeError(f"{cmd}: {done.stderr[-3000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--main-runs", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=None, help="FORGEFLOW_TORCH_THREADS for the workers")
    args = parser.parse_args()

    from ultralytics import ASSETS

    from forgeflow.jobs.prefect_server import LocalPrefectServer

    home = Path(tempfile.mkdtemp(prefix="ff-bench-engine-"))
    bus = str(Path(ASSETS) / "bus.jpg")
    clip = ROOT / "examples" / "sample.mp4"
    if not clip.exists():
        subprocess.run([sys.executable, "-m", "forgeflow.cli", "sample-clip", str(clip)], check=True)
    os.environ["PREFECT_UI_ENABLED"] = "false"
    prefect = LocalPrefectServer(home / "prefect")
    prefect_url = prefect.start(timeout=180)
    port = free_port()
    env = {
        **os.environ,
        "FORGEFLOW_HOME": str(home / "ff"),
        "PREFECT_API_URL": prefect_url,
        "FORGEFLOW_API_PORT": str(port),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    if args.torch_threads:
        env["FORGEFLOW_TORCH_THREADS"] = str(args.torch_threads)
    api = start_api(env)
    url = f"http://127.0.0.1:{port}"
    rows: list[tuple[str, str, str, str]] = []
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with open(bus, "rb") as fh:
            media = httpx.post(f"{url}/v1/media", files={"file": ("bus.jpg", fh, "image/jpeg")}).json()["ref"]
        ws = Watcher(url.replace("http", "ws") + "/v1/ws/jobs")
        api_jobs(url, ws, media, 2, prefix="warmup")
        engine = httpx.get(f"{url}/v1/engine").json()
        engine_pid = engine["pid"]
        firsts, ends = api_jobs(url, ws, media, args.jobs, prefix="seq")
        plain = plain_prefect(env, args.jobs, args.burst)
        pids = {
            "engine (incl. workers)": (engine_pid, True),
            "API": (api.pid, False),
            "Prefect server": (prefect.proc.pid, True),
        }
        cpu_before = cpu_seconds(pids)
        jobs_per_s, burst_peak = burst(url, ws, media, args.burst, engine_pid)
        cpu_after = cpu_seconds(pids)
        burst_cpu = {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 2) for k in cpu_after}
        single_peak = one_job_peak(url, ws, media, engine_pid)
        job = httpx.get(f"{url}/v1/jobs/seq-0").json()
        stages = job["envelope"]["stages"]
        frames = len(job["envelope"]["result"]["players"])
        passes = sum((s.get("computed_outputs") or 0) for s in stages) / max(frames, 1)
        direct = json.loads(
            subprocess.run(
                [sys.executable, "-c", DIRECT, bus, str(home / "direct"), str(args.jobs)],
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )

        # README's main job with the engine of this FORGEFLOW_HOME running, against a one-pass script
        run_cmd = [
            str(Path(sys.executable).parent / "forgeflow"),
            "run",
            str(ROOT / "examples" / "soccer-analysis.json"),
            "--input",
            str(clip),
        ]
        ff_runs, direct_runs = [], []
        for _ in range(args.main_runs):
            ff_runs.append(timed(run_cmd, env))
            direct_runs.append(timed([sys.executable, "-c", ONE_PASS, str(clip)], env))

        rows = [
            (
                "one-image soccer job via the API, POST → terminal, p50",
                f"{p50(ends):.3f} s",
                f"{direct['three_stages_p50']:.3f} s (3 stages in-process); model once {direct['model_once_p50']:.3f} s",
                f"{p50(ends) / direct['three_stages_p50']:.1f}×",
            ),
            (
                "plain Prefect, 3 trivial tasks, p50 (default / no heartbeat)",
                "—",
                f"{plain['default_p50']:.3f} s / {plain['no_heartbeat_p50']:.3f} s",
                f"job − plain(no hb) = {p50(ends) - plain['no_heartbeat_p50']:+.3f} s",
            ),
            ("POST /v1/jobs → first pipeline_stage_start, p50", f"{p50(firsts):.3f} s", "—", "—"),
            (
                f"{args.burst} one-image jobs at once",
                f"{jobs_per_s:.2f} jobs/s",
                f"plain Prefect {args.burst} flows at once: {plain['burst_runs_per_s']:.2f} runs/s",
                f"{jobs_per_s / plain['burst_runs_per_s']:.2f}× plain",
            ),
            (
                "`forgeflow run` README main job (engine running), wall, median",
                f"{p50(ff_runs):.2f} s",
                f"{p50(direct_runs):.2f} s (one-pass YOLO.track script)",
                f"{p50(ff_runs) / p50(direct_runs):.2f}×",
            ),
            ("model passes per frame, soccer pipeline", f"{passes:.2f}", "1", "—"),
            (
                f"peak memory, engine + workers: {args.burst} queued jobs / one job",
                f"{burst_peak:.0f} MiB",
                f"{single_peak:.0f} MiB",
                f"{burst_peak / max(single_peak, 1):.2f}×",
            ),
        ]
        print("| metric | ForgeFlow | direct / plain Prefect | ratio |")
        print("|---|---:|---:|---:|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"\nCPU seconds during the {args.burst}-job burst:", json.dumps(burst_cpu))
        print(
            "\nraw:",
            json.dumps(
                {
                    "ends": ends,
                    "firsts": firsts,
                    "plain": plain,
                    "ff_runs": ff_runs,
                    "direct_runs": direct_runs,
                    "direct": direct,
                }
            ),
        )
    finally:
        stop_stack(api, home / "ff", prefect)
    return 0


def start_prefect(home: Path, env: dict[str, str]) -> tuple[Any, str]:
    """A local Prefect server under ``home`` started with ``env`` (this process's environment is put
    back after): the server and its API URL."""
    from forgeflow.jobs.prefect_server import LocalPrefectServer

    saved = dict(os.environ)
    os.environ.update(env)
    prefect = LocalPrefectServer(home)
    try:
        return prefect, prefect.start(timeout=180)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_api(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``forgeflow.api.server`` (which starts the engine) in its own session, with ``env``."""
    return subprocess.Popen(
        [sys.executable, "-m", "forgeflow.api.server"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_stack(api: subprocess.Popen[bytes], ff_home: Path, prefect: Any) -> None:
    """Stop ``forgeflow.api.server``, the engine of ``ff_home`` it started, and the Prefect server."""
    api.terminate()
    try:
        api.wait(30)
    except subprocess.TimeoutExpired:
        api.kill()
    try:
        from forgeflow.engine.client import EngineClient

        EngineClient(ff_home / "engine.sock").shutdown(drain=False)
    except Exception:
        pass
    prefect.stop()


if __name__ == "__main__":
    sys.exit(main())
