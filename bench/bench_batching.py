"""Cross-job batching: 20 one-image pose jobs submitted at once to the engine, batching on and off,
against the pose model called directly in a warm loop, in one run.

    .venv/bin/python bench/bench_batching.py [--jobs 20] [--rounds 2] [--joined]

Starts a local Prefect server (SQLite) in a fresh folder, then for each mode an engine of its own
(``FORGEFLOW_BATCHING=true``; the same with one CPU slot, so calls gather while it is busy;
``FORGEFLOW_BATCHING=false``; with ``--joined``, ``FORGEFLOW_VISION_JOINED_PASSES=true`` too;
defaults otherwise) that runs every job as a Prefect flow
run with a task run per stage. Each job is ``detect_players → estimate_poses`` on one image
(Ultralytics' bus.jpg and zidane.jpg, alternately) on the CPU. After two warm-up jobs, ``--jobs``
jobs go to the engine at once (one streaming client each); the time from the first submission to
the last terminal status gives jobs/s (the best of ``--rounds``). The direct loop is the pose model
(``predict`` on the same images, one at a time, warm) in this process: images/s. Prints a markdown
table, the engine's batch counts and the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIPELINE = {
    "stages": [
        {"plugin": "forgesyte-yolo-tracker", "tool": "detect_players", "config": {"device": "cpu"}},
        {"plugin": "pose-estimator", "tool": "estimate_poses", "config": {"device": "cpu"}},
    ]
}


def direct_loop(images: list[str], n: int) -> float:
    """Images/s of the pose model called directly, warm, one image at a time."""
    import cv2

    from forgeflow.plugins.builtin._vision import bundled_pose_weights, load_yolo, predict, setup_ultralytics

    setup_ultralytics()
    model = load_yolo(str(bundled_pose_weights()), "cpu")
    frames = [cv2.imread(path) for path in images]
    for frame in frames:  # warm
        predict(model, [frame], device="cpu", imgsz=640, confidence=0.25, classes=None)
    start = time.perf_counter()
    for i in range(n):
        predict(model, [frames[i % len(frames)]], device="cpu", imgsz=640, confidence=0.25, classes=None)
    return n / (time.perf_counter() - start)


def burst(client: Any, images: list[str], n: int, prefix: str) -> tuple[float, int]:
    """``n`` jobs at once: (seconds from the first submission to the last end, jobs that succeeded)."""
    statuses: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        status = "lost"
        for line in client.stream(f"{prefix}-{i}", PIPELINE, {"media": images[i % len(images)]}):
            if "status" in line:
                status = line["status"]
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, statuses.count("succeeded")


def engine_mode(
    home: Path, prefect_url: str, images: list[str], assets: Path, args: Any, **overrides: Any
) -> dict[str, Any]:
    from forgeflow.engine.client import ensure_engine
    from forgeflow.settings import Settings

    settings = Settings(home=home, media_input_roots=[assets], **overrides)
    client, _status = ensure_engine(settings, env={"PREFECT_API_URL": prefect_url}, timeout=180)
    try:
        burst(client, images, 2, "warm")  # workers started, models loaded
        rounds = [burst(client, images, args.jobs, f"r{r}") for r in range(args.rounds)]
        status = client.status()
    finally:
        client.shutdown(drain=False)
    best = min(rounds)
    return {
        "jobs_per_s": args.jobs / best[0],
        "succeeded": best[1],
        "rounds_s": [round(r[0], 2) for r in rounds],
        "batches": status.get("batching", {}).get("batches", 0),
        "batched_calls": status.get("batching", {}).get("batched_calls", 0),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--joined", action="store_true", help="also a row with FORGEFLOW_VISION_JOINED_PASSES=true (for a GPU host)"
    )
    args = parser.parse_args()

    from ultralytics import ASSETS

    from forgeflow.jobs.prefect_server import LocalPrefectServer

    assets = Path(ASSETS)
    images = [str(assets / "bus.jpg"), str(assets / "zidane.jpg")]
    base = Path(tempfile.mkdtemp(prefix="ff-bench-batching-"))
    load_before = os.getloadavg()
    os.environ["PREFECT_UI_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    prefect = LocalPrefectServer(base / "prefect")
    prefect_url = prefect.start(timeout=180)
    try:
        modes = {
            "batching on": engine_mode(base / "on", prefect_url, images, assets, args, batching=True),
            "batching on, 1 CPU slot": engine_mode(
                base / "on1", prefect_url, images, assets, args, batching=True, device_slots={"cpu": 1}
            ),
            "batching off": engine_mode(base / "off", prefect_url, images, assets, args, batching=False),
        }
        if args.joined:
            modes["batching on, joined passes"] = engine_mode(
                base / "joined", prefect_url, images, assets, args, batching=True, vision_joined_passes=True
            )
        direct = statistics.median(direct_loop(images, args.jobs) for _ in range(2))
    finally:
        prefect.stop()
    load_after = os.getloadavg()

    print(f"\n{args.jobs} one-image pose jobs (detect → pose, CPU) at once; best of {args.rounds} rounds\n")
    print("| | jobs/s | vs the direct loop | batches (calls in them) | rounds (s) |")
    print("|---|---:|---:|---:|---|")
    for name, row in modes.items():
        print(
            f"| engine, {name} ({row['succeeded']}/{args.jobs} succeeded) | {row['jobs_per_s']:.2f} | "
            f"{row['jobs_per_s'] / direct:.2f}× | {row['batches']} ({row['batched_calls']}) | {row['rounds_s']} |"
        )
    print(f"| pose model called directly, warm loop | {direct:.2f} images/s | 1.00× | — | — |")
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
