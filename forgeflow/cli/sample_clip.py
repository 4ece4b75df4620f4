"""A short sample video made offline from the two photos Ultralytics ships (``bus.jpg``, ``zidane.jpg``).

The clip is a slow camera pan over each photo (a moving crop, so the people move across the frame),
one scene after the other: the first half pans over ``bus.jpg`` (4 people), the second over
``zidane.jpg`` (2 people). Everything is computed from the two files with fixed arithmetic, so the
frames are the same on every machine; it needs only OpenCV and NumPy (no torch, no network).

    python examples/make_sample_clip.py examples/sample.mp4
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from forgeflow.plugins.errors import MediaError

if TYPE_CHECKING:
    from cv2.typing import MatLike

__all__ = ["assets_dir", "make_sample_clip", "sample_frames"]

_PAD_BGR = (114, 114, 114)


def assets_dir() -> Path:
    """Ultralytics' bundled sample images, found without importing Ultralytics (or torch)."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.origin:
        raise MediaError(
            "the 'ultralytics' package is not installed: it ships the sample images bus.jpg and zidane.jpg"
        )
    path = Path(spec.origin).parent / "assets"
    for name in ("bus.jpg", "zidane.jpg"):
        if not (path / name).is_file():
            raise MediaError(f"Ultralytics sample image {name} not found in {path}")
    return path


def _pan(
    image: MatLike, start: tuple[float, float, float], end: tuple[float, float, float], n: int, size: tuple[int, int]
) -> Iterator[MatLike]:
    """``n`` frames of a window (x, y, width) moving linearly from ``start`` to ``end``, scaled to ``size``."""
    import cv2
    import numpy as np

    width, height = size
    for k in range(n):
        t = k / max(n - 1, 1)
        t = t * t * (3 - 2 * t)  # smoothstep: the camera eases in and out
        x, y, w = (a + (b - a) * t for a, b in zip(start, end, strict=True))
        scale = width / w
        matrix = np.array([[scale, 0.0, -x * scale], [0.0, scale, -y * scale]], dtype=np.float64)
        yield cv2.warpAffine(
            image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=_PAD_BGR
        )


def sample_frames(frames: int = 64, size: tuple[int, int] = (640, 360)) -> Iterator[MatLike]:
    """The clip's frames (BGR uint8 arrays), first half over bus.jpg, second half over zidane.jpg."""
    import cv2

    if frames < 2:
        raise ValueError("frames must be at least 2")
    root = assets_dir()
    bus = cv2.imread(str(root / "bus.jpg"))
    zidane = cv2.imread(str(root / "zidane.jpg"))
    if bus is None or zidane is None:
        raise MediaError(f"cannot decode the sample images in {root}")
    first = frames // 2
    # bus.jpg is 810x1080 with the people between y~390 and y~910: a 16:9 window 1000 px wide
    # (padded left and right) pans from left to right and slightly down.
    bus_w = 1000.0
    yield from _pan(bus, (-150.0, 350.0, bus_w), (-40.0, 380.0, bus_w), first, size)
    # zidane.jpg is 1280x720 (16:9): the window zooms in a little and pans right.
    yield from _pan(zidane, (0.0, 0.0, 1280.0), (96.0, 30.0, 1150.0), frames - first, size)


def make_sample_clip(
    out_path: Path | str, *, frames: int = 64, size: tuple[int, int] = (640, 360), fps: float = 25.0
) -> Path:
    """Write the sample clip as an MP4 (``mp4v``) and return its path."""
    import cv2

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix or '.mp4'}")
    fourcc = cv2.VideoWriter.fourcc(*"mp4v")
    writer = cv2.VideoWriter(str(tmp), fourcc, float(fps), tuple(size))
    if not writer.isOpened():
        raise MediaError("OpenCV cannot write MP4 (mp4v) video here: is this OpenCV build missing FFmpeg?")
    written = 0
    try:
        for frame in sample_frames(frames, size):
            writer.write(frame)
            written += 1
    finally:
        writer.release()
    if written != frames or not tmp.is_file() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        raise MediaError(f"writing the sample clip failed ({written} of {frames} frames)")
    tmp.replace(out)
    return out
