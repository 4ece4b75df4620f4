"""The classifier's rules: one pose's features (:class:`_Obs`), and the static and temporal rules
that label it, with their thresholds (:class:`ClassifierConfig`). The method is described in
:mod:`forgeflow.plugins.builtin.classifier`; :mod:`._action_stream` applies the rules over time."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from forgeflow.plugins.builtin._vision import r4
from forgeflow.plugins.builtin.schemas import Action, Pose

__all__ = ["NO_OFFSET", "PRECEDENCE", "STILL_CLASSES", "ClassifierConfig", "Offset"]

PRECEDENCE = ("lying", "jumping", "running", "walking", "crouching", "arms_raised", "standing")
STILL_CLASSES = ("standing", "crouching", "lying", "arms_raised")

# COCO-17 indices
_SH = (5, 6)
_WR = (9, 10)
_HIP = (11, 12)
_KNEE = (13, 14)
_ANK = (15, 16)


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
    scale_window_s: float = Field(
        30.0,
        gt=0.0,
        le=120.0,
        description="Time window (centred) of a track's body scale (median torso length). A stream's "
        "results come half the widest window behind its input.",
    )
    crouch_knee_angle: float = Field(
        120.0, gt=0.0, lt=180.0, description="Knee angle (degrees) under which a player crouches."
    )
    arms_raised_height: float = Field(0.5, gt=0.0, description="Wrist height above the shoulder, in torso lengths.")
    lying_angle: float = Field(
        60.0, gt=0.0, lt=90.0, description="Torso angle from vertical (degrees) over which a player lies."
    )


# --- geometry ------------------------------------------------------------------------------------


def _margin(value: float, threshold: float, scale: float) -> float:
    return min(1.0, max(0.5, 0.5 + abs(value - threshold) / scale))


Offset = tuple[float, float]
NO_OFFSET: Offset = (0.0, 0.0)


@dataclass(slots=True)
class _Obs:
    """One pose, its keypoints kept as one flat array of doubles (x0, y0, c0, x1, ...): a few hundred
    bytes, where the pose's nested lists take several kilobytes, for the frames the stream holds."""

    t: float
    player_index: int
    track_id: int | None
    kp: array[float]
    box: tuple[float, ...]
    min_conf: float
    det_conf: float = 1.0
    offset: Offset = NO_OFFSET
    scale: float = 1.0
    scores: dict[str, float] = field(default_factory=dict)
    speed: float | None = None

    @classmethod
    def of(cls, pose: Pose, t: float, min_conf: float, offset: Offset = NO_OFFSET) -> _Obs:
        return cls(
            t=t,
            player_index=pose.player_index,
            track_id=pose.track_id,
            kp=array("d", chain.from_iterable(pose.keypoints)),
            box=tuple(pose.box),
            min_conf=min_conf,
            det_conf=pose.confidence,
            offset=offset,
        )

    def vis(self, i: int) -> bool:
        return self.kp[3 * i + 2] >= self.min_conf

    def point(self, i: int) -> tuple[float, float] | None:
        if not self.vis(i):
            return None
        return (self.kp[3 * i] - self.offset[0], self.kp[3 * i + 1] - self.offset[1])

    def mid(self, pair: Sequence[int]) -> tuple[float, float] | None:
        """The mean of the visible points of ``pair`` (None when none is): :meth:`point`'s arithmetic,
        inline, as it runs several times per observation."""
        kp, (ox, oy) = self.kp, self.offset
        n, sx, sy = 0, 0.0, 0.0
        for i in pair:
            if kp[3 * i + 2] >= self.min_conf:
                sx += kp[3 * i] - ox
                sy += kp[3 * i + 1] - oy
                n += 1
        if not n:
            return None
        return (sx / n, sy / n)

    def quality(self, idx: Sequence[int]) -> float:
        used = [self.kp[3 * i + 2] for i in idx if self.vis(i)]
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

    def fallback_scale(self, torso: float | None) -> float:
        """The body scale from this pose alone: its torso, else 0.3 x its box height."""
        return torso if torso is not None else max(0.3 * (self.box[3] - self.box[1]), 1.0)


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
    return _median_of_sorted(sorted(values))


def _median_of_sorted(ordered: Sequence[float]) -> float:
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _slope(ts: list[float], vs: list[float]) -> float:
    """The least-squares slope of ``vs`` over ``ts``, in one pass (it runs for every observation of
    every track); the sums add in the same order as ``sum()`` would, so the results are the same bits."""
    mt, mv = sum(ts) / len(ts), sum(vs) / len(vs)
    var = cov = 0.0
    for t, v in zip(ts, vs, strict=True):
        d = t - mt
        var += d**2
        cov += d * (v - mv)
    if var <= 0:
        return 0.0
    return cov / var


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


def _temporal_rules(o: _Obs, near: list[_Near], win: list[_Near], cfg: ClassifierConfig) -> None:
    """Speed and jump of ``o`` from its track's observations within the speed window (``near``) and
    the jump window (``win``), both in time order and including ``o`` itself."""
    s = o.scale
    span = near[-1].t - near[0].t  # times ascend
    if len(near) >= 2 and span > 0:
        ts = [n.t for n in near]
        vx = _slope(ts, [n.x for n in near])
        vy = _slope(ts, [n.y for n in near])
        o.speed = math.hypot(vx, vy) / s
    # jump: lift above a detrended median baseline
    if len(win) >= 3:
        ts = [n.t for n in win]
        hip_y = [n.y for n in win]
        trend = _slope(ts, hip_y)
        base = _median([y + trend * (o.t - t) for y, t in zip(hip_y, ts, strict=True)])
        own = o.anchor()
        hip_lift = (base - own[1]) / s
        ank_win = [(a, n.t) for n in win if (a := n.ankle) is not None]
        ankle_lift = None
        ankle = o.ankle_y()
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


class _Near(NamedTuple):
    """What the speed and jump windows need of a track's neighbouring observation."""

    t: float
    x: float
    y: float
    ankle: float | None
