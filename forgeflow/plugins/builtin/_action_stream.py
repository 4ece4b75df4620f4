"""The classifier's rules over a stream of frames: :class:`ActionStream` decides each frame once
its windows are complete, holding only what the windows reach (see "Streaming" in
:mod:`forgeflow.plugins.builtin.classifier`)."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping

from forgeflow.plugins.builtin._action_rules import (
    NO_OFFSET,
    ClassifierConfig,
    Offset,
    _decide,
    _median_of_sorted,
    _Near,
    _Obs,
    _static_rules,
    _temporal_rules,
)
from forgeflow.plugins.builtin.schemas import FrameActions, FramePoses
from forgeflow.plugins.errors import InputError

__all__ = ["ActionStream", "classify", "classify_stream"]


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
