"""Frames per second of the soccer pipeline (detect → pose → classify): direct loop vs ForgeFlow.

    .venv/bin/python bench/bench_soccer.py                 # imgsz 320 and 640, writes bench/results/soccer.md
    .venv/bin/python bench/bench_soccer.py --imgsz 320 --runs 2 --no-write

Both sides do the same work on the same sample clip (`forgeflow sample-clip`: 64 frames,
640x360) with the same weights (yolo11n-pose.pt), device, thresholds and torch threads:

* **direct** — one Python loop: decode each frame once, ``YOLO.predict`` for players, ByteTrack,
  ``YOLO.predict`` for poses, IoU matching, camera motion by phase correlation, then the
  classifier's rules. No validation, no processes, no serialization.
* **forgeflow** — ``PipelineExecutor().execute(examples/soccer-analysis.json, {"media": ref}, job_id)``:
  validation, a Prefect flow run with one task per stage, each stage in a sandboxed worker process
  (the process runner, warm workers), media by reference (each stage decodes the video itself),
  JSON between stages, realtime events to a memory sink.

Each side runs in its own fresh process: the first (cold) run loads everything (imports, weights,
for ForgeFlow also Prefect's ephemeral server and the worker processes); then ``--runs`` warm runs
per side are measured, interleaved (direct, forgeflow, forgeflow, direct, ...) so that load from
other processes on a shared machine hits both sides alike, and the median is reported. The side
that waits is frozen (SIGSTOP to its process tree), so e.g. Prefect's server cannot steal CPU from
the direct loop. Peak memory is the largest sum of RSS over the process and
all its children (workers included), sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "soccer.md"
PIPELINE = ROOT / "examples" / "soccer-analysis.json"


class PeakRSS:
    """Peak of (RSS of this process + all descendants), sampled in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


# --- the direct side -------------------------------------------------------------------------


def direct_pipeline(clip: Path, imgsz: int, device: str) -> tuple[dict[str, Any], int]:
    """The three models called directly in one loop; returns the result and the frame count."""
    import cv2

    from forgeflow.plugins.builtin._vision import bundled_pose_weights, load_yolo, setup_ultralytics
    from forgeflow.plugins.builtin.classifier import classify
    from forgeflow.plugins.builtin.pose_estimator import match_poses
    from forgeflow.plugins.builtin.schemas import FramePoses, Pose

    setup_ultralytics()
    from ultralytics.trackers.byte_tracker import BYTETracker

    model = load_yolo(str(bundled_pose_weights()), device)
    tracker = BYTETracker(
        argparse.Namespace(
            track_high_thresh=0.25,
            track_low_thresh=0.1,
            new_track_thresh=0.25,
            track_buffer=30,
            match_thresh=0.8,
            fuse_score=True,
        )
    )
    cap = cv2.VideoCapture(str(clip))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    poses_out: list[FramePoses] = []
    offsets: dict[int, tuple[float, float]] = {}
    prev_gray, window, total = None, None, (0.0, 0.0)
    index = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        det = model.predict(frame, imgsz=imgsz, conf=0.25, classes=[0], device=device, verbose=False)[0]
        boxes = det.boxes.cpu().numpy()
        ids: list[int | None] = [None] * len(boxes)
        for row in tracker.update(boxes, frame):
            ids[int(row[7])] = int(row[4])
        players = [([float(v) for v in boxes.xyxy[i]], ids[i]) for i in range(len(boxes))]
        pose = model.predict(frame, imgsz=imgsz, conf=0.1, device=device, verbose=False)[0]
        pb = pose.boxes.cpu().numpy()
        kps = pose.keypoints.data.cpu().numpy()
        frame_poses = []
        for pi, qi, value in match_poses([p[0] for p in players], [[float(v) for v in b] for b in pb.xyxy], 0.3):
            frame_poses.append(
                Pose(
                    track_id=players[pi][1],
                    player_index=pi,
                    box=[round(float(v), 2) for v in pb.xyxy[qi]],
                    confidence=round(float(pb.conf[qi]), 4),
                    match_iou=round(value, 4),
                    keypoints=[[round(float(x), 2), round(float(y), 2), round(float(c), 4)] for x, y, c in kps[qi]],
                )
            )
        poses_out.append(FramePoses(frame_index=index, timestamp_s=round(index / fps, 4), poses=frame_poses))
        # camera motion, as the classifier measures it
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype("float32")
        for p in frame_poses:
            x1, y1, x2, y2 = (max(round(v), 0) for v in p.box)
            gray[y1:y2, x1:x2] = float(gray.mean())
        factor = min(1.0, 320 / gray.shape[1])
        small = cv2.resize(gray, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA) if factor < 1 else gray
        if prev_gray is not None:
            if window is None:
                window = cv2.createHanningWindow((small.shape[1], small.shape[0]), cv2.CV_32F)
            (dx, dy), response = cv2.phaseCorrelate(prev_gray, small, window)
            if response >= 0.05:
                total = (total[0] + dx / factor, total[1] + dy / factor)
        prev_gray = small
        offsets[index] = total
        index += 1
    cap.release()
    actions = classify(poses_out, camera_offsets=offsets)
    return {"poses": [p.model_dump() for p in poses_out], "actions": [a.model_dump() for a in actions]}, index


# --- the ForgeFlow side ----------------------------------------------------------------------


def forgeflow_runner(clip: Path, imgsz: int, device: str):
    from forgeflow.jobs.executor import PipelineExecutor
    from forgeflow.pipeline.definition import PipelineDefinition
    from forgeflow.plugins.media import MediaStore
    from forgeflow.settings import get_settings

    settings = get_settings()
    ref = MediaStore(settings.media_root).put_file(clip).ref
    document = json.loads(PIPELINE.read_text())
    for stage in document["pipeline"][:2]:
        stage["config"].update({"imgsz": imgsz, "device": device})
    definition = PipelineDefinition.model_validate(document)
    executor = PipelineExecutor()
    counter = iter(range(1_000_000))

    def run() -> tuple[dict[str, Any], int]:
        outcome = executor.execute(definition, {"media": ref}, f"bench-{imgsz}-{next(counter)}")
        if not outcome.get("ok"):
            raise RuntimeError(f"pipeline failed: {outcome.get('error_type')}: {outcome.get('error')}")
        # the stages' own durations (measured by the runner around each worker call)
        outcome["result"]["_stages_s"] = sum((s.get("duration_ms") or 0.0) for s in outcome.get("stages", [])) / 1000.0
        return outcome["result"], len(outcome["result"]["players"])

    return run


def side_main(args: argparse.Namespace) -> None:
    """One side, in this (fresh) process: a cold run at once, then one warm run per "run" line on
    stdin (so the orchestrator can interleave the two sides), "stop" prints the peak memory."""
    clip = Path(args.clip)
    imgsz = args.imgsz[0]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if args.side == "direct":

            def run() -> tuple[dict[str, Any], int]:
                return direct_pipeline(clip, imgsz, args.device)
        else:
            run = forgeflow_runner(clip, imgsz, args.device)
        _, frames = run()
        print(json.dumps({"cold_s": time.perf_counter() - t0, "frames": frames}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            t = time.perf_counter()
            result, frames = run()
            print(
                json.dumps({"warm_s": time.perf_counter() - t, "frames": frames, "stages_s": result.get("_stages_s")}),
                flush=True,
            )
    print(json.dumps({"peak_rss_mb": mem.peak / 2**20}), flush=True)


# --- orchestration ---------------------------------------------------------------------------


class Side:
    """A side's process, driven line by line."""

    def __init__(self, side: str, imgsz: int, clip: Path, device: str, env: dict[str, str], log: Path) -> None:
        cmd = [sys.executable, __file__, "--side", side, "--imgsz", str(imgsz), "--clip", str(clip), "--device", device]
        self.name = side
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        self.log = log

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise RuntimeError(
                    f"{self.name} side exited with {self.proc.returncode}; see {self.log}:\n"
                    + self.log.read_text()[-3000:]
                )
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def _signal(self, sig: int) -> None:
        """Send ``sig`` to this side's process and all its descendants (Prefect server, workers)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs if sig == signal.SIGSTOP else reversed(procs):
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass

    def pause(self) -> None:
        """Freeze the idle side, so its background work (Prefect's server) cannot slow the other."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> dict[str, Any]:
        self.send("stop")
        out = self.read()
        self.proc.wait(120)
        self._log.close()
        return out


def measure(imgsz: int, runs: int, clip: Path, device: str, env: dict[str, str], work: Path) -> list[dict[str, Any]]:
    """Cold runs one after the other, then warm runs interleaved: direct, forgeflow, direct, ..."""
    rows = {}
    sides = {}
    for name in ("direct", "forgeflow"):
        print(f"imgsz {imgsz}: {name} cold run ...", file=sys.stderr, flush=True)
        sides[name] = Side(name, imgsz, clip, device, env, work / f"{name}-{imgsz}.log")
        first = sides[name].read()
        sides[name].pause()
        rows[name] = {
            "side": name,
            "imgsz": imgsz,
            "frames": first["frames"],
            "cold_s": first["cold_s"],
            "warm_s": [],
            "fixed_s": [],
        }
    for k in range(runs):
        for name in ("direct", "forgeflow") if k % 2 == 0 else ("forgeflow", "direct"):
            sides[name].resume()
            sides[name].send("run")
            out = sides[name].read()
            sides[name].pause()
            rows[name]["warm_s"].append(out["warm_s"])
            if out.get("stages_s") is not None:
                rows[name]["fixed_s"].append(out["warm_s"] - out["stages_s"])
            print(f"imgsz {imgsz}: {name} warm run {k + 1}: {out['warm_s']:.2f} s", file=sys.stderr, flush=True)
    for name, side in sides.items():
        side.resume()
        rows[name]["peak_rss_mb"] = side.close()["peak_rss_mb"]
    return [rows["direct"], rows["forgeflow"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--runs", type=int, default=5, help="warm runs per side, interleaved (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (both sides)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results/soccer.md alone")
    parser.add_argument("--side", choices=["direct", "forgeflow"], help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side_main(args)
        return 0

    from forgeflow.cli.sample_clip import make_sample_clip
    from forgeflow.plugins.builtin._vision import torch_threads

    work = Path(tempfile.mkdtemp(prefix="forgeflow-bench-soccer-"))
    clip = make_sample_clip(work / "sample.mp4")
    env = {
        **os.environ,
        "FORGEFLOW_HOME": str(work / "home"),
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # shared, busy CPUs start it slowly
        "FORGEFLOW_TORCH_THREADS": str(torch_threads()),
    }
    env.pop("PREFECT_API_URL", None)  # ForgeFlow's default local mode: Prefect's ephemeral server
    rows = []
    for imgsz in args.imgsz:
        rows.extend(measure(imgsz, args.runs, clip, args.device, env, work))

    lines = [
        "| imgsz | side | frames | cold run | warm run: median (best) | frames/s: median (best) "
        "| ForgeFlow / direct: median (best) | peak memory |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["imgsz"], r["side"]): r for r in rows}
    samples = []
    for imgsz in args.imgsz:
        direct = by_key[(imgsz, "direct")]
        d_med, d_best = statistics.median(direct["warm_s"]), min(direct["warm_s"])
        for side in ("direct", "forgeflow"):
            r = by_key[(imgsz, side)]
            med, best = statistics.median(r["warm_s"]), min(r["warm_s"])
            ratio = "1.00" if side == "direct" else f"**{d_med / med:.2f}** ({d_best / best:.2f})"
            lines.append(
                f"| {imgsz} | {side} | {r['frames']} | {r['cold_s']:.1f} s | {med:.2f} s ({best:.2f} s) "
                f"| {r['frames'] / med:.1f} ({r['frames'] / best:.1f}) | {ratio} | {r['peak_rss_mb']:.0f} MiB |"
            )
            samples.append(f"* imgsz {imgsz}, {side}: " + ", ".join(f"{x:.2f}" for x in r["warm_s"]) + " s")
            if r["fixed_s"]:
                samples.append(
                    f"* imgsz {imgsz}, ForgeFlow's fixed cost per run (run minus the stages' own durations): "
                    + ", ".join(f"{x:.2f}" for x in r["fixed_s"])
                    + " s"
                )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        import torch

        command = (
            "python bench/bench_soccer.py"
            + (f" --imgsz {' '.join(map(str, args.imgsz))}" if args.imgsz != [320, 640] else "")
            + (f" --runs {args.runs}" if args.runs != 5 else "")
            + (f" --device {args.device}" if args.device != "cpu" else "")
        )
        cpu = platform.processor() or platform.machine()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            "# Soccer pipeline: ForgeFlow vs the same models in a direct loop\n\n"
            f"Command: `{command}` (from the repository root, with the project's venv).\n\n"
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu}, {os.cpu_count()} CPUs, "
            f"device {args.device}, torch {torch.__version__}, {env['FORGEFLOW_TORCH_THREADS']} torch threads, "
            f"Python {platform.python_version()}; clip: `forgeflow sample-clip` (64 frames, 640x360); "
            f"model yolo11n-pose.pt for players and poses; {args.runs} warm runs per row, interleaved, median.\n\n"
            + table
            + "\n\nWarm runs, in the order they ran (interleaved):\n\n"
            + "\n".join(samples)
            + "\n\n"
            "The machine is shared (2 vCPUs, other people's jobs running): single runs vary by 20 % or more,\n"
            "so read the ratio of medians together with the ratio of best runs. Where the time goes: the\n"
            "three stages' own durations (inside the workers) add up to the direct loop's time plus a few\n"
            "tenths of a second (two extra decodes of the video, JSON between stages); the rest of the gap\n"
            "is ForgeFlow's fixed cost per run (validation, the Prefect flow run and its three tasks, events,\n"
            "lifecycle writes; listed above), which weighs more at imgsz 320, where the models are fast.\n\n"
            "* **cold run**: the first run of a fresh process: imports, weights; for ForgeFlow also Prefect's\n"
            "  ephemeral API server and the three worker processes.\n"
            "* **warm run**: models loaded (ForgeFlow keeps one warm worker per plugin); frames/s = 64 / warm run.\n"
            "* **peak memory**: largest RSS sum of the process and its children (ForgeFlow: the executor\n"
            "  process, its workers and Prefect's server process) during the cold and warm runs.\n"
            "* ForgeFlow's extra work per run: validation, one Prefect flow run with three tasks, process\n"
            "  hops with JSON results, and two extra decodes of the video (each stage reads the media by\n"
            "  reference; the direct loop decodes every frame once).\n"
        )
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
