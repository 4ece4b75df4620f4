"""``pose-estimator`` (alias ``pose``): 17 COCO keypoints per detected player.

``estimate_poses`` reads ``media`` and the ``players`` of the detection stage. On every frame that
has players it runs an Ultralytics pose model (default ``light`` = the bundled ``yolo11n-pose.pt``)
on the whole frame and matches each pose detection to a player by box IoU: pairs are taken greedily
in order of decreasing IoU (ties by player, then pose index), each player and each pose at most
once, and only pairs with IoU >= ``match_iou``. A matched pose carries the player's ``track_id``
and ``player_index``; a player without a matching pose gets no pose entry (the pose model did not
see that person). Frames are exactly the frames listed in ``players`` (``frame_stride`` and
``max_frames`` thin them further), so the stages stay aligned whatever stride detection used.

Batches: concurrent calls of several jobs with one config run as one batch of one warm worker
(the engine's cross-job batching); each call's frame passes go through :func:`model_passes`, so
its poses are byte for byte those it gets alone.

Keypoints are ``[x, y, confidence]`` in pixels of the original frame, COCO-17 order; a keypoint the
model places outside the image or does not see has a low confidence, not a missing entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from forgeflow.plugins.builtin._predictions import (
    PREDICT_CONF_FLOOR,
    Prediction,
    cached_prediction,
    predict_frames,
    prediction_key,
)
from forgeflow.plugins.builtin._ultralytics import load_yolo, resolve_device, setup_ultralytics
from forgeflow.plugins.builtin._vision import (
    VisionConfig,
    iou,
    r2,
    r4,
    report_frames,
    resolve_weights,
    vision_unavailable_reason,
)
from forgeflow.plugins.builtin.schemas import FramePlayers, FramePoses, Player, Pose
from forgeflow.plugins.errors import ConfigError, InputError, MediaError
from forgeflow.plugins.frames import FrameStream
from forgeflow.plugins.media_reader import FrameSeeker, MediaReader
from forgeflow.plugins.sdk import BatchSpec, Plugin, ToolContext

if TYPE_CHECKING:
    from ultralytics.models import YOLO

plugin = Plugin(
    "pose-estimator",
    "1.0.0",
    aliases=["pose"],
    description="17-keypoint COCO human pose per detected player (Ultralytics YOLO pose).",
    preload=["forgeflow.plugins.builtin._preload"],  # torch + Ultralytics, outside the call's memory budget
)


@plugin.availability_check
def _available() -> str | None:
    return vision_unavailable_reason()


class PoseConfig(VisionConfig):
    confidence: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Minimum pose-detection confidence (low by default: poses are kept only where they match a player).",
    )
    match_iou: float = Field(
        0.3, gt=0.0, le=1.0, description="Least box IoU between a pose and the player it belongs to."
    )


class PoseInput(BaseModel):
    media: str = Field(
        min_length=1, description="The image or video the players were detected in (media ref or allowed local path)."
    )
    players: FrameStream[FramePlayers] = Field(description="Per-frame players of the detection stage.")


class PoseOutput(BaseModel):
    poses: FrameStream[FramePoses]


def match_poses(
    player_boxes: list[list[float]], pose_boxes: list[list[float]], min_iou: float
) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching by IoU: ``(player_index, pose_index, iou)`` sorted by player."""
    pairs = []
    for pi, pbox in enumerate(player_boxes):
        for qi, qbox in enumerate(pose_boxes):
            value = iou(pbox, qbox)
            if value >= min_iou:
                pairs.append((-value, pi, qi))
    pairs.sort()
    used_p: set[int] = set()
    used_q: set[int] = set()
    matches = []
    for neg, pi, qi in pairs:
        if pi in used_p or qi in used_q:
            continue
        used_p.add(pi)
        used_q.add(qi)
        matches.append((pi, qi, -neg))
    return sorted(matches)


@plugin.tool(
    input=PoseInput, output=PoseOutput, config=PoseConfig, resumable=True, batch=BatchSpec(), draws={"poses": "poses"}
)
def estimate_poses(inputs: PoseInput, config: PoseConfig, ctx: ToolContext) -> PoseOutput:
    """17 COCO keypoints (x, y, confidence) per detected player, matched to the player and its track id."""
    device = resolve_device(config.device)
    weights = resolve_weights(config.model)
    reader = ctx.media(inputs.media)
    return PoseOutput(poses=_poses(inputs.players, reader, weights, device, config, ctx))


def _wanted(players: Iterable[FramePlayers], config: PoseConfig) -> Iterator[FramePlayers]:
    """The frames of ``players`` this stage analyses (``frame_stride``, ``max_frames``), checked to come in
    increasing frame order: the stream is read once, as it comes."""
    previous = -1
    taken = 0
    for frame in players:
        if frame.frame_index <= previous:
            raise InputError(
                f"players lists frame {frame.frame_index} after frame {previous} (frames must be unique and in order)"
            )
        previous = frame.frame_index
        if frame.frame_index % config.frame_stride:
            continue
        if config.max_frames is not None and taken >= config.max_frames:
            return
        taken += 1
        yield frame


def _poses(
    players: FrameStream[FramePlayers],
    reader: MediaReader,
    weights: Path,
    device: str,
    config: PoseConfig,
    ctx: ToolContext,
) -> Iterator[FramePoses]:
    """Each wanted frame's poses, frame by frame as the players stream in: a frame an earlier stage of this
    job already ran the same model on is not decoded at all (its prediction comes from ``ctx.cache``).
    Each frame's poses depend on that frame alone: a resumed call starts after ``ctx.resume_after``."""
    model: YOLO | None = None
    floor = min(config.confidence, PREDICT_CONF_FLOOR)
    total = players.frames
    done = 0
    with FrameSeeker(reader) as seeker:
        for frame in _wanted(players, config):
            index = frame.frame_index
            if ctx.resume_after is not None and index <= ctx.resume_after:
                done += 1  # in the chunks an earlier attempt of this call wrote
                seeker.covers()
                continue
            if reader.kind == "image" and index != 0:
                raise InputError(f"players refer to frame {index} but the media is a single image")
            timestamp = 0.0 if reader.kind == "image" else round(index / reader.fps, 6)
            poses: list[Pose] = []
            if frame.players:
                if model is None:
                    model = _pose_model(weights, device, config)
                key = prediction_key(
                    ctx,
                    weights=weights,
                    media=reader.path,
                    frame_index=index,
                    device=device,
                    imgsz=config.imgsz,
                    floor=floor,
                    batch=1,
                )
                prediction = cached_prediction(ctx, key) if ctx.cache.enabled else None
                if prediction is not None:
                    prediction = prediction.select(config.confidence, None)
                else:
                    video_frame = seeker.frame(index)
                    if video_frame is None:
                        raise MediaError(
                            f"players refer to frame {index}, which the media does not have (it has "
                            f"{reader.frame_count} frames): was 'players' detected on this media?"
                        )
                    timestamp = video_frame.timestamp_s
                    prediction = predict_frames(
                        model,
                        [video_frame],
                        ctx,
                        weights=weights,
                        media=reader.path,
                        device=device,
                        imgsz=config.imgsz,
                        confidence=config.confidence,
                        classes=None,
                    )[0]
                poses = _match(prediction, frame.players, config)
            seeker.covers()
            done += 1
            yield FramePoses(frame_index=index, timestamp_s=r4(timestamp), poses=poses)
            report_frames(ctx, done, total)
    if done != total:  # the count ran short of (or past) the estimate: the whole, once
        report_frames(ctx, done, total, final=True)


def _pose_model(weights: Path, device: str, config: PoseConfig) -> YOLO:
    setup_ultralytics()
    model = load_yolo(str(weights), device)
    if getattr(model, "task", "pose") != "pose":
        raise ConfigError(f"model {config.model!r} is a {model.task!r} model, not a pose model (no keypoints)")
    return model


def _match(prediction: Prediction, players: list[Player], config: PoseConfig) -> list[Pose]:
    """The prediction's poses matched one-to-one to the frame's players (see :func:`match_poses`)."""
    poses: list[Pose] = []
    if prediction.keypoints is None or not len(prediction.data):
        return poses
    pose_boxes = [[float(v) for v in b[:4]] for b in prediction.data]
    for pi, qi, value in match_poses([p.box for p in players], pose_boxes, config.match_iou):
        keypoints = [[r2(pt[0]), r2(pt[1]), r4(pt[2] if len(pt) > 2 else 1.0)] for pt in prediction.keypoints[qi]]
        if len(keypoints) != 17:
            raise ConfigError(f"model {config.model!r} gives {len(keypoints)} keypoints per person, not the 17 of COCO")
        poses.append(
            Pose(
                track_id=players[pi].track_id,
                player_index=pi,
                box=[r2(v) for v in pose_boxes[qi]],
                confidence=r4(prediction.data[qi][4]),
                match_iou=r4(value),
                keypoints=keypoints,
            )
        )
    return poses
