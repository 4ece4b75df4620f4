"""Generate the sample clip offline: a camera pan over Ultralytics' bus.jpg, then over zidane.jpg.

    python examples/make_sample_clip.py [OUT.mp4] [--frames N] [--fps FPS]

Default output: examples/sample.mp4 (64 frames, 640x360, 25 fps, MP4/mp4v). Then:

    forgeflow run examples/soccer-analysis.json --input examples/sample.mp4 --out out/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from forgeflow.plugins.builtin.sample_clip import make_sample_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path(__file__).with_name("sample.mp4")))
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--fps", type=float, default=25.0)
    args = parser.parse_args()
    path = make_sample_clip(args.out, frames=args.frames, fps=args.fps)
    print(f"wrote {path} ({path.stat().st_size} bytes, {args.frames} frames at {args.fps:g} fps)")


if __name__ == "__main__":
    main()
