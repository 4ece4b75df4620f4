"""``classifier``: an action per player per frame, from pose kinematics over time.

``classify_actions`` takes the ``poses`` of the pose stage (and, optionally, the ``media`` to remove
camera motion) and labels every pose with deterministic, documented rules. No model, no training:
the same poses always give the same actions.

Method
------
All distances are normalised by body size: the **scale** ``s`` of a track is the median torso
length (mid-shoulders to mid-hips) over its observations, or 0.3 x box height where the torso is not
visible. Keypoints count when their confidence is >= ``min_keypoint_confidence``. Times are the
frames' ``timestamp_s`` (so the rules do not depend on fps or frame stride).

Camera motion (``camera_motion: "auto"``, videos only): the global translation between consecutive
frames is measured by phase correlation (OpenCV ``phaseCorrelate``, Hann window) on a grey,
downscaled copy of each frame with the people blanked out; its running sum is subtracted from
every position, so a camera pan does not look like running. Weak correlations (response < 0.05,
e.g. scene cuts) count as no motion. The pose stage's positions are used as they are otherwise.

Rules, for one pose at time ``t`` (``H`` = mid-hip, else the box's bottom centre):

* **speed** (tracked players seen at least twice within ``speed_window_s`` around ``t``): the
  least-squares velocity of ``H`` over that window, in scales per second (``speed`` in the output).
  ``< walk_speed`` (1.0) → ``standing``; ``< run_speed`` (4.0) → ``walking``; else ``running``.
  (A torso is ~0.5 m: 1 scale/s ~ 0.5 m/s, 4 scales/s ~ 2 m/s.)
* **jumping**: the height of ``H`` above its baseline exceeds ``jump_height`` (0.35 scale), and so
  does the ankles' height where ankles are visible (1.5 x ``jump_height`` for the hips alone). The
  baseline at ``t`` is the median, over ``jump_window_s`` around ``t``, of the positions carried to
  ``t`` along the least-squares trend (so walking towards the camera is not a jump).
* **crouching**: both visible knee angles (hip-knee-ankle) < ``crouch_knee_angle`` (120°), or with
  one leg visible, that angle < 100° and the hip-to-ankle height < 1.1 scales.
* **lying**: the torso (mid-hips → mid-shoulders) is more than 60° from vertical.
* **arms_raised**: a visible wrist at least 0.5 scale above its shoulder.
* **standing**: none of the above and not moving (or a still image, which cannot show motion).

A still image (a single frame) or an untracked player can show only ``standing``, ``crouching``,
``lying`` and ``arms_raised``; its ``speed`` is null. The primary ``action`` is the first label by
precedence lying > jumping > running > walking > crouching > arms_raised > standing; ``labels``
lists every label that applies. With too few visible keypoints to apply any rule, an upright pose
box (height >= 1.5 x width) is ``standing`` with confidence 0.5 x the pose's detection confidence;
anything else is ``unknown`` (confidence 0).

Confidence = (mean confidence of the keypoints the deciding rule used) x (margin), where the margin
is 0.5 + the distance of the feature from its nearest decision threshold in units of that
threshold's scale, clipped to [0.5, 1]; rounded to 4 decimals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from forgeflow.plugins.builtin._vision import r4
from forgeflow.plugins.builtin.schemas import Action, FrameActions, FramePoses
from forgeflow.plugins.sdk import Plugin, ToolContext

plugin = Plugin(
    "classifier",
    "1.0.0",
    description="Per-player actions (standing, walking, running, jumping, crouching, lying, arms raised) from pose kinematics.",
)

PRECEDENCE = ("lying", "jumping", "running", "walking", "crouching", "arms_raised", "standing")
STILL_CLASSES = ("standing", "crouching", "lying", "arms_raised")

# COCO-17 indices
_SH = (5, 6)
_WR = (9, 10)
_HIP = (11, 12)
_KNEE = (13, 14)
_ANK = (15, 16)


@plugin.availability_check
def _available() -> str | None:
    import importlib.util

    missing = [name for name in ("numpy", "cv2") if importlib.util.find_spec(name) is None]
    return f"missing Python package(s): {', '.join(missing)}" if missing else None


class ClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    camera_motion: Literal["auto", "off"] = Field(
        "auto",
        description="'auto': remove the camera's pan measured on the video (needs 'media'); 'off': raw image positions.",
    )
    min_keypoint_confidence: float = Field(
        0.3, ge=0.0, le=1.0, description="Keypoints below this confidence are not used."
    )
    walk_speed: float = Field(1.0, gt=0.0, description="Speed (torso lengths per second) from which a player walks.")
    run_speed: float = Field(4.0, gt=0.0, description="Speed (torso lengths per second) from which a player runs.")
    speed_window_s: float = Field(0.5, gt=0.0, le=10.0, description="Time window (centred) of the speed estimate.")
    jump_height: float = Field(0.35, gt=0.0, description="Hip (and ankle) lift, in torso lengths, that makes a jump.")
    jump_window_s: float = Field(2.0, gt=0.0, le=30.0, description="Time window (centred) of the ground baseline.")
    crouch_knee_angle: float = Field(
        120.0, gt=0.0, lt=180.0, description="Knee angle (degrees) under which a player crouches."
    )
    arms_raised_height: float = Field(0.5, gt=0.0, description="Wrist height above the shoulder, in torso lengths.")
    lying_angle: float = Field(
        60.0, gt=0.0, lt=90.0, description="Torso angle from vertical (degrees) over which a player lies."
    )


class ClassifierInput(BaseModel):
    poses: list[FramePoses] = Field(description="Per-frame poses of the pose stage.")
    media: str | None = Field(
        None, min_length=1, description="The video the poses come from (used to remove camera motion)."
    )


class ClassifierOutput(BaseModel):
    actions: list[FrameActions]


# --- geometry ------------------------------------------------------------------------------------


def _margin(value: float, threshold: float, scale: float) -> float:
    return min(1.0, max(0.5, 0.5 + abs(value - threshold) / scale))


@dataclass
class _Obs:
    frame_pos: int
    t: float
    player_index: int
    track_id: int | None
    kp: list[list[float]]
    box: list[float]
    min_conf: float
    det_conf: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    labels: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    speed: float | None = None

    def vis(self, i: int) -> bool:
        return self.kp[i][2] >= self.min_conf

    def point(self, i: int) -> tuple[float, float] | None:
        if not self.vis(i):
            return None
        return (self.kp[i][0] - self.offset[0], self.kp[i][1] - self.offset[1])

    def mid(self, pair: Sequence[int]) -> tuple[float, float] | None:
        pts = [p for p in (self.point(i) for i in pair) if p is not None]
        if not pts:
            return None
        return (sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts))

    def quality(self, idx: Sequence[int]) -> float:
        used = [self.kp[i][2] for i in idx if self.vis(i)]
        return sum(used) / len(used) if used else 0.0

    def torso(self) -> float | None:
        if all(self.vis(i) for i in (*_SH, *_HIP)):
            sh, hp = self.mid(_SH), self.mid(_HIP)
            assert sh is not None and hp is not None
            length = math.dist(sh, hp)
            return length if length > 1e-6 else None
        return None

    def anchor(self) -> tuple[float, float]:
        hip = self.mid(_HIP)
        if hip is not None:
            return hip
        return ((self.box[0] + self.box[2]) / 2 - self.offset[0], self.box[3] - self.offset[1])

    def ankle_y(self) -> float | None:
        ank = self.mid(_ANK)
        return ank[1] if ank is not None else None


def _knee_angle(o: _Obs, side: int) -> float | None:
    hip, knee, ank = o.point(_HIP[side]), o.point(_KNEE[side]), o.point(_ANK[side])
    if hip is None or knee is None or ank is None:
        return None
    a = (hip[0] - knee[0], hip[1] - knee[1])
    b = (ank[0] - knee[0], ank[1] - knee[1])
    na, nb = math.hypot(*a), math.hypot(*b)
    if na < 1e-6 or nb < 1e-6:
        return None
    cos = max(-1.0, min(1.0, (a[0] * b[0] + a[1] * b[1]) / (na * nb)))
    return math.degrees(math.acos(cos))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _slope(ts: list[float], vs: list[float]) -> float:
    mt, mv = sum(ts) / len(ts), sum(vs) / len(vs)
    var = sum((t - mt) ** 2 for t in ts)
    if var <= 0:
        return 0.0
    return sum((t - mt) * (v - mv) for t, v in zip(ts, vs, strict=True)) / var


# --- rules ---------------------------------------------------------------------------------------


def _static_rules(o: _Obs, cfg: ClassifierConfig) -> None:
    s = o.scale
    # lying: torso far from vertical
    sh, hp = o.mid(_SH), o.mid(_HIP)
    if sh is not None and hp is not None and math.dist(sh, hp) > 0.3 * s:
        dx, dy = sh[0] - hp[0], sh[1] - hp[1]
        angle = math.degrees(math.atan2(abs(dx), abs(dy)))
        if angle > cfg.lying_angle:
            o.scores["lying"] = o.quality((*_SH, *_HIP)) * _margin(angle, cfg.lying_angle, 15.0)
        else:
            o.scores["_upright"] = o.quality((*_SH, *_HIP)) * _margin(angle, cfg.lying_angle, 15.0)
    # crouching: bent knees
    angles = [a for a in (_knee_angle(o, 0), _knee_angle(o, 1)) if a is not None]
    legs = (*_HIP, *_KNEE, *_ANK)
    if len(angles) == 2:
        worst = max(angles)
        if worst < cfg.crouch_knee_angle:
            o.scores["crouching"] = o.quality(legs) * _margin(worst, cfg.crouch_knee_angle, 30.0)
        else:
            o.scores["_straight"] = o.quality(legs) * _margin(worst, cfg.crouch_knee_angle, 30.0)
    elif len(angles) == 1:
        hip, ank = o.mid(_HIP), o.mid(_ANK)
        height = (ank[1] - hip[1]) / s if hip is not None and ank is not None else None
        limit = cfg.crouch_knee_angle - 20.0
        if angles[0] < limit and height is not None and height < 1.1:
            o.scores["crouching"] = o.quality(legs) * _margin(angles[0], limit, 30.0) * 0.8
        else:
            o.scores["_straight"] = o.quality(legs) * _margin(angles[0], limit, 30.0) * 0.8
    # arms raised: a wrist clearly above its shoulder
    best = None
    for side in (0, 1):
        wrist, shoulder = o.point(_WR[side]), o.point(_SH[side])
        if wrist is not None and shoulder is not None:
            lift = (shoulder[1] - wrist[1]) / s
            best = lift if best is None else max(best, lift)
    if best is not None and best >= cfg.arms_raised_height:
        o.scores["arms_raised"] = o.quality((*_SH, *_WR)) * _margin(best, cfg.arms_raised_height, 0.5)


def _temporal_rules(track: list[_Obs], cfg: ClassifierConfig) -> None:
    anchors = [o.anchor() for o in track]
    ankles = [o.ankle_y() for o in track]
    times = [o.t for o in track]
    half_speed, half_jump = cfg.speed_window_s / 2, cfg.jump_window_s / 2
    for i, o in enumerate(track):
        s = o.scale
        near = [j for j in range(len(track)) if abs(times[j] - o.t) <= half_speed + 1e-9]
        span = max(times[j] for j in near) - min(times[j] for j in near)
        if len(near) >= 2 and span > 0:
            ts = [times[j] for j in near]
            vx = _slope(ts, [anchors[j][0] for j in near])
            vy = _slope(ts, [anchors[j][1] for j in near])
            o.speed = math.hypot(vx, vy) / s
        # jump: lift above a detrended median baseline
        win = [j for j in range(len(track)) if abs(times[j] - o.t) <= half_jump + 1e-9]
        if len(win) >= 3:
            ts = [times[j] for j in win]
            hip_y = [anchors[j][1] for j in win]
            trend = _slope(ts, hip_y)
            base = _median([y + trend * (o.t - t) for y, t in zip(hip_y, ts, strict=True)])
            hip_lift = (base - anchors[i][1]) / s
            ank_win = [(a, times[j]) for j in win if (a := ankles[j]) is not None]
            ankle_lift = None
            ankle = ankles[i]
            used: tuple[int, ...]
            if ankle is not None and len(ank_win) >= 3:
                a_trend = _slope([t for _, t in ank_win], [a for a, _ in ank_win])
                a_base = _median([a + a_trend * (o.t - t) for a, t in ank_win])
                ankle_lift = (a_base - ankle) / s
            if ankle_lift is not None:
                lift, need, used = min(hip_lift, ankle_lift), cfg.jump_height, (*_HIP, *_ANK)
            else:
                lift, need, used = hip_lift, 1.5 * cfg.jump_height, _HIP
            if lift >= need:
                o.scores["jumping"] = max(o.quality(used), 0.3) * _margin(lift, need, need)


def _decide(o: _Obs, cfg: ClassifierConfig) -> Action:
    labels: list[str] = []
    scores = dict(o.scores)
    if "lying" in scores:
        labels.append("lying")
    if "jumping" in scores:
        labels.append("jumping")
    hip_q = o.quality(_HIP) or 0.5
    if o.speed is not None and "lying" not in scores and "jumping" not in scores:
        v = o.speed
        if v >= cfg.run_speed:
            labels.append("running")
            scores["running"] = hip_q * _margin(v, cfg.run_speed, cfg.run_speed / 2)
        elif v >= cfg.walk_speed:
            labels.append("walking")
            gap = min(v - cfg.walk_speed, cfg.run_speed - v)
            scores["walking"] = hip_q * min(1.0, max(0.5, 0.5 + gap / cfg.walk_speed))
    if "crouching" in scores and "lying" not in scores:
        labels.append("crouching")
    if "arms_raised" in scores and "lying" not in scores:
        labels.append("arms_raised")
    moving = any(lbl in labels for lbl in ("running", "walking", "jumping"))
    if not moving and not any(lbl in labels for lbl in ("lying", "crouching")):
        basis = [scores[k] for k in ("_straight", "_upright") if k in scores]
        if o.speed is not None:
            basis.append(hip_q * _margin(o.speed, cfg.walk_speed, cfg.walk_speed))
        if basis:
            labels.append("standing")
            scores["standing"] = sum(basis) / len(basis)
    if not labels:
        width, height = o.box[2] - o.box[0], o.box[3] - o.box[1]
        if height >= 1.5 * width > 0:  # too few keypoints, but an upright body
            labels.append("standing")
            scores["standing"] = 0.5 * o.det_conf
    labels.sort(key=PRECEDENCE.index)
    if not labels:
        return Action(
            track_id=o.track_id,
            player_index=o.player_index,
            action="unknown",
            confidence=0.0,
            labels=[],
            speed=_rs(o.speed),
        )
    primary = labels[0]
    return Action(
        track_id=o.track_id,
        player_index=o.player_index,
        action=primary,
        confidence=r4(min(1.0, max(0.0, scores[primary]))),
        labels=labels,
        speed=_rs(o.speed),
    )


def _rs(speed: float | None) -> float | None:
    return None if speed is None else r4(speed)


def classify(
    poses: list[FramePoses],
    config: ClassifierConfig | None = None,
    camera_offsets: dict[int, tuple[float, float]] | None = None,
) -> list[FrameActions]:
    """Apply the rules to per-frame poses (``camera_offsets``: frame_index → cumulative content shift)."""
    cfg = config or ClassifierConfig()
    offsets = camera_offsets or {}
    frames = sorted(poses, key=lambda f: f.frame_index)
    obs_by_frame: list[list[_Obs]] = []
    tracks: dict[int, list[_Obs]] = {}
    for pos, frame in enumerate(frames):
        row = []
        for pose in sorted(frame.poses, key=lambda p: p.player_index):
            o = _Obs(
                frame_pos=pos,
                t=frame.timestamp_s,
                player_index=pose.player_index,
                track_id=pose.track_id,
                kp=pose.keypoints,
                box=pose.box,
                min_conf=cfg.min_keypoint_confidence,
                det_conf=pose.confidence,
                offset=offsets.get(frame.frame_index, (0.0, 0.0)),
            )
            row.append(o)
            if pose.track_id is not None:
                tracks.setdefault(pose.track_id, []).append(o)
        obs_by_frame.append(row)
    # body scale: per track median torso, per observation otherwise; 0.3 x box height as fallback
    for row in obs_by_frame:
        for o in row:
            torso = o.torso()
            o.scale = torso if torso is not None else max(0.3 * (o.box[3] - o.box[1]), 1.0)
    for track in tracks.values():
        torsos = [t for t in (o.torso() for o in track) if t is not None]
        if torsos:
            scale = _median(torsos)
            for o in track:
                o.scale = scale
    for row in obs_by_frame:
        for o in row:
            _static_rules(o, cfg)
    if len(frames) > 1:
        for track in tracks.values():
            if len(track) > 1:
                _temporal_rules(track, cfg)
    out = []
    for frame, row in zip(frames, obs_by_frame, strict=True):
        actions = [_decide(o, cfg) for o in row]
        actions.sort(key=lambda a: (a.track_id is None, a.track_id or 0, a.player_index))
        out.append(FrameActions(frame_index=frame.frame_index, timestamp_s=frame.timestamp_s, actions=actions))
    return out


def camera_offsets(
    ctx: ToolContext, media: str, poses: list[FramePoses], *, width: int = 320
) -> dict[int, tuple[float, float]]:
    """Cumulative global translation (content shift in pixels since the first frame) per frame index."""
    import cv2
    import numpy as np

    reader = ctx.media(media)
    if reader.kind != "video" or not poses:
        return {}
    wanted = {f.frame_index for f in poses}
    boxes = {f.frame_index: [p.box for p in f.poses] for f in poses}
    last = max(wanted)
    factor = min(1.0, width / max(reader.width, 1))
    prev = None
    window = None
    total = (0.0, 0.0)
    result: dict[int, tuple[float, float]] = {}
    prev_boxes: list[list[float]] = []
    for frame in reader.frames(1, last + 1):
        gray = cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY).astype(np.float32)
        own = boxes.get(frame.index, prev_boxes)
        prev_boxes = own
        if own:  # blank the people: the background tells the camera's motion
            fill = float(gray.mean())
            for box in own:
                x1, y1, x2, y2 = (round(v) for v in box)
                gray[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = fill
        small = cv2.resize(gray, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA) if factor < 1 else gray
        if prev is not None:
            if window is None:
                window = cv2.createHanningWindow((small.shape[1], small.shape[0]), cv2.CV_32F)
            (dx, dy), response = cv2.phaseCorrelate(prev, small, window)
            if response >= 0.05 and math.isfinite(dx) and math.isfinite(dy):
                total = (total[0] + dx / factor, total[1] + dy / factor)
        prev = small
        if frame.index in wanted:
            result[frame.index] = total
    return result


@plugin.tool(input=ClassifierInput, output=ClassifierOutput, config=ClassifierConfig)
def classify_actions(inputs: ClassifierInput, config: ClassifierConfig, ctx: ToolContext) -> ClassifierOutput:
    """An action per player per frame (standing, walking, running, jumping, crouching, lying, arms_raised)."""
    offsets = None
    if config.camera_motion == "auto" and inputs.media and len(inputs.poses) > 1:
        offsets = camera_offsets(ctx, inputs.media, inputs.poses)
    return ClassifierOutput(actions=classify(inputs.poses, config, offsets))
