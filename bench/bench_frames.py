"""Per-frame data at match length: the artifact format, and a 3-stage job against the same work done directly.

    .venv/bin/python bench/bench_frames.py formats --frames 1500
    .venv/bin/python bench/bench_frames.py job --frames 1500 15000 135000
    .venv/bin/python bench/bench_frames.py video --frames 1500 [--warm]

``formats`` — why Parquet: 22 players a frame (``FramePlayers``) and their poses (``FramePoses``, 17
keypoints each), written and read back chunk by chunk (256 frames) as canonical JSON, Arrow IPC
(plain and zstd) and Parquet (zstd, ForgeFlow's writer), in one process: bytes a frame, write and
read time a frame.

``job`` — the data plane at length, without a model: a tiny video (64x36) of N frames,
``crowd_players`` (the test plugins' stand-in detector: 22 players a frame, every frame decoded)
→ ``crowd_poses`` (a stand-in skeleton per player) → ``classify_actions`` (the real, streaming
classifier), as ``forgeflow run`` (a fresh process: Prefect, a worker per stage, artifacts between
stages, no engine) against the same three functions called in one loop in a fresh process (the
direct script). Wall time and the peak of RSS summed over each side's whole process tree (sampled
every 50 ms). Needs the test plugins (``bash scripts/test.sh`` installs them).

``video`` — the README's main job on a 720p "crowd" video made offline (six moving copies of
Ultralytics' two sample photos, ~10 people a frame): ``forgeflow run examples/soccer-analysis.json``
from a fresh home (no engine: a new user's run, cold) against the 20-line one-pass Ultralytics script
(``YOLO(pose).track(video, stream=True, persist=True)`` and a per-player rule), whole processes, the
same weights, image size and thresholds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

DIRECT = """
import sys, time
from forgeflow.plugins import MediaStore, ToolContext
from forgeflow.plugins.builtin.classifier import ClassifierConfig, action_stream
from forgeflow_testplugins.testkit import crowd_frame, crowd_pose
video = sys.argv[1]
ctx = ToolContext(media_store=MediaStore(sys.argv[2]), input_roots=[sys.argv[3]])
reader = ctx.media(video)
players = (crowd_frame(f.index, f.timestamp_s, 22, reader.width, reader.height) for f in reader.frames())
poses = (crowd_pose(frame) for frame in players)
frames = actions = 0
for frame in action_stream(poses, ClassifierConfig(), ctx, video):
    frames += 1
    actions += len(frame.actions)
print(frames, actions)
"""


SCRIPT = """
import os, sys
os.environ.update(YOLO_OFFLINE="1", YOLO_VERBOSE="False", YOLO_AUTOINSTALL="False")
from forgeflow.plugins.builtin._vision import bundled_pose_weights, setup_ultralytics
setup_ultralytics()
from ultralytics import YOLO
model = YOLO(str(bundled_pose_weights()))
frames = players = standing = 0
for result in model.track(sys.argv[1], stream=True, persist=True, imgsz=640, conf=0.25, classes=[0], verbose=False):
    frames += 1
    for box in result.boxes.xyxy.tolist():
        players += 1
        standing += (box[3] - box[1]) >= 1.5 * (box[2] - box[0])  # the per-player rule
print(frames, players, standing)
"""


def crowd_video(path: Path, frames: int) -> Path:
    """A 1280x720 video of six tiles, each a slow pan over bus.jpg or zidane.jpg (the sample clip's)."""
    import cv2
    import numpy as np

    from forgeflow.cli.sample_clip import sample_frames

    tiles = [sample_frames(frames + 6 * k, (426, 360)) for k in range(6)]
    for k, tile in enumerate(tiles):  # each tile starts elsewhere in its pan
        for _ in range(6 * k):
            next(tile)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (1280, 720))
    for _ in range(frames):
        canvas = np.full((720, 1280, 3), 114, dtype=np.uint8)
        for k, tile in enumerate(tiles):
            row, col = divmod(k, 3)
            canvas[row * 360 : row * 360 + 360, col * 426 : col * 426 + 426] = next(tile)
        writer.write(canvas)
    writer.release()
    return path


def video(frames: int, warm: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        base = Path(tmp)
        clip = crowd_video(base / "crowd.mp4", frames)
        env = {**os.environ, "FORGEFLOW_HOME": str(base / "home"), "FORGEFLOW_MEDIA_INPUT_ROOTS": str(base)}
        pipeline = str(ROOT / "examples" / "soccer-analysis.json")
        cli = [PYTHON, "-m", "forgeflow.cli.main"]
        if warm:  # the engine started and its models loaded (a 16-frame job) before the measured run
            subprocess.run([*cli, "engine", "start"], env=env, check=True, capture_output=True, timeout=300)
            warmup = crowd_video(base / "warmup.mp4", 16)
            subprocess.run([*cli, "run", pipeline, "--input", str(warmup)], env=env, capture_output=True, timeout=600)
        cmd = [*cli, "run", pipeline, "--input", str(clip), "--out", str(base / "out")]
        try:
            ff_wall, ff_rss, ff_out = timed(cmd, env)
        finally:  # cold, `forgeflow run` started the engine in the background: stop it too
            subprocess.run([*cli, "engine", "stop"], env=env, capture_output=True, timeout=120)
        envelope = json.loads((base / "out" / "result.json").read_text())
        assert envelope["ok"], ff_out[-3000:]
        d_wall, d_rss, d_out = timed([PYTHON, "-c", SCRIPT, str(clip)], env)
        d_frames, d_players, _ = (int(v) for v in d_out.split()[-3:])
        players = envelope["result"]["players"]
        stages = {s["tool"]: round((s["duration_ms"] or 0) / 1000, 1) for s in envelope["stages"]}
        outside, after = _outside_stages(base / "out" / "events.jsonl")
        print(
            json.dumps(
                {
                    "frames": frames,
                    "engine": "warm" if warm else "cold (none running)",
                    "forgeflow_s": round(ff_wall, 1),
                    "script_s": round(d_wall, 1),
                    "ratio": round(ff_wall / d_wall, 2),
                    "forgeflow_peak_mib": round(ff_rss / 2**20),
                    "script_peak_mib": round(d_rss / 2**20),
                    "stage_s": stages,
                    "players_forgeflow": (players.get("counts") or {}).get("players")
                    if isinstance(players, dict)
                    else None,
                    "players_script": d_players,
                    "script_frames": d_frames,
                    "result_json_kib": round((base / "out" / "result.json").stat().st_size / 1024, 1),
                    "outside_stages_s": round(outside, 1),
                    "after_last_stage_s": round(after, 1),
                }
            )
        )


def _outside_stages(events_file: Path) -> tuple[float, float]:
    """From a job's messages: the time of the job (first message to the terminal one) in no stage
    (stages that overlap count once), and the time after the last stage ended (annotation, storing)."""
    from datetime import datetime

    def at(event: dict[str, Any]) -> float:
        return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()

    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    starts = {e["stage_index"]: at(e) for e in events if e["type"] == "pipeline_stage_start"}
    ends = {e["stage_index"]: at(e) for e in events if e["type"] == "pipeline_stage_end"}
    spans = sorted((starts[i], ends[i]) for i in starts if i in ends)
    covered, reach = 0.0, float("-inf")
    for start, end in spans:
        covered += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    first, last = at(events[0]), at(events[-1])
    return (last - first) - covered, last - reach


class PeakTreeRSS:
    """Peak of RSS summed over a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        import psutil

        self._root = psutil.Process(pid)
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for proc in [self._root, *self._root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            time.sleep(self._interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = PeakTreeRSS(proc.pid)
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    rss = peak.stop()
    if proc.returncode not in (0,):
        raise SystemExit(f"{cmd[:3]} exited {proc.returncode}:\n{out[-3000:]}")
    return wall, rss, out


def make_video(path: Path, frames: int) -> Path:
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (64, 36))
    for index in range(frames):
        writer.write(np.full((36, 64, 3), index % 251, dtype=np.uint8))
    writer.release()
    return path


def job(frame_counts: list[int]) -> None:
    pipeline = {
        "pipeline": [
            {"plugin": "testkit", "tool": "crowd_players", "config": {"people": 22}},
            {"plugin": "testkit", "tool": "crowd_poses"},
            {"plugin": "classifier", "tool": "classify_actions"},
        ]
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as tmp:
        base = Path(tmp)
        (base / "pipeline.json").write_text(json.dumps(pipeline))
        for frames in frame_counts:
            video = make_video(base / f"v{frames}.mp4", frames)
            home = base / f"home{frames}"
            env = {
                **os.environ,
                "FORGEFLOW_HOME": str(home),
                "FORGEFLOW_MEDIA_INPUT_ROOTS": str(base),
                "FORGEFLOW_ANNOTATE_MEDIA": "false",
                "FORGEFLOW_USE_ENGINE": "false",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            }
            out_dir = base / f"out{frames}"
            cmd = [PYTHON, "-m", "forgeflow.cli.main", "run", str(base / "pipeline.json")]
            cmd += ["--input", str(video), "--out", str(out_dir)]
            ff_wall, ff_rss, ff_out = timed(cmd, env)
            envelope = json.loads((out_dir / "result.json").read_text())
            assert envelope["ok"], ff_out[-2000:]
            actions = envelope["result"]["actions"]
            direct = [PYTHON, "-c", DIRECT, str(video), str(home / "media"), str(base)]
            d_wall, d_rss, d_out = timed(direct, env)
            d_frames, d_actions = (int(v) for v in d_out.split()[-2:])
            assert d_frames == actions["frames"] == frames, (d_frames, actions["frames"], frames)
            rows.append(
                {
                    "frames": frames,
                    "forgeflow_s": round(ff_wall, 1),
                    "direct_s": round(d_wall, 1),
                    "ratio": round(ff_wall / d_wall, 2),
                    "forgeflow_peak_mib": round(ff_rss / 2**20),
                    "direct_peak_mib": round(d_rss / 2**20),
                    "actions": actions["counts"].get("actions"),
                    "direct_actions": d_actions,
                    "artifact_mib": round(actions["size_bytes"] / 2**20, 1),
                    "result_json_kib": round((out_dir / "result.json").stat().st_size / 1024, 1),
                    "truncated": envelope.get("truncated"),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| frames | forgeflow run | direct | ratio | peak RSS forgeflow | peak RSS direct | actions | artifact | result.json |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['frames']:,} | {r['forgeflow_s']} s | {r['direct_s']} s | {r['ratio']}× | "
            f"{r['forgeflow_peak_mib']} MiB | {r['direct_peak_mib']} MiB | {r['actions']:,} / {r['direct_actions']:,} | "
            f"{r['artifact_mib']} MiB | {r['result_json_kib']} KiB |"
        )


def formats(frames: int) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from forgeflow.plugins.builtin.schemas import FramePlayers, FramePoses
    from forgeflow.plugins.frames import record_schema
    from forgeflow_testplugins.testkit import crowd_frame, crowd_pose

    players = [crowd_frame(i, i / 25, 22).model_dump(mode="json") for i in range(frames)]
    poses = [crowd_pose(FramePlayers.model_validate(p)).model_dump(mode="json") for p in players]

    def ipc_bytes(table: Any, compression: str | None) -> bytes:
        sink = io.BytesIO()
        options = ipc.IpcWriteOptions(compression=compression)
        with ipc.new_file(sink, table.schema, options=options) as writer:
            writer.write_table(table)
        return sink.getvalue()

    def ipc_read(data: bytes) -> Any:
        return ipc.open_file(pa.BufferReader(data)).read_all()

    print(f"\n{frames} frames x 22 players, chunks of 256 frames; per frame:\n")
    print("| records | format | bytes/frame | write µs/frame | read µs/frame | vs JSON size |")
    print("|---|---|---:|---:|---:|---:|")
    for name, records, model in (("players", players, FramePlayers), ("poses", poses, FramePoses)):
        schema = record_schema(model)
        chunks = [records[i : i + 256] for i in range(0, len(records), 256)]
        codecs = _codecs(schema, ipc_bytes, ipc_read)
        json_size = None
        for label, (write, read) in codecs.items():
            start = time.perf_counter()
            blobs = [write(c) for c in chunks]
            wrote = time.perf_counter() - start
            start = time.perf_counter()
            for blob in blobs:
                table = read(blob)
                if not isinstance(table, list):
                    table.to_pylist()
            readt = time.perf_counter() - start
            size = sum(len(b) for b in blobs)
            json_size = json_size or size
            print(
                f"| {name} | {label} | {size / frames:,.0f} | {wrote / frames * 1e6:,.0f} | "
                f"{readt / frames * 1e6:,.0f} | {size / json_size:.2f}× |"
            )


def _codecs(schema: Any, ipc_bytes: Any, ipc_read: Any) -> dict[str, tuple[Any, Any]]:
    """(write a chunk of records, read it back) per format, for records of ``schema``."""
    import pyarrow as pa

    from forgeflow.canonical import canonical_bytes
    from forgeflow.plugins.frame_chunks import parquet_bytes as _parquet_bytes
    from forgeflow.plugins.frame_chunks import read_parquet as _read_parquet

    def table(chunk: list[dict[str, Any]]) -> Any:
        return pa.Table.from_pylist(chunk, schema=schema)

    return {
        "JSON (canonical)": (canonical_bytes, json.loads),
        "Arrow IPC": (lambda c: ipc_bytes(table(c), None), ipc_read),
        "Arrow IPC zstd": (lambda c: ipc_bytes(table(c), "zstd"), ipc_read),
        "Parquet zstd (ForgeFlow)": (lambda c: _parquet_bytes(table(c)), lambda b: _read_parquet(pa.BufferReader(b))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    f = sub.add_parser("formats")
    f.add_argument("--frames", type=int, default=1500)
    j = sub.add_parser("job")
    j.add_argument("--frames", type=int, nargs="+", default=[1500, 15000])
    v = sub.add_parser("video")
    v.add_argument("--frames", type=int, default=1500)
    v.add_argument("--warm", action="store_true", help="Start the engine and warm its models first.")
    args = parser.parse_args()
    if args.what == "formats":
        formats(args.frames)
    elif args.what == "video":
        video(args.frames, args.warm)
    else:
        job(args.frames)


if __name__ == "__main__":
    main()
