"""Reading frames from an image or video, within the host's limits.

:class:`MediaReader` decodes frames from a stored file or an allowed local path (what
:meth:`forgeflow.plugins.sdk.ToolContext.media` opens), enforcing size, frame-count and resolution
limits, and turns every decoding failure into a :class:`~forgeflow.plugins.errors.MediaError`.
:class:`FrameSeeker` reads frames by index. The store the files live in is :mod:`.media`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from forgeflow.plugins.errors import MediaError, MediaNotFound, MediaTooLarge
from forgeflow.plugins.media import CHUNK_BYTES, MediaKind, sniff

if TYPE_CHECKING:
    from cv2.typing import MatLike

__all__ = ["Frame", "FrameSeeker", "MediaReader"]


@dataclass(frozen=True)
class Frame:
    index: int
    timestamp_s: float
    image: MatLike  # numpy.ndarray, HxWx3 BGR uint8


class MediaReader:
    """Decode the frames of one image or video file with limits.

    An image is a one-frame video at timestamp 0. ``frames(stride, max_frames)`` yields every
    ``stride``-th frame up to ``max_frames`` (the tool's own choice) and the host's cap
    (``FORGEFLOW_MAX_FRAMES``, none by default). Nothing is cut silently: ``frames_read`` counts the
    frames yielded, ``frame_count`` is the media's (exact once read to the end), and ``truncated``
    says the host's cap stopped reading before the end.
    """

    def __init__(self, path: Path, *, max_bytes: int, max_frames: int | None, max_pixels: int) -> None:
        self.path = Path(path)
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        self.frames_read = 0
        self.truncated = False
        if not self.path.is_file():
            raise MediaNotFound(f"media file not found: {self.path}")
        size = self.path.stat().st_size
        if size == 0:
            raise MediaError(f"media file is empty (0 bytes): {self.path.name}")
        if size > max_bytes:
            raise MediaTooLarge(
                f"media file is {size} bytes, over the limit of {max_bytes} (FORGEFLOW_MAX_MEDIA_BYTES)"
            )
        with self.path.open("rb") as fh:
            sniffed = sniff(fh.read(64))
        if sniffed is None:
            raise MediaError(f"unsupported or corrupt media: {self.path.name}")
        if sniffed[0] == "data":
            raise MediaError(f"{self.path.name} is a data file ({sniffed[1]}), not an image or video")
        self.kind: MediaKind = sniffed[0]
        self.media_type = sniffed[1]
        self.fps, self.frame_count, self.width, self.height = self._probe()

    def _probe(self) -> tuple[float, int, int, int]:
        import cv2

        if self.kind == "image":
            image = self._read_image()
            height, width = image.shape[:2]
            self._image = image
            return 0.0, 1, width, height
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                raise MediaError(f"cannot open video (corrupt or truncated?): {self.path.name}")
            width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
            height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        finally:
            cap.release()
        if width <= 0 or height <= 0:
            raise MediaError(f"video has no readable frames: {self.path.name}")
        self._check_resolution(width, height)
        return (fps if fps > 0 else 25.0), count, width, height

    def _check_resolution(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise MediaTooLarge(
                f"frame size {width}x{height} is over the limit of {self.max_pixels} pixels: {self.path.name}"
            )

    def _read_image(self) -> MatLike:
        import cv2
        import numpy as np

        # Check the header first so a huge image is refused before it is read and decoded; and the file
        # itself, which is read whole: no image within max_pixels takes more than 8 bytes a pixel (RGBA,
        # 16 bits a channel, uncompressed), while the media limit is sized for videos (gigabytes).
        header = _image_size(self.path)
        if header is not None:
            self._check_resolution(*header)
        size = self.path.stat().st_size
        if size > self.max_pixels * 8 + CHUNK_BYTES:
            raise MediaTooLarge(
                f"image file is {size} bytes, more than any image of at most {self.max_pixels} pixels "
                f"takes: {self.path.name}"
            )
        data = np.fromfile(str(self.path), dtype=np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is None or image.size == 0:
            raise MediaError(f"cannot decode image (corrupt or truncated?): {self.path.name}")
        self._check_resolution(image.shape[1], image.shape[0])
        return image

    def _limit(self, max_frames: int | None) -> int | None:
        limits = [n for n in (self.max_frames, max_frames) if n]
        return min(limits) if limits else None

    def expected_frames(self, stride: int = 1, max_frames: int | None = None) -> int | None:
        """How many frames :meth:`frames` will yield, from the container's frame count (None when
        the video does not say). For progress reports: the decoder may find a few more or fewer."""
        if self.kind == "image":
            return 1
        if self.frame_count <= 0:
            return None
        whole = -(-self.frame_count // max(stride, 1))
        limit = self._limit(max_frames)
        return whole if limit is None else min(limit, whole)

    def frames(self, stride: int = 1, max_frames: int | None = None, start: int = 0) -> Iterator[Frame]:
        """Every ``stride``-th frame from ``start`` (the frames before it are skipped without being
        decoded, and count as read: a resumed call read them in its earlier attempt)."""
        import cv2

        if stride < 1:
            raise ValueError("stride must be >= 1")
        limit = self._limit(max_frames)
        if self.kind == "image":
            self.frames_read = max(self.frames_read, 1)
            yield Frame(0, 0.0, self._image)
            return
        cap = cv2.VideoCapture(str(self.path))
        try:
            index = 0
            yielded = 0
            while limit is None or yielded < limit:
                ok = cap.grab()
                if not ok:
                    self.frame_count = index  # read to the end: the exact count, whatever the header said
                    break
                if index % stride == 0 and index < start:
                    yielded += 1
                    self.frames_read = max(self.frames_read, yielded)
                elif index % stride == 0:
                    ok, image = cap.retrieve()
                    if not ok or image is None:
                        raise MediaError(f"cannot decode frame {index} of {self.path.name} (corrupt video?)")
                    yielded += 1
                    self.frames_read = max(self.frames_read, yielded)
                    yield Frame(index, round(index / self.fps, 6), image)
                index += 1
            else:
                # stopped by a limit: the host's cap is a cut to report when the media goes on
                if self.max_frames is not None and yielded >= self.max_frames and cap.grab():
                    self.truncated = True
            if index == 0:
                raise MediaError(f"video has no readable frames (corrupt or truncated?): {self.path.name}")
        finally:
            cap.release()


class FrameSeeker:
    """Frames of one video by index, in increasing order, decoding only those asked for (``grab``
    skips the rest): for a stage that follows another stage's frames as they stream in."""

    def __init__(self, reader: MediaReader) -> None:
        import cv2

        self._reader = reader
        self._cap = cv2.VideoCapture(str(reader.path)) if reader.kind == "video" else None
        self._next = 0  # index of the frame the next grab() reads
        self.covered = 0

    def frame(self, index: int) -> Frame | None:
        """Frame ``index`` (None when the media ends before it); indices must not go back."""
        reader = self._reader
        if self._cap is None:  # an image: its one frame
            return Frame(0, 0.0, reader._image) if index == 0 else None
        if index < self._next - 1:
            raise MediaError(f"frame {index} asked for after frame {self._next - 1}: frames must come in order")
        while self._next <= index:
            if not self._cap.grab():
                return None
            self._next += 1
        ok, image = self._cap.retrieve()
        if not ok or image is None:
            raise MediaError(f"cannot decode frame {index} of {reader.path.name} (corrupt video?)")
        return Frame(index, round(index / reader.fps, 6), image)

    def covers(self, count: int = 1) -> None:
        """``count`` more frames of the media were analysed (decoded here or not: a reused result counts)."""
        self.covered += count
        self._reader.frames_read = max(self._reader.frames_read, self.covered)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> FrameSeeker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _image_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a PNG or JPEG header, without decoding the pixels."""
    import struct

    with path.open("rb") as fh:
        head = fh.read(26)
        if head.startswith(b"\x89PNG") and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return width, height
        if head.startswith(b"\xff\xd8"):
            fh.seek(2)
            while True:
                marker = fh.read(2)
                if len(marker) < 2 or marker[0] != 0xFF:
                    return None
                if marker[1] in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                    seg = fh.read(7)
                    if len(seg) < 7:
                        return None
                    height, width = struct.unpack(">HH", seg[3:7])
                    return width, height
                length_bytes = fh.read(2)
                if len(length_bytes) < 2:
                    return None
                fh.seek(struct.unpack(">H", length_bytes)[0] - 2, os.SEEK_CUR)
    return None
