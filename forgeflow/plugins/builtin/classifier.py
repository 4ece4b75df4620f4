"""``classifier``: an action per player per frame, from pose kinematics over time.

``classify_actions`` takes the ``poses`` of the pose stage (and, optionally, the ``media`` to remove
camera motion) and labels every pose with deterministic, documented rules. No model, no training:
the same poses always give the same actions.

Method
------
All distances are normalised by body size: the **scale** ``s`` of a tracked pose at ``t`` is the
median torso length (mid-shoulders to mid-hips) of its track's observations within
``scale_window_s`` (30 s) centred on ``t``; of an untracked pose, or where no torso is visible in
that window, its own torso, else 0.3 x its box height. A window rather than the whole track keeps
memory bounded on a match, and a player's size on screen changes over a match anyway (distance to
the camera, zoom); a track that spans at most half the window gets the median of the whole track.
Keypoints count when their confidence is >= ``min_keypoint_confidence``. Times are the frames'
``timestamp_s`` (so the rules do not depend on fps or frame stride).

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

Streaming
---------
Every rule looks at a centred time window (speed, jump, scale), so a frame's actions are final once
the poses up to half the widest window later have arrived. :class:`ActionStream` takes frames in
frame order and returns each frame as soon as that is so (15 s behind the input by default); it
holds the frames not yet decided and, per live track, the entries still inside a window (a sorted
list of torsos for the sliding median): memory and cost per frame depend on the windows and the
number of players, never on the video's length. :func:`camera_offsets` reads the video alongside
the poses, one frame at a time. :func:`action_stream` is the tool end to end; :func:`classify`
(a list in, a list out) is a wrapper for clips and tests. The results equal the computation over
the whole video with the same windows, bit for bit.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, insort
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from forgeflow.plugins.builtin._vision import r4
from forgeflow.plugins.builtin.schemas import Action, FrameActions, FramePoses, Pose
from forgeflow.plugins.errors import InputError
from forgeflow.plugins.frames import FrameStream
from forgeflow.plugins.media_reader import MediaReader
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


class ClassifierInput(BaseModel):
    poses: FrameStream[FramePoses] = Field(description="Per-frame poses of the pose stage.")
    media: str | None = Field(
        None, min_length=1, description="The video the poses come from (used to remove camera motion)."
    )


class ClassifierOutput(BaseModel):
    actions: FrameStream[FrameActions]


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
        pts = [p for p in (self.point(i) for i in pair) if p is not None]
        if not pts:
            return None
        return (sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts))

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


class _TrackWindows:
    """A track's observations within reach of the windows of the observations still to be decided.

    ``recent``: every observation received, oldest first, from the earliest one still inside a
    speed or jump window. ``scale_inside``/``torsos``: the (time, torso) of the observations in the
    scale window of the last observation decided (``torsos`` sorted, for the median);
    ``scale_ahead``: those received after them.
    """

    __slots__ = ("last_t", "recent", "scale_ahead", "scale_inside", "torsos")

    def __init__(self) -> None:
        self.last_t = 0.0
        self.recent: deque[_Near] = deque()
        self.scale_ahead: deque[tuple[float, float]] = deque()
        self.scale_inside: deque[tuple[float, float]] = deque()
        self.torsos: list[float] = []

    def add(self, o: _Obs, torso: float | None) -> None:
        x, y = o.anchor()
        self.recent.append(_Near(o.t, x, y, o.ankle_y()))
        if torso is not None:
            self.scale_ahead.append((o.t, torso))
        self.last_t = o.t

    def scale_at(self, t: float, reach: float) -> float | None:
        """Median torso of the observations with ``|t_i - t| <= reach``; ``t`` never decreases."""
        ahead, inside, torsos = self.scale_ahead, self.scale_inside, self.torsos
        while ahead and abs(ahead[0][0] - t) <= reach:
            entry = ahead.popleft()
            inside.append(entry)
            insort(torsos, entry[1])
        while inside and abs(inside[0][0] - t) > reach:
            del torsos[bisect_left(torsos, inside.popleft()[1])]
        return _median_of_sorted(torsos) if torsos else None

    def windows(self, t: float, speed_reach: float, jump_reach: float) -> tuple[list[_Near], list[_Near]]:
        """The observations with ``|t_i - t|`` within each reach, in time order; ``t`` never decreases."""
        recent = self.recent
        widest = max(speed_reach, jump_reach)
        while recent and t - recent[0].t > widest:
            recent.popleft()
        near: list[_Near] = []
        win: list[_Near] = []
        for n in recent:
            gap = abs(n.t - t)
            if n.t > t and gap > widest:
                break
            if gap <= speed_reach:
                near.append(n)
            if gap <= jump_reach:
                win.append(n)
        return near, win

    def size(self) -> int:
        return len(self.recent) + len(self.scale_ahead) + len(self.scale_inside)


class ActionStream:
    """The rules over a stream of frames: :meth:`push` each frame in frame order with its camera
    offset, and get back the frames whose every window is complete; :meth:`finish` returns the rest.

    A frame at ``t`` is decided once a frame later than ``t + horizon_s`` has arrived (or the stream
    ended); ``horizon_s`` is the largest half window (speed, jump, scale). What is held between
    calls is the frames not yet decided and, per live track, the observations within the windows:
    bounded by the windows' length in frames, never by the video's.
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        cfg = self.cfg = config or ClassifierConfig()
        # a neighbour counts where |t_i - t| <= window / 2 + 1e-9 (the slack absorbs rounded timestamps)
        self._speed_reach = cfg.speed_window_s / 2 + 1e-9
        self._jump_reach = cfg.jump_window_s / 2 + 1e-9
        self._scale_reach = cfg.scale_window_s / 2 + 1e-9
        self.horizon_s = max(self._speed_reach, self._jump_reach, self._scale_reach)
        self._pending: deque[tuple[int, float, list[tuple[_Obs, float | None]]]] = deque()
        self._tracks: OrderedDict[int, _TrackWindows] = OrderedDict()  # least recently seen first
        self._frames_seen = 0
        self._last: tuple[int, float] | None = None

    @property
    def buffered_frames(self) -> int:
        """Frames received and not yet returned."""
        return len(self._pending)

    @property
    def buffered_observations(self) -> int:
        """Observations held: those of the frames not yet returned, and the tracks' window entries."""
        return sum(len(row) for _, _, row in self._pending) + sum(w.size() for w in self._tracks.values())

    def push(self, frame: FramePoses, offset: Offset = NO_OFFSET) -> list[FrameActions]:
        index, t = frame.frame_index, frame.timestamp_s
        if self._last is not None and (index < self._last[0] or t < self._last[1]):
            raise InputError(
                f"classifier: poses must come in frame order; frame {index} at {t} s "
                f"came after frame {self._last[0]} at {self._last[1]} s",
                field="poses",
            )
        self._last = (index, t)
        self._frames_seen += 1
        cfg = self.cfg
        row = []
        for pose in sorted(frame.poses, key=lambda p: p.player_index):
            o = _Obs.of(pose, t, cfg.min_keypoint_confidence, offset)
            torso = o.torso()
            row.append((o, torso))
            if o.track_id is not None:
                track = self._tracks.get(o.track_id)
                if track is None:
                    track = self._tracks[o.track_id] = _TrackWindows()
                else:
                    self._tracks.move_to_end(o.track_id)
                track.add(o, torso)
        self._pending.append((index, t, row))
        done = []
        while self._pending and t - self._pending[0][1] > self.horizon_s:
            done.append(self._decide_frame())
        return done

    def finish(self) -> list[FrameActions]:
        """The frames still held (the stream has ended)."""
        done = []
        while self._pending:
            done.append(self._decide_frame())
        return done

    def _decide_frame(self) -> FrameActions:
        index, t, row = self._pending.popleft()
        cfg = self.cfg
        actions = []
        for o, torso in row:
            track = self._tracks[o.track_id] if o.track_id is not None else None
            scale = track.scale_at(t, self._scale_reach) if track is not None else None
            o.scale = scale if scale is not None else o.fallback_scale(torso)
            _static_rules(o, cfg)
            if track is not None and self._frames_seen > 1:
                near, win = track.windows(t, self._speed_reach, self._jump_reach)
                _temporal_rules(o, near, win, cfg)
            actions.append(_decide(o, cfg))
        actions.sort(key=lambda a: (a.track_id is None, a.track_id or 0, a.player_index))
        # A track last seen before this frame is decided; were it seen again, that would be after the
        # newest frame, farther than horizon_s from its entries: they are out of every window.
        while self._tracks:
            track_id, track = next(iter(self._tracks.items()))
            if track.last_t >= t:
                break
            del self._tracks[track_id]
        return FrameActions(frame_index=index, timestamp_s=t, actions=actions)


def classify_stream(
    frames: Iterable[tuple[FramePoses, Offset]], config: ClassifierConfig | None = None
) -> Iterator[FrameActions]:
    """Actions of a stream of (poses, camera offset) in frame order, each frame yielded as soon as
    its windows are complete (see :class:`ActionStream`)."""
    stream = ActionStream(config)
    for frame, offset in frames:
        yield from stream.push(frame, offset)
    yield from stream.finish()


def classify(
    poses: Iterable[FramePoses],
    config: ClassifierConfig | None = None,
    camera_offsets: Mapping[int, Offset] | None = None,
) -> list[FrameActions]:
    """Apply the rules to per-frame poses in any order (``camera_offsets``: frame_index → cumulative
    content shift). Holds everything: for clips and tests; a video's poses go to :func:`classify_stream`."""
    offsets = camera_offsets or {}
    frames = sorted(poses, key=lambda f: f.frame_index)
    return list(classify_stream(((f, offsets.get(f.frame_index, NO_OFFSET)) for f in frames), config))


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
        self._prev: Any = None
        self._window: Any = None

    def update(self, image: Any, boxes: Sequence[Sequence[float]]) -> Offset:
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


def action_stream(
    poses: Iterable[FramePoses], config: ClassifierConfig, ctx: ToolContext, media: str | None = None
) -> Iterator[FrameActions]:
    """What ``classify_actions`` computes, as a stream: ``poses`` is iterated once, in frame order,
    and the video (camera motion) is read alongside it."""
    frames = iter(poses)
    head = list(islice(frames, 2))  # one frame shows no motion: then the video is not read
    stream = chain(head, frames)
    paired: Iterable[tuple[FramePoses, Offset]]
    if config.camera_motion == "auto" and media and len(head) > 1:
        paired = camera_offsets(ctx, media, stream)
    else:
        paired = ((f, NO_OFFSET) for f in stream)
    return classify_stream(paired, config)


@plugin.tool(input=ClassifierInput, output=ClassifierOutput, config=ClassifierConfig, draws={"actions": "labels"})
def classify_actions(inputs: ClassifierInput, config: ClassifierConfig, ctx: ToolContext) -> ClassifierOutput:
    """An action per player per frame (standing, walking, running, jumping, crouching, lying, arms_raised)."""
    return ClassifierOutput(actions=action_stream(inputs.poses, config, ctx, inputs.media))
