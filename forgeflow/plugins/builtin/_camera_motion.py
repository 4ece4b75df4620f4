"""The camera's motion, to remove from the players' positions: the cumulative global translation
of a video at each frame of the poses, by phase correlation of consecutive frames (see "Camera
motion" in :mod:`forgeflow.plugins.builtin.classifier`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from forgeflow.plugins.builtin._action_rules import NO_OFFSET, Offset
from forgeflow.plugins.builtin.schemas import FramePoses
from forgeflow.plugins.errors import InputError
from forgeflow.plugins.media_reader import MediaReader
from forgeflow.plugins.sdk import ToolContext

if TYPE_CHECKING:
    from cv2.typing import MatLike

__all__ = ["camera_offsets"]


def camera_offsets(
    ctx: ToolContext, media: str, poses: Iterable[FramePoses], *, width: int = 320
) -> Iterator[tuple[FramePoses, Offset]]:
    """Each frame of ``poses`` (in frame order) with the cumulative global translation of the video
    at that frame (content shift in pixels since the first frame), reading the video once alongside.

    The media is opened at once (so a bad ref fails here); frames are decoded as the result is
    iterated, each once, up to the last frame of ``poses``. Frames past the end of the video, and
    every frame of an image, get no offset.
    """
    reader = ctx.media(media)
    frames = iter(poses)
    if reader.kind != "video":
        return ((f, NO_OFFSET) for f in frames)
    return _paired_offsets(reader, frames, width)


class _PanMeter:
    """The camera's cumulative translation, one video frame after the other: phase correlation of
    consecutive grey, downscaled frames with the people's boxes blanked out."""

    def __init__(self, frame_width: int, width: int = 320) -> None:
        self.factor = min(1.0, width / max(frame_width, 1))
        self.total: Offset = NO_OFFSET
        self._prev: MatLike | None = None
        self._window: MatLike | None = None

    def update(self, image: MatLike, boxes: Sequence[Sequence[float]]) -> Offset:
        import cv2
        import numpy as np

        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
        if boxes:  # blank the people: the background tells the camera's motion
            fill = float(gray.mean())
            for box in boxes:
                x1, y1, x2, y2 = (round(v) for v in box)
                gray[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = fill
        factor = self.factor
        small = cv2.resize(gray, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA) if factor < 1 else gray
        if self._prev is not None:
            if self._window is None:
                self._window = cv2.createHanningWindow((small.shape[1], small.shape[0]), cv2.CV_32F)
            (dx, dy), response = cv2.phaseCorrelate(self._prev, small, self._window)
            if response >= 0.05 and math.isfinite(dx) and math.isfinite(dy):
                self.total = (self.total[0] + dx / factor, self.total[1] + dy / factor)
        self._prev = small
        return self.total


def _paired_offsets(
    reader: MediaReader, frames: Iterator[FramePoses], width: int
) -> Iterator[tuple[FramePoses, Offset]]:
    pending = next(frames, None)
    if pending is None:
        return
    meter = _PanMeter(reader.width, width)
    boxes: list[list[float]] = []  # the latest poses' boxes (a frame without poses keeps them)
    for frame in reader.frames(1):
        same = []  # the poses of this video frame (more than one only if the stream repeats an index)
        while pending is not None and pending.frame_index == frame.index:
            same.append(pending)
            pending = next(frames, None)
        if pending is not None and pending.frame_index < frame.index:
            raise InputError(
                f"classifier: poses must come in frame order; frame {pending.frame_index} came after frame "
                f"{frame.index}",
                field="poses",
            )
        if same:
            boxes = [p.box for p in same[-1].poses]
        total = meter.update(frame.image, boxes)
        for f in same:
            yield f, total
        if pending is None:
            return
    while pending is not None:  # the video ended (or hit the frame limit) first
        yield pending, NO_OFFSET
        pending = next(frames, None)
