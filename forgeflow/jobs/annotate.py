"""A result drawn onto its image or video: the drawing and the encoding of a job's annotated media.

``annotate_media(source, result, out, layers=...)`` draws, per frame, the result fields ``layers``
names for each :data:`~forgeflow.plugins.sdk.DrawKind` (what the pipeline's tools declare in
``draws``): ``boxes`` with their track id and confidence, ``poses`` as COCO-17 skeletons (limbs
between keypoints with confidence >= 0.3) and ``labels`` under the box they name. ``result`` is the
pipeline's final or partial result. An image is written as JPEG or PNG (OpenCV); a video as H.264 MP4 (``libx264``,
``yuv420p``, ``+faststart``: what browsers play) by piping raw frames into the ffmpeg binary of the
``imageio-ffmpeg`` package, keeping the source's fps and size (an odd width or height is padded by
one pixel: H.264 in ``yuv420p`` needs even ones). Frames the pipeline skipped (``frame_stride`` > 1)
show the annotations of the last processed frame. Colours are fixed per track id, so the drawing is
reproducible.

Which fields are drawn, and storing the file as the job's, is :mod:`forgeflow.jobs.annotated_media`'s.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import JsonValue

from forgeflow.plugins.errors import MediaError, MediaNotFound
from forgeflow.plugins.frames import is_frames, is_live, iter_frame_records
from forgeflow.plugins.media import MediaKind, MediaStore, sniff
from forgeflow.plugins.sdk import DRAW_KINDS, DrawKind

if TYPE_CHECKING:
    import cv2
    from cv2.typing import MatLike

__all__ = [
    "SKELETON",
    "AnnotatedFile",
    "Layers",
    "annotate_frame",
    "annotate_media",
    "ffmpeg_exe",
    "has_drawable",
]

#: Which result field holds each kind of drawing (``{"boxes": "players", ...}``): what the tools of a
#: pipeline declare in ``draws``. A kind no field holds is not drawn.
Layers = Mapping[DrawKind, str]
#: How much of ffmpeg's stderr an error message quotes (its tail).
FFMPEG_STDERR_TAIL = 2000
#: Longest an ffmpeg may take to finish its file once every frame was sent to it.
FFMPEG_FINISH_TIMEOUT_S = 600.0
#: ffmpeg's options for the annotated video: H.264 that browsers play (yuv420p, the index up front),
#: even width and height (padded by one pixel where odd), no audio.
H264_OPTIONS = (
    "-an",
    "-vf",
    "pad=ceil(iw/2)*2:ceil(ih/2)*2",
    "-c:v",
    "libx264",
    "-preset",
    "veryfast",
    "-crf",
    "23",
    "-pix_fmt",
    "yuv420p",
    "-movflags",
    "+faststart",
    "-f",
    "mp4",
)

#: COCO-17 limbs (pairs of keypoint indices).
SKELETON: tuple[tuple[int, int], ...] = (
    (5, 7),
    (7, 9),
    (6, 8),
    (8, 10),  # arms
    (5, 6),
    (5, 11),
    (6, 12),
    (11, 12),  # torso
    (11, 13),
    (13, 15),
    (12, 14),
    (14, 16),  # legs
    (0, 1),
    (0, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),  # head
)

_PALETTE = (
    (56, 56, 255),
    (151, 157, 255),
    (31, 112, 255),
    (29, 178, 255),
    (49, 210, 207),
    (10, 249, 72),
    (23, 204, 146),
    (134, 219, 61),
    (52, 147, 26),
    (187, 212, 0),
    (168, 153, 44),
    (255, 194, 0),
    (147, 69, 52),
    (255, 115, 100),
    (236, 24, 0),
    (255, 56, 132),
    (133, 0, 82),
    (255, 56, 203),
)
_UNTRACKED = (160, 160, 160)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _color(track_id: int | None) -> tuple[int, int, int]:
    return _UNTRACKED if track_id is None else _PALETTE[track_id % len(_PALETTE)]


class _Cursor:
    """One per-frame output (an inline list or a frames artifact), read forward a record at a time."""

    def __init__(self, value: Any, key: str, store: MediaStore | None) -> None:
        self.key = key
        if is_frames(value):
            if store is None:
                raise MediaError(f"{key} is a frames artifact, but no media store was given to read it")
            self._records: Iterator[dict[str, Any]] = iter_frame_records(value, store)
            self.last: int | None = value.get("last_frame")
        else:
            frames = value if isinstance(value, list) else []
            self._records = iter(frames)
            self.last = int(frames[-1]["frame_index"]) if frames else None
        self._next = next(self._records, None)

    def peek(self) -> int | None:
        return None if self._next is None else int(self._next["frame_index"])

    def take(self, index: int) -> list[dict[str, Any]] | None:
        """The items of frame ``index`` (None when the output has no record for it); records before it are passed."""
        while self._next is not None and int(self._next["frame_index"]) < index:
            self._next = next(self._records, None)
        if self._next is None or int(self._next["frame_index"]) != index:
            return None
        items = list(self._next.get(self.key) or [])
        self._next = next(self._records, None)
        return items


def _label(image: MatLike, text: str, x: int, y: int, color: tuple[int, int, int], scale: float) -> None:
    import cv2

    thickness = max(1, round(scale * 2))
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    y = max(y, h + base + 2)
    cv2.rectangle(image, (x, y - h - base - 2), (x + w + 4, y), color, -1)
    luminance = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    cv2.putText(image, text, (x + 2, y - base - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, thickness, cv2.LINE_AA)


def annotate_frame(
    image: MatLike,
    players: list[dict[str, Any]],
    poses: list[dict[str, Any]],
    actions: list[dict[str, Any]],
    *,
    min_keypoint_confidence: float = 0.3,
) -> MatLike:
    """Draw one frame's ``boxes`` (``players``), ``poses`` and ``labels`` (``actions``) items onto
    ``image`` (BGR, modified in place); the items' shapes are :data:`~forgeflow.plugins.sdk.DrawKind`'s."""
    import cv2

    height, width = image.shape[:2]
    scale = max(0.5, min(width, height) / 600.0)
    line = max(1, round(scale * 2))
    action_by_player = {int(a["player_index"]): a for a in actions if "player_index" in a}
    for pose in poses:
        color = _color(pose.get("track_id"))
        kps = pose.get("keypoints") or []
        for a, b in SKELETON:
            if (
                a < len(kps)
                and b < len(kps)
                and kps[a][2] >= min_keypoint_confidence
                and kps[b][2] >= min_keypoint_confidence
            ):
                p1 = (round(kps[a][0]), round(kps[a][1]))
                p2 = (round(kps[b][0]), round(kps[b][1]))
                cv2.line(image, p1, p2, color, line, cv2.LINE_AA)
        for x, y, c in kps:
            if c >= min_keypoint_confidence:
                cv2.circle(image, (round(x), round(y)), line + 1, (255, 255, 255), -1, cv2.LINE_AA)
    for index, player in enumerate(players):
        box = [round(v) for v in player["box"]]
        track_id = player.get("track_id")
        color = _color(track_id)
        cv2.rectangle(image, (box[0], box[1]), (box[2], box[3]), color, line)
        name = f"#{track_id}" if track_id is not None else player.get("class_name", "person")
        _label(image, f"{name} {player.get('confidence', 0):.2f}", box[0], box[1], color, scale * 0.7)
        action = action_by_player.get(index)
        if action is not None:
            text = action["action"] + (f" {action['confidence']:.2f}" if "confidence" in action else "")
            _label(image, text, box[0], min(box[3], height - 1), color, scale * 0.7)
    # actions of players the result does not list (a result with actions only): label at the pose box
    if not players:
        for pose in poses:
            action = action_by_player.get(int(pose.get("player_index", -1)))
            if action is not None:
                box = [round(v) for v in pose["box"]]
                _label(image, action["action"], box[0], box[1], _color(pose.get("track_id")), scale * 0.7)
    return image


def has_drawable(result: Mapping[str, JsonValue] | None, layers: Layers) -> bool:
    """Whether ``result`` holds something :func:`annotate_media` draws: a non-empty list, or a frames
    artifact, in a field of ``layers``."""
    if not result:
        return False
    values = [result.get(key) for key in layers.values()]
    return any(
        (isinstance(value, list) and len(value) > 0)
        or (isinstance(value, dict) and is_frames(value) and value["frames"])
        or is_live(value)  # outputs still being written: drawn as they come
        for value in values
    )


@dataclass(frozen=True)
class AnnotatedFile:
    """What :func:`annotate_media` wrote."""

    path: Path
    kind: MediaKind
    #: Frames written (a video), None for an image.
    frames: int | None


def annotate_media(
    source_path: Path | str,
    result: Mapping[str, JsonValue],
    out_path: Path | str,
    store: MediaStore | None = None,
    *,
    layers: Layers,
) -> AnnotatedFile:
    """Write ``source_path`` with the fields of ``result`` that ``layers`` names drawn on it (per-frame
    outputs inline, or frames artifacts read from ``store`` a chunk at a time alongside the video:
    memory stays flat).

    An image is written in the format of ``out_path``'s suffix (``.jpg`` when it has none of an
    image's); a video as H.264 MP4 (``.mp4``) with the source's fps and size (made even). The file
    appears whole or not at all (written under a temporary name, then renamed). A source that
    cannot be read, a video without frames and an encoder failure (with ffmpeg's stderr tail) are
    :class:`MediaError`.
    """
    source = Path(source_path)
    out = Path(out_path)
    if not source.is_file():
        raise MediaNotFound(f"media file not found: {source}")
    with source.open("rb") as fh:
        kind = sniff(fh.read(64))
    if kind is None:
        raise MediaError(f"unsupported or corrupt media: {source.name}")
    frames = _Frames(result, layers, store)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind[0] == "image":
        if out.suffix.lower() not in _IMAGE_SUFFIXES:
            out = out.with_suffix(".jpg")
        _annotate_image(source, frames, out)
        return AnnotatedFile(out, "image", None)
    if out.suffix.lower() != ".mp4":
        out = out.with_suffix(".mp4")
    return AnnotatedFile(out, "video", _annotate_video(source, frames, out))


class _Frames:
    """A result's drawn fields (boxes, poses, labels), read forward frame by frame as the video is drawn
    (frames in increasing order): which of them a frame shows."""

    def __init__(self, result: Mapping[str, JsonValue], layers: Layers, store: MediaStore | None = None) -> None:
        # one cursor per kind, in DRAW_KINDS order: a kind no field holds reads as an empty output
        fields = [layers.get(kind) for kind in DRAW_KINDS]
        self.cursors = [
            _Cursor(result.get(key) if key else None, key or kind, store)
            for key, kind in zip(fields, DRAW_KINDS, strict=True)
        ]
        lasts = [c.last for c in self.cursors if c.last is not None]
        self.last_annotated = max(lasts) if lasts else -1
        firsts = sorted({i for c in self.cursors if (i := c.peek()) is not None})
        self.first = firsts[0] if firsts else None
        self.stride: int | None = None  # frames between the first two annotated ones (None: seen one yet)
        self.current: list[list[dict[str, Any]]] | None = None

    def covers(self, index: int) -> bool:
        """Whether frame ``index`` belongs in the annotated video (every frame when nothing is drawn).
        A frame between two analysed ones shows the earlier one's drawing; the video ends with the
        stride of the last analysed frame (what was analysed: a stage that read 4 frames of 64 gives
        a 4-frame video, one that read every 2nd frame of 64 a 64-frame one)."""
        return self.last_annotated < 0 or index <= self.last_annotated + (self.stride or 1) - 1

    def draw(self, index: int, image: MatLike) -> None:
        found = [c.take(index) for c in self.cursors]
        if any(items is not None for items in found):
            self.current = [items or [] for items in found]
            if self.stride is None and index != self.first:
                self.stride = index - (self.first or 0)
        if self.current is not None and self.covers(index):
            annotate_frame(image, *self.current)


def _annotate_image(source: Path, frames: _Frames, out: Path) -> None:
    import cv2
    import numpy as np

    image = cv2.imdecode(np.fromfile(str(source), dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise MediaError(f"cannot decode image: {source.name}")
    frames.draw(0, image)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    try:
        if not cv2.imwrite(str(tmp), image):
            raise MediaError(f"cannot write annotated image {out}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def ffmpeg_exe() -> str:
    """The ffmpeg binary of the ``imageio-ffmpeg`` package (it ships one built with libx264)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise MediaError(
            "writing the annotated video needs the 'imageio-ffmpeg' package (pip install 'forgeflow[vision]')"
        ) from None
    try:
        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except RuntimeError as exc:
        raise MediaError(f"no ffmpeg binary for the annotated video: {exc}") from None


def _annotate_video(source: Path, frames: _Frames, out: Path) -> int:
    """Draw every frame of ``source`` and pipe it to ffmpeg (H.264); returns the frames written."""
    import cv2

    cap = cv2.VideoCapture(str(source))
    tmp = out.with_name(f".{out.stem}.partial.mp4")
    try:
        if not cap.isOpened():
            raise MediaError(f"cannot open video (corrupt or truncated?): {source.name}")
        ok, frame = cap.read()
        if not ok or frame is None:
            raise MediaError(f"video has no readable frames: {source.name}")
        with tempfile.TemporaryFile() as stderr:
            height, width = frame.shape[:2]
            command = [
                ffmpeg_exe(),
                "-hide_banner",
                "-loglevel",
                "error",
                "-nostdin",
                "-y",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "bgr24",
                "-s",
                f"{width}x{height}",
                "-r",
                _fps(cap.get(cv2.CAP_PROP_FPS)),
                "-i",
                "-",
                *H264_OPTIONS,
                str(tmp),
            ]
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                written = _pipe_frames(cap, frame, frames, proc, source.name)
                try:
                    code = proc.wait(timeout=FFMPEG_FINISH_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    raise MediaError(
                        f"ffmpeg did not finish the annotated video within {FFMPEG_FINISH_TIMEOUT_S:.0f} s"
                    ) from None
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if code != 0:
                raise MediaError(f"ffmpeg failed writing the annotated video (exit {code}): {_tail(stderr)}")
            if written == 0 or not tmp.is_file() or tmp.stat().st_size == 0:
                raise MediaError(f"ffmpeg wrote no annotated video: {_tail(stderr)}")
        tmp.replace(out)
        return written
    finally:
        cap.release()
        tmp.unlink(missing_ok=True)


def _pipe_frames(
    cap: cv2.VideoCapture, frame: MatLike, frames: _Frames, proc: subprocess.Popen[bytes], name: str
) -> int:
    """Draw ``frame`` and every later one of ``cap`` that the result covers and write them to ffmpeg's
    stdin, which is closed after the last one (or when ffmpeg stops reading); returns the frames written."""
    assert proc.stdin is not None
    height, width = frame.shape[:2]
    index = 0
    try:
        while frame is not None and frames.covers(index):
            if frame.shape[:2] != (height, width):
                raise MediaError(f"frame {index} of {name} is {frame.shape[1]}x{frame.shape[0]}, not {width}x{height}")
            frames.draw(index, frame)
            try:
                proc.stdin.write(frame.data if frame.flags.c_contiguous else frame.copy().data)
            except OSError:  # ffmpeg stopped (a broken pipe): its exit status and stderr say why
                break
            index += 1
            ok, frame = cap.read()
            if not ok:
                break
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
    return index


def _fps(value: float) -> str:
    """A video's frame rate as ffmpeg takes it (``30000/1001``); 25 when the container says nothing sane."""
    fps = float(value or 0.0)
    if not 0.1 <= fps <= 1000:
        fps = 25.0
    rate = Fraction(fps).limit_denominator(1001)
    return f"{rate.numerator}/{rate.denominator}"


def _tail(stream: IO[bytes] | None) -> str:
    if stream is None:
        return ""
    stream.seek(0)
    text = stream.read().decode("utf-8", "replace").strip()
    text = text[-FFMPEG_STDERR_TAIL:]
    return text or "(ffmpeg printed nothing)"
