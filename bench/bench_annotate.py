"""What a job's annotated media costs: the job's H.264 path against the same drawing written directly.

    .venv/bin/python bench/bench_annotate.py [--runs 7] [--result out/result.json]

On the 64-frame sample clip (``forgeflow sample-clip``: 640x360, 25 fps) with a result of the soccer
pipeline's shape — ``--result`` takes a real one (``forgeflow run … --out out/`` writes
``out/result.json``), else 6 players per frame with boxes, track ids, 17-keypoint poses and actions —
each run, interleaved so that machine load hits all alike:

* **decode**: read every frame with OpenCV (the floor of any annotation);
* **decode + draw**: the same, drawing each frame (``annotate_frame``), nothing written;
* **mp4v (before)**: decode + draw + OpenCV's ``mp4v`` writer — what ``forgeflow run --out`` wrote before
  the job made the file (browsers cannot play it);
* **H.264 (the job's)**: ``annotate_media`` — decode + draw, piped to imageio-ffmpeg's ``libx264``;
* **image**: ``annotate_media`` on ``bus.jpg`` with one frame of the same result (JPEG).

Prints a markdown table (medians; ratio to decode + draw).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_result(frames: int, width: int, height: int, players: int = 6) -> dict[str, Any]:
    out: dict[str, list[dict[str, Any]]] = {"players": [], "poses": [], "actions": []}
    for index in range(frames):
        boxes = []
        for p in range(players):
            x1 = (p * width / players + index) % (width - 60)
            y1 = height * 0.3
            boxes.append([x1, y1, x1 + 50, y1 + 150])
        out["players"].append(
            {
                "frame_index": index,
                "players": [
                    {"box": b, "confidence": 0.8, "track_id": p + 1, "class_name": "person"}
                    for p, b in enumerate(boxes)
                ],
            }
        )
        out["poses"].append(
            {
                "frame_index": index,
                "poses": [
                    {
                        "player_index": p,
                        "track_id": p + 1,
                        "box": b,
                        "keypoints": [[b[0] + 50 * (k % 2), b[1] + 150 * k / 16, 0.9] for k in range(17)],
                    }
                    for p, b in enumerate(boxes)
                ],
            }
        )
        out["actions"].append(
            {
                "frame_index": index,
                "actions": [{"player_index": p, "action": "running", "confidence": 0.7} for p in range(players)],
            }
        )
    return out


def decode(clip: Path, draw: Callable[[int, Any], None] | None = None, writer: Any = None) -> int:
    import cv2

    cap = cv2.VideoCapture(str(clip))
    index = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if draw is not None:
            draw(index, frame)
        if writer is not None:
            writer.write(frame)
        index += 1
    cap.release()
    return index


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--result", type=Path, help="a result.json of the soccer pipeline (envelope or result)")
    args = parser.parse_args()

    import cv2

    from forgeflow.cli.sample_clip import assets_dir, make_sample_clip
    from forgeflow.jobs.annotate import _Frames, annotate_media
    from forgeflow.jobs.annotated_media import layers_of
    from forgeflow.plugins.builtin import classifier, pose_estimator, yolo_tracker

    # what the soccer pipeline's tools declare to draw (players as boxes, poses, actions as labels)
    tools = [yolo_tracker.plugin.tools["track_players"], pose_estimator.plugin.tools["estimate_poses"]]
    layers = layers_of([*tools, classifier.plugin.tools["classify_actions"]])

    work = Path(tempfile.mkdtemp(prefix="bench-annotate-"))
    clip = make_sample_clip(work / "clip.mp4")
    if args.result:
        data = json.loads(args.result.read_text())
        result = data.get("result") or data.get("partial_result") or data
        source = f"result of {args.result}"
    else:
        result = synthetic_result(64, 640, 360)
        source = "synthetic: 6 players per frame with poses and actions"
    first_frame = {k: [f for f in v if f.get("frame_index") == 0] for k, v in result.items() if isinstance(v, list)}
    bus = assets_dir() / "bus.jpg"

    def old_mp4v() -> None:
        writer = cv2.VideoWriter(str(work / "old.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (640, 360))  # type: ignore[attr-defined]
        decode(clip, _Frames(result, layers).draw, writer)
        writer.release()

    cases: dict[str, Callable[[], object]] = {
        "decode": lambda: decode(clip),
        "decode + draw": lambda: decode(clip, _Frames(result, layers).draw),
        "mp4v (before: OpenCV writer)": old_mp4v,
        "H.264 (the job's: annotate_media)": lambda: annotate_media(clip, result, work / "job.mp4", layers=layers),
        "image, bus.jpg → JPEG": lambda: annotate_media(bus, first_frame, work / "bus.jpg", layers=layers),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm: imports, the ffmpeg binary in the page cache
    for _ in range(args.runs):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1000)
    base = statistics.median(samples["decode + draw"])
    sizes = {"mp4v (before: OpenCV writer)": work / "old.mp4", "H.264 (the job's: annotate_media)": work / "job.mp4"}
    print(f"clip: 64 frames 640x360; result: {source}; {args.runs} interleaved runs")
    print()
    print("| path | median | min | file | vs decode + draw |")
    print("|---|---|---|---|---|")
    for name, values in samples.items():
        size = f"{sizes[name].stat().st_size / 1e6:.2f} MB" if name in sizes else "—"
        ratio = f"{statistics.median(values) / base:.2f}×" if "image" not in name else "—"
        print(f"| {name} | {statistics.median(values):.0f} ms | {min(values):.0f} ms | {size} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
