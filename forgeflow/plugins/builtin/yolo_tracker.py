"""``forgesyte-yolo-tracker`` (alias ``videotracker``): players (people) with boxes and track ids.

Tools
-----
``detect_players``
    Runs an Ultralytics YOLO model on every ``frame_stride``-th frame of ``media`` and returns, per
    frame, the person boxes (xyxy), confidence, class and a ByteTrack ``track_id`` (``track: false``
    leaves ids empty). The default model is the bundled ``yolo11n-pose.pt`` (COCO-pose), a real
    person detector; any Ultralytics detection model given by absolute path works too (``classes``
    picks the classes to keep, default ``[0]`` = person).
``track_players``
    The same, with the ByteTrack parameters exposed and a per-track summary (``tracks``).

Both tools take batches (the engine's cross-job batching): concurrent calls of several jobs with
one config run in one warm worker, each with its own tracker, and their model passes meet (results
byte for byte those of each call alone).

Tracking: Ultralytics' ``BYTETracker`` with a fresh tracker per call (ids start at 1 for every
video, so the same input gives the same ids). A detection the tracker has not confirmed yet (a
person that appears mid-video is confirmed on its second frame) has ``track_id: null``. A scene
cut (colour-histogram correlation between consecutive processed frames < ``scene_cut``) retires
every track, so no id jumps from one shot to a person in the next. A still
image has no motion to track: its players are numbered 1, 2, … from left to right.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import TYPE_CHECKING, TypedDict

from pydantic import BaseModel, Field

from forgeflow.plugins.builtin._predictions import predict_frames
from forgeflow.plugins.builtin._ultralytics import load_yolo, resolve_device, setup_ultralytics
from forgeflow.plugins.builtin._vision import (
    VisionConfig,
    batched,
    r2,
    r4,
    report_frames,
    resolve_weights,
    vision_unavailable_reason,
)
from forgeflow.plugins.builtin.schemas import FramePlayers, MediaInput, Player
from forgeflow.plugins.frames import FrameStream
from forgeflow.plugins.sdk import BatchSpec, Plugin, ToolContext

if TYPE_CHECKING:
    from cv2.typing import MatLike
    from ultralytics.trackers.byte_tracker import BYTETracker

plugin = Plugin(
    "forgesyte-yolo-tracker",
    "1.0.0",
    aliases=["videotracker"],
    description="Player (person) detection and ByteTrack tracking with Ultralytics YOLO.",
    preload=["forgeflow.plugins.builtin._preload"],  # torch + Ultralytics, outside the call's memory budget
)


@plugin.availability_check
def _available() -> str | None:
    return vision_unavailable_reason(extra_packages=("lap",))


class DetectConfig(VisionConfig):
    classes: list[int] | None = Field(
        default_factory=lambda: [0],
        description="Detector class ids to keep (default [0] = person); null keeps every class.",
    )
    track: bool = Field(True, description="Assign ByteTrack ids across video frames.")
    scene_cut: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="A colour-histogram correlation between consecutive frames below this is a scene cut: "
        "no track continues across it (0 disables).",
    )


class TrackConfig(VisionConfig):
    classes: list[int] | None = Field(default_factory=lambda: [0], description="Detector class ids to keep.")
    track_buffer: int = Field(30, ge=1, le=10_000, description="Frames a lost track is kept before its id retires.")
    match_thresh: float = Field(0.8, gt=0.0, le=1.0, description="Association threshold (1 - IoU cost).")
    new_track_thresh: float | None = Field(
        None, ge=0.0, le=1.0, description="Least confidence that starts a new track (default: confidence)."
    )
    scene_cut: float = Field(
        0.5, ge=0.0, le=1.0, description="Histogram correlation under which a new scene starts (0 disables)."
    )


class PlayersOutput(BaseModel):
    players: FrameStream[FramePlayers]


class TrackSummary(BaseModel):
    track_id: int
    first_frame: int
    last_frame: int
    frames: int = Field(description="Frames in which the track was seen.")
    mean_confidence: float


class TracksOutput(BaseModel):
    players: FrameStream[FramePlayers]
    tracks: list[TrackSummary]


def _sort_key(p: Player) -> tuple[bool | int | float, ...]:
    return (p.track_id is None, p.track_id or 0, *p.box, -p.confidence)


class TrackerOptions(TypedDict, total=False):
    """ByteTrack's settings a tool may change (:func:`_new_tracker`'s keywords)."""

    track_buffer: int
    match_thresh: float
    new_track_thresh: float | None


def _new_tracker(
    confidence: float, *, track_buffer: int = 30, match_thresh: float = 0.8, new_track_thresh: float | None = None
) -> BYTETracker:
    from ultralytics.trackers.byte_tracker import BYTETracker

    args = SimpleNamespace(
        tracker_type="bytetrack",
        track_high_thresh=confidence,
        track_low_thresh=min(0.1, confidence),
        new_track_thresh=confidence if new_track_thresh is None else new_track_thresh,
        track_buffer=track_buffer,
        match_thresh=match_thresh,
        fuse_score=True,
    )
    return BYTETracker(args)  # type: ignore[no-untyped-call]


def _histogram(image: MatLike) -> MatLike:
    import cv2

    small = cv2.resize(image, (160, 90), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [30, 32], [0, 180, 0, 256])
    return cv2.normalize(hist, hist).flatten()


def _is_scene_cut(previous: MatLike | None, current: MatLike, threshold: float) -> bool:
    import cv2

    if previous is None or threshold <= 0:
        return False
    return float(cv2.compareHist(previous, current, cv2.HISTCMP_CORREL)) < threshold


def detect(
    media: str,
    config: VisionConfig,
    ctx: ToolContext,
    *,
    classes: list[int] | None,
    track: bool,
    tracker_options: TrackerOptions | None = None,
    scene_cut: float = 0.5,
) -> Iterator[FramePlayers]:
    """Detect (and track) players in every selected frame of ``media``, frame by frame (a generator:
    nothing of the video is held but the frames of one inference batch)."""
    device = resolve_device(config.device)  # before anything heavy: a missing GPU fails fast
    weights = resolve_weights(config.model)
    reader = ctx.media(media)
    setup_ultralytics()
    model = load_yolo(str(weights), device)
    names = getattr(model, "names", {}) or {}
    tracker = _new_tracker(config.confidence, **(tracker_options or {})) if track and reader.kind == "video" else None

    done = 0
    expected = reader.expected_frames(config.frame_stride, config.max_frames)
    previous_hist = None
    for chunk in batched(reader.frames(config.frame_stride, config.max_frames), config.batch):
        predictions = predict_frames(
            model,
            chunk,
            ctx,
            weights=weights,
            media=reader.path,
            device=device,
            imgsz=config.imgsz,
            confidence=config.confidence,
            classes=classes,
        )
        for frame, prediction in zip(chunk, predictions, strict=True):
            boxes = prediction.boxes()
            ids: list[int | None] = [None] * len(boxes)
            if tracker is not None:
                hist = _histogram(frame.image)
                if _is_scene_cut(previous_hist, hist, scene_cut):
                    # a new shot: retire every track (ids keep counting up, never reused) and treat
                    # the frame as a first frame, where ByteTrack confirms new tracks at once
                    tracker.tracked_stracks, tracker.lost_stracks, tracker.removed_stracks = [], [], []
                    tracker.frame_id = 0
                previous_hist = hist
                rows = tracker.update(boxes, frame.image)
                for row in rows:
                    ids[int(row[7])] = int(row[4])
            players = [
                Player(
                    box=[r2(v) for v in boxes.xyxy[i]],
                    confidence=r4(float(boxes.conf[i])),
                    class_id=int(boxes.cls[i]),
                    class_name=str(names.get(int(boxes.cls[i]), int(boxes.cls[i]))),
                    track_id=ids[i],
                )
                for i in range(len(boxes))
            ]
            if track and reader.kind == "image":
                players.sort(key=lambda p: (p.box[0], p.box[1], p.box[2], p.box[3], -p.confidence))
                for number, player in enumerate(players, start=1):
                    player.track_id = number
            players.sort(key=_sort_key)
            done += 1
            yield FramePlayers(frame_index=frame.index, timestamp_s=r4(frame.timestamp_s), players=players)
        report_frames(ctx, done, expected)
    report_frames(ctx, done, expected, final=True)


@plugin.tool(input=MediaInput, output=PlayersOutput, config=DetectConfig, batch=BatchSpec(), draws={"players": "boxes"})
def detect_players(inputs: MediaInput, config: DetectConfig, ctx: ToolContext) -> PlayersOutput:
    """Detect players (people) per frame: box xyxy, confidence, class and a ByteTrack track id."""
    return PlayersOutput(
        players=detect(
            inputs.media, config, ctx, classes=config.classes, track=config.track, scene_cut=config.scene_cut
        )
    )


@plugin.tool(input=MediaInput, output=TracksOutput, config=TrackConfig, batch=BatchSpec(), draws={"players": "boxes"})
def track_players(inputs: MediaInput, config: TrackConfig, ctx: ToolContext) -> TracksOutput:
    """Track players across video frames with ByteTrack: per-frame players plus a summary per track id."""
    # the per-track summary needs every frame first: this tool holds its players (detect_players streams)
    frames = list(
        detect(
            inputs.media,
            config,
            ctx,
            classes=config.classes,
            track=True,
            tracker_options={
                "track_buffer": config.track_buffer,
                "match_thresh": config.match_thresh,
                "new_track_thresh": config.new_track_thresh,
            },
            scene_cut=config.scene_cut,
        )
    )
    seen: dict[int, list[tuple[int, float]]] = {}
    for frame in frames:
        for player in frame.players:
            if player.track_id is not None:
                seen.setdefault(player.track_id, []).append((frame.frame_index, player.confidence))
    tracks = [
        TrackSummary(
            track_id=tid,
            first_frame=obs[0][0],
            last_frame=obs[-1][0],
            frames=len(obs),
            mean_confidence=r4(sum(c for _, c in obs) / len(obs)),
        )
        for tid, obs in sorted(seen.items())
    ]
    return TracksOutput(players=frames, tracks=tracks)
