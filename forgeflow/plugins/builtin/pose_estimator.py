"""``pose-estimator`` (alias ``pose``): 17 COCO keypoints per detected player.

``estimate_poses`` reads ``media`` and the ``players`` of the detection stage. On every frame that
has players it runs an Ultralytics pose model (default ``light`` = the bundled ``yolo11n-pose.pt``)
on the whole frame and matches each pose detection to a player by box IoU: pairs are taken greedily
in order of decreasing IoU (ties by player, then pose index), each player and each pose at most
once, and only pairs with IoU >= ``match_iou``. A matched pose carries the player's ``track_id``
and ``player_index``; a player without a matching pose gets no pose entry (the pose model did not
see that person). Frames are exactly the frames listed in ``players`` (``frame_stride`` and
``max_frames`` thin them further), so the stages stay aligned whatever stride detection used.

Keypoints are ``[x, y, confidence]`` in pixels of the original frame, COCO-17 order; a keypoint the
model places outside the image or does not see has a low confidence, not a missing entry.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field

from forgeflow.plugins.builtin._vision import (
    PREDICT_CONF_FLOOR,
    Prediction,
    VisionConfig,
    cached_prediction,
    iou,
    load_yolo,
    predict_frames,
    prediction_key,
    r2,
    r4,
    report_frames,
    resolve_device,
    resolve_weights,
    setup_ultralytics,
    vision_unavailable_reason,
)
from forgeflow.plugins.builtin.schemas import FramePlayers, FramePoses, Pose
from forgeflow.plugins.errors import ConfigError, InputError, MediaError
from forgeflow.plugins.sdk import Plugin, ToolContext

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
    players: list[FramePlayers] = Field(description="Per-frame players of the detection stage.")


class PoseOutput(BaseModel):
    poses: list[FramePoses]


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


@plugin.tool(input=PoseInput, output=PoseOutput, config=PoseConfig)
def estimate_poses(inputs: PoseInput, config: PoseConfig, ctx: ToolContext) -> PoseOutput:
    """17 COCO keypoints (x, y, confidence) per detected player, matched to the player and its track id."""
    device = resolve_device(config.device)
    weights = resolve_weights(config.model)
    reader = ctx.media(inputs.media)

    by_index: dict[int, FramePlayers] = {}
    for frame in inputs.players:
        if frame.frame_index in by_index:
            raise InputError(f"players lists frame {frame.frame_index} twice")
        by_index[frame.frame_index] = frame
    wanted = sorted(i for i in by_index if i % config.frame_stride == 0)
    if config.max_frames is not None:
        wanted = wanted[: config.max_frames]
    if not wanted:
        return PoseOutput(poses=[])
    if reader.kind == "image" and wanted != [0]:
        raise InputError(f"players refer to frames {wanted[:5]}… but the media is a single image")

    needs_model = any(by_index[i].players for i in wanted)
    model = None
    if needs_model:
        setup_ultralytics()
        model = load_yolo(str(weights), device)
        if getattr(model, "task", "pose") != "pose":
            raise ConfigError(f"model {config.model!r} is a {model.task!r} model, not a pose model (no keypoints)")

    def poses_of(prediction: Prediction, players: list[Any]) -> list[Pose]:
        poses: list[Pose] = []
        if prediction.keypoints is None or not len(prediction.data):
            return poses
        pose_boxes = [[float(v) for v in b[:4]] for b in prediction.data]
        for pi, qi, value in match_poses([p.box for p in players], pose_boxes, config.match_iou):
            keypoints = [[r2(pt[0]), r2(pt[1]), r4(pt[2] if len(pt) > 2 else 1.0)] for pt in prediction.keypoints[qi]]
            if len(keypoints) != 17:
                raise ConfigError(
                    f"model {config.model!r} gives {len(keypoints)} keypoints per person, not the 17 of COCO"
                )
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

    # Frames an earlier stage of this job already ran the same model on need no decoding at all.
    reused: dict[int, Prediction] = {}
    if model is not None and ctx.cache.enabled:
        floor = min(config.confidence, PREDICT_CONF_FLOOR)
        for index in wanted:
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
            found = cached_prediction(ctx, key)
            if found is None:
                break
            reused[index] = found.select(config.confidence, None)
    out: dict[int, FramePoses] = {}
    if len(reused) == len(wanted):
        for index in wanted:
            timestamp = 0.0 if reader.kind == "image" else round(index / reader.fps, 6)
            players = by_index[index].players
            poses = poses_of(reused[index], players) if players else []
            out[index] = FramePoses(frame_index=index, timestamp_s=r4(timestamp), poses=poses)
        report_frames(ctx, len(wanted), len(wanted), final=True)
        return PoseOutput(poses=[out[i] for i in wanted])

    stride = 0
    for index in wanted:
        stride = math.gcd(stride, index)
    stride = max(stride, 1)
    remaining = set(wanted)
    for video_frame in reader.frames(stride, wanted[-1] // stride + 1):
        if video_frame.index not in remaining:
            continue
        remaining.discard(video_frame.index)
        players = by_index[video_frame.index].players
        poses = []
        if players and model is not None:
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
            poses = poses_of(prediction, players)
        out[video_frame.index] = FramePoses(
            frame_index=video_frame.index, timestamp_s=r4(video_frame.timestamp_s), poses=poses
        )
        report_frames(ctx, len(out), len(wanted), final=not remaining)
    if remaining:
        missing = sorted(remaining)
        raise MediaError(
            f"players refer to frame(s) {missing[:5]} that the media does not have (it ended earlier, or the "
            f"host's limit of {reader.max_frames} frames per stage stopped reading): was 'players' detected on this media?"
        )
    return PoseOutput(poses=[out[i] for i in wanted])
