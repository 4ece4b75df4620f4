"""Data the built-in vision plugins pass between stages (their tools' input and output models).

Every stage output is a list with one entry per processed frame, in frame order::

    players: [{frame_index, timestamp_s, players: [Player, ...]}, ...]     # detect_players / track_players
    poses:   [{frame_index, timestamp_s, poses:   [Pose, ...]},   ...]     # estimate_poses
    actions: [{frame_index, timestamp_s, actions: [Action, ...]}, ...]     # classify_actions

Coordinates are pixels of the original frame, rounded to 2 decimals; confidences to 4 decimals;
items are sorted by ``track_id`` (untracked last, then by box): the same input always gives the
same bytes. Keypoints are ``[x, y, confidence]`` triples in COCO-17 order (:data:`COCO_KEYPOINTS`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from forgeflow.plugins.builtin._vision import COCO_KEYPOINTS

Box = Annotated[list[float], Field(min_length=4, max_length=4, description="[x1, y1, x2, y2] in pixels.")]
Keypoint = Annotated[list[float], Field(min_length=3, max_length=3, description="[x, y, confidence].")]

_KP_DOC = "17 keypoints [x, y, confidence] in COCO order: " + ", ".join(COCO_KEYPOINTS) + "."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Player(_Strict):
    box: Box
    confidence: float = Field(ge=0.0, le=1.0)
    class_id: int = Field(0, description="Class index of the detector (0 = person).")
    class_name: str = Field("person", description="Class name of the detector.")
    track_id: int | None = Field(
        None,
        description="ByteTrack id, stable across the frames of a video (a still image numbers players "
        "left to right from 1). None for a detection the tracker has not confirmed yet.",
    )


class FramePlayers(_Strict):
    frame_index: int = Field(ge=0)
    timestamp_s: float = Field(ge=0.0)
    players: list[Player]


class Pose(_Strict):
    track_id: int | None = Field(None, description="track_id of the matched player.")
    player_index: int = Field(ge=0, description="Index of the matched player in this frame's players list.")
    box: Box = Field(description="Box of the pose detection.")
    confidence: float = Field(ge=0.0, le=1.0, description="Confidence of the pose detection.")
    match_iou: float = Field(ge=0.0, le=1.0, description="IoU between the pose box and the player box.")
    keypoints: list[Keypoint] = Field(min_length=17, max_length=17, description=_KP_DOC)


class FramePoses(_Strict):
    frame_index: int = Field(ge=0)
    timestamp_s: float = Field(ge=0.0)
    poses: list[Pose]


class Action(_Strict):
    track_id: int | None = None
    player_index: int = Field(ge=0)
    action: str = Field(
        description="Primary action (see classifier: lying, jumping, running, walking, crouching, arms_raised, standing)."
    )
    confidence: float = Field(ge=0.0, le=1.0)
    labels: list[str] = Field(description="Every label that applies (e.g. ['running', 'arms_raised']).")
    speed: float | None = Field(
        None,
        description="Horizontal speed in body lengths (torso) per second, camera motion removed; "
        "None where it cannot be measured (a still image, a single observation).",
    )


class FrameActions(_Strict):
    frame_index: int = Field(ge=0)
    timestamp_s: float = Field(ge=0.0)
    actions: list[Action]


class MediaInput(BaseModel):
    media: str = Field(
        min_length=1,
        description="The image or video: a media ref ('sha256:...') or an absolute local path inside an allowed media root.",
    )
