"""The classifier as a stream: bounded memory, constant cost per frame, and the same results as the
whole-video computation it replaced (kept below as a reference)."""

from __future__ import annotations

import json
import math
import time
import tracemalloc
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

import pytest

from forgeflow.plugins import MediaStore, ToolContext
from forgeflow.plugins.builtin.classifier import (
    NO_OFFSET,
    ActionStream,
    ClassifierConfig,
    _decide,
    _median,
    _Near,
    _Obs,
    _PanMeter,
    _static_rules,
    _temporal_rules,
    action_stream,
    camera_offsets,
    classify,
    classify_stream,
)
from forgeflow.plugins.builtin.schemas import FrameActions, FramePoses
from forgeflow.plugins.errors import InputError
from tests.test_vision.test_classifier_rules import FPS, L, pose_of, skeleton

T = TypeVar("T")

# --- the computation before streaming: every frame at once, O(n²) windows per track -----------------


def reference_classify(
    poses: list[FramePoses],
    config: ClassifierConfig | None = None,
    offsets: dict[int, tuple[float, float]] | None = None,
    *,
    scale_window_s: float | None = None,
) -> list[FrameActions]:
    """The classifier as it was: a track's scale is the median torso over the whole track, or, with
    ``scale_window_s``, over the track's observations within that centred window (by brute force)."""
    cfg = config or ClassifierConfig()
    offsets = offsets or {}
    frames = sorted(poses, key=lambda f: f.frame_index)
    rows: list[list[_Obs]] = []
    tracks: dict[int, list[_Obs]] = {}
    for frame in frames:
        row = []
        for pose in sorted(frame.poses, key=lambda p: p.player_index):
            offset = offsets.get(frame.frame_index, (0.0, 0.0))
            o = _Obs.of(pose, frame.timestamp_s, cfg.min_keypoint_confidence, offset)
            torso = o.torso()
            o.scale = torso if torso is not None else max(0.3 * (o.box[3] - o.box[1]), 1.0)
            row.append(o)
            if pose.track_id is not None:
                tracks.setdefault(pose.track_id, []).append(o)
        rows.append(row)
    for track in tracks.values():
        torsos = [(o.t, torso) for o in track if (torso := o.torso()) is not None]
        by_time = _ByTime(torsos, lambda pair: pair[0])
        for o in track:
            if scale_window_s is None:
                near = [v for _, v in torsos]
            else:
                near = [v for _, v in by_time.within(o.t, scale_window_s / 2)]
            if near:
                o.scale = _median(near)
    for row in rows:
        for o in row:
            _static_rules(o, cfg)
    if len(frames) > 1:
        for track in tracks.values():
            if len(track) > 1:
                _reference_temporal_rules(track, cfg)
    out = []
    for frame, row in zip(frames, rows, strict=True):
        actions = [_decide(o, cfg) for o in row]
        actions.sort(key=lambda a: (a.track_id is None, a.track_id or 0, a.player_index))
        out.append(FrameActions(frame_index=frame.frame_index, timestamp_s=frame.timestamp_s, actions=actions))
    return out


def _reference_temporal_rules(track: list[_Obs], cfg: ClassifierConfig) -> None:
    """Each observation's speed and jump windows: the entries of its whole track within them."""
    entries = [_Near(o.t, *o.anchor(), o.ankle_y()) for o in track]
    by_time = _ByTime(entries, lambda e: e.t)
    for o in track:
        _temporal_rules(o, by_time.within(o.t, cfg.speed_window_s / 2), by_time.within(o.t, cfg.jump_window_s / 2), cfg)


class _ByTime(Generic[T]):
    """A track's entries and their times in order. ``within(t, half)`` is the brute-force scan
    ``[e for e in entries if abs(time(e) - t) <= half + 1e-9]``, the same entries in the same order,
    with the predicate checked only on the entries whose time can pass it (found by bisection with a
    1e-6 margin), so that the reference stays quick on clips of hundreds of frames."""

    def __init__(self, entries: list[T], time_of: Callable[[T], float]) -> None:
        self.entries, self.time_of = entries, time_of
        self.order = sorted(range(len(entries)), key=lambda i: time_of(entries[i]))
        self.times = [time_of(entries[i]) for i in self.order]

    def within(self, t: float, half: float) -> list[T]:
        low, high = bisect_left(self.times, t - half - 1e-6), bisect_right(self.times, t + half + 1e-6)
        picked = (self.entries[i] for i in sorted(self.order[low:high]))
        return [e for e in picked if abs(self.time_of(e) - t) <= half + 1e-9]


# --- synthetic matches ------------------------------------------------------------------------------


def _jump_lift(t: float) -> float:
    """A 0.5 s jump, 0.8 torso lengths high, every 3 s."""
    phase = t % 3.0
    return 0.8 * math.sin(math.pi * (phase - 1.0) / 0.5) if 1.0 <= phase <= 1.5 else 0.0


ROLES = ("walk", "run", "jump", "crouch", "arms_up")  # players 0..4; the others stand


def match(n_frames: int, players: int = 22, *, fps: float = FPS, zoom_per_s: float = 0.0) -> Iterator[FramePoses]:
    """A generated match: every player keeps one track; players 0-4 walk, run, jump, crouch and raise
    their arms, the others stand. ``zoom_per_s`` grows every body on screen (a camera zooming in)."""
    for i in range(n_frames):
        t = round(i / fps, 4)
        size = 1.0 + zoom_per_s * t
        poses = []
        for p in range(players):
            role = ROLES[p] if p < len(ROLES) else "stand"
            speed = {"walk": 2.5, "run": 7.0}.get(role, 0.0)  # torso lengths per second
            cx = 100.0 + 40.0 * p + speed * L * t
            posture = {"crouch": "crouch", "arms_up": "arms_up"}.get(role, "stand")
            kps = skeleton(cx, 400.0 + 3.0 * p, posture, _jump_lift(t) if role == "jump" else 0.0)
            if size != 1.0:  # scale around the feet
                kps = [[round(cx + (x - cx) * size, 2), round(400.0 + (y - 400.0) * size, 2), c] for x, y, c in kps]
            poses.append(pose_of(kps, track_id=p + 1, index=p))
        yield FramePoses(frame_index=i, timestamp_s=t, poses=poses)


def as_json(frames: list[FrameActions]) -> str:
    return json.dumps([f.model_dump(mode="json") for f in frames], sort_keys=True)


def primary(frames: list[FrameActions], track_id: int) -> list[str]:
    return [a.action for f in frames for a in f.actions if a.track_id == track_id]


# --- same results as before on clips shorter than the windows ---------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize(
    "config",
    [{}, {"speed_window_s": 1.3, "jump_window_s": 0.7}, {"min_keypoint_confidence": 0.95, "walk_speed": 2.0}],
)
def test_stream_equals_the_whole_clip_computation_on_short_clips(stride, config):
    frames = list(match(200, players=7))[::stride]  # 8 s: inside every window
    for f in frames[::4]:  # an untracked detection now and then
        f.poses[-1].track_id = None
    offsets = {f.frame_index: (0.7 * L * f.timestamp_s, -0.1 * f.frame_index) for f in frames}
    cfg = ClassifierConfig(**config)
    expected = as_json(reference_classify(frames, cfg, offsets))
    assert as_json(classify(frames, cfg, offsets)) == expected
    streamed = list(classify_stream(((f, offsets[f.frame_index]) for f in frames), cfg))
    assert as_json(streamed) == expected
    if not config:  # the input shows every action
        labels = {a.action for f in streamed for a in f.actions}
        assert {"walking", "running", "jumping", "crouching", "arms_raised", "standing"} <= labels


@pytest.mark.fast
def test_single_frame_and_empty_stream():
    frame = next(match(1, players=3))
    assert as_json(list(classify_stream([(frame, NO_OFFSET)]))) == as_json(reference_classify([frame]))
    assert list(classify_stream([])) == []
    empty = FramePoses(frame_index=0, timestamp_s=0.0, poses=[])
    assert list(classify_stream([(empty, NO_OFFSET)])) == [FrameActions(frame_index=0, timestamp_s=0.0, actions=[])]


@pytest.mark.fast
@pytest.mark.parametrize("gap", [(60, 80), (60, 200)])  # 0.8 s: within the windows' reach; 5.6 s: beyond
def test_a_track_seen_again_after_a_gap(gap):
    cfg = ClassifierConfig(scale_window_s=4.0)  # results 2 s behind the input: the stream decides as it goes
    frames = list(match(300, players=3, zoom_per_s=0.05))  # growing bodies: the scale sees the gap
    for f in frames[gap[0] : gap[1]]:  # player 2 leaves
        f.poses = [p for p in f.poses if p.track_id != 2]
    streamed = list(classify_stream(((f, NO_OFFSET) for f in frames), cfg))
    assert as_json(streamed) == as_json(reference_classify(frames, cfg, scale_window_s=4.0))


# --- tracks longer than the scale window -------------------------------------------------------------


@pytest.mark.fast
def test_scale_is_the_median_torso_of_the_centred_window():
    # the camera zooms in: bodies grow 20 % a second, so the window's median differs from the track's
    cfg = ClassifierConfig(scale_window_s=2.0)
    frames = list(match(250, players=6, zoom_per_s=0.2))  # 10 s
    streamed = as_json(classify(frames, cfg))
    assert streamed == as_json(reference_classify(frames, cfg, scale_window_s=2.0))
    assert streamed != as_json(reference_classify(frames, cfg))  # the window matters on this input


def test_a_long_stream_matches_the_brute_force_windows():
    cfg = ClassifierConfig(scale_window_s=8.0)  # 24 s of match: three scale windows
    frames = list(match(600, players=5, zoom_per_s=0.02))
    streamed = list(classify_stream(((f, NO_OFFSET) for f in frames), cfg))
    assert as_json(streamed) == as_json(reference_classify(frames, cfg, scale_window_s=8.0))
    middle = streamed[100:-100]
    assert set(primary(middle, 1)) == {"walking"} and set(primary(middle, 2)) == {"running"}
    assert "jumping" in primary(middle, 3) and set(primary(middle, 4)) == {"crouching"}


# --- bounded memory, constant cost ---------------------------------------------------------------------


def test_a_long_match_is_classified_with_a_bounded_buffer():
    players, n = 22, 2500  # 100 s of match: more than three scale windows
    stream = ActionStream(ClassifierConfig())
    window_frames = int(stream.horizon_s * FPS) + 2
    returned = 0
    held_frames, held_obs = [], []
    for frame in match(n, players):  # a generator: the match is never in memory
        for out in stream.push(frame):
            assert out.frame_index == returned  # every frame, in order,
            assert frame.frame_index - out.frame_index <= window_frames  # with a bounded lag
            returned += 1
        held_frames.append(stream.buffered_frames)
        held_obs.append(stream.buffered_observations)
    rest = stream.finish()
    assert returned + len(rest) == n and rest[-1].frame_index == n - 1
    assert max(held_frames) <= window_frames
    # per player: the frames to decide, the speed and jump entries, the scale window's two halves
    assert max(held_obs) <= 5 * players * window_frames
    # and nothing grows once the windows are full (2 x 15 s of frames)
    filled = int(2 * stream.horizon_s * FPS) + 2
    assert max(held_obs[filled:]) <= max(held_obs[:filled])
    assert {a.action for f in rest for a in f.actions if a.track_id in (1, 2)} == {"walking", "running"}


def test_memory_stays_flat_on_a_long_match():
    # 5 fps so that tracemalloc (slow) sees several scale windows: 400 frames = 80 s
    players, n, fps = 22, 400, 5.0
    stream = ActionStream(ClassifierConfig())
    filled = int(2 * stream.horizon_s * fps) + 2  # frames until the scale window is full
    tracemalloc.start()
    try:
        for frame in match(n, players, fps=fps):
            stream.push(frame)
            if frame.frame_index == filled + 20:
                after_filling = tracemalloc.get_traced_memory()[0]
        at_end, peak = tracemalloc.get_traced_memory()
        stream.finish()
    finally:
        tracemalloc.stop()
    assert at_end < 1.1 * after_filling, (after_filling, at_end)
    # the 400 x 22 poses as objects take ~28 MB; the stream holds ~2 MB
    assert peak < 8 * 1024**2, peak


def test_cost_per_frame_is_constant():
    def cpu_seconds(n: int) -> float:
        frames = list(match(n, players=2))  # made before timing; tracks span the whole stream
        start = time.process_time()
        for _ in classify_stream((f, NO_OFFSET) for f in frames):
            pass
        return time.process_time() - start

    short, long = cpu_seconds(2000), cpu_seconds(8000)
    # linear: ~4x; the whole-track windows it replaced grew ~16x
    assert long / short < 6.0, (short, long)


# --- frame order ------------------------------------------------------------------------------------------


@pytest.mark.fast
def test_frames_out_of_order_are_refused_in_a_stream_and_sorted_in_a_list():
    frames = list(match(30, players=2))
    swapped = [*frames[:10], frames[12], frames[11], frames[10], *frames[13:]]
    with pytest.raises(InputError, match="frame order"):
        list(classify_stream((f, NO_OFFSET) for f in swapped))
    assert as_json(classify(swapped)) == as_json(classify(frames))


# --- camera motion, streamed alongside the poses -----------------------------------------------------------


def reference_camera_offsets(ctx: ToolContext, media: str, poses: list[FramePoses]) -> dict[int, tuple[float, float]]:
    """camera_offsets as it was: the whole poses list in, a dict of every frame's offset out."""
    reader = ctx.media(media)
    boxes = {f.frame_index: [p.box for p in f.poses] for f in poses}
    meter = _PanMeter(reader.width)
    result: dict[int, tuple[float, float]] = {}
    own: list[list[float]] = []
    for frame in reader.frames(1, max(boxes) + 1):
        own = boxes.get(frame.index, own)
        total = meter.update(frame.image, own)
        if frame.index in boxes:
            result[frame.index] = total
    return result


@pytest.fixture(scope="module")
def panning_video(tmp_path_factory) -> Path:
    """40 frames of a textured scene panned 4 px a frame to the left (a camera turning right)."""
    import cv2
    import numpy as np

    folder = tmp_path_factory.mktemp("pan")
    scene = cv2.GaussianBlur(np.random.default_rng(5).integers(0, 255, (240, 900, 3), dtype=np.uint8), (7, 7), 0)
    writer = cv2.VideoWriter(str(folder / "pan.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (480, 240))
    for i in range(40):
        writer.write(np.ascontiguousarray(scene[:, 4 * i : 4 * i + 480]))
    writer.release()
    return folder / "pan.mp4"


def counted(frames: list[FramePoses], pulled: list[int]) -> Iterator[FramePoses]:
    for f in frames:
        pulled.append(f.frame_index)
        yield f


@pytest.mark.fast
@pytest.mark.parametrize("stride", [1, 3])
def test_camera_offsets_stream_reads_the_video_alongside_the_poses(panning_video, stride):
    ctx = ToolContext(media_store=MediaStore(panning_video.parent / "store"), input_roots=[panning_video.parent])
    frames = [
        FramePoses(frame_index=i, timestamp_s=i / FPS, poses=[pose_of(skeleton(100 + i, 200.0), index=0)])
        for i in range(0, 30, stride)
    ]
    pulled: list[int] = []
    paired = camera_offsets(ctx, str(panning_video), counted(frames, pulled))
    first = next(paired)
    assert first[0] is frames[0] and len(pulled) <= 2  # lazy: one frame of lookahead
    rest = list(paired)
    expected = reference_camera_offsets(ctx, str(panning_video), frames)
    assert [(f.frame_index, o) for f, o in [first, *rest]] == list(expected.items())
    assert expected[frames[-1].frame_index][0] < -100  # the pan was measured: content moved left


@pytest.mark.fast
def test_the_tool_streams_its_input_once_and_matches_the_whole_list_result(panning_video):
    ctx = ToolContext(media_store=MediaStore(panning_video.parent / "store"), input_roots=[panning_video.parent])
    frames = list(match(30, players=3))
    pulled: list[int] = []
    streamed = list(action_stream(counted(frames, pulled), ClassifierConfig(), ctx, str(panning_video)))
    assert pulled == list(range(30))  # once, in order, never len()
    offsets = reference_camera_offsets(ctx, str(panning_video), frames)
    assert as_json(streamed) == as_json(reference_classify(frames, ClassifierConfig(), offsets))
    assert as_json(streamed) != as_json(reference_classify(frames))  # the camera's pan was removed
    from forgeflow.plugins.builtin.classifier import plugin

    tool = plugin.tools["classify_actions"]
    out = tool.invoke({}, {"media": str(panning_video), "poses": [f.model_dump() for f in frames]}, ctx)
    assert json.dumps(out["actions"], sort_keys=True) == json.dumps(json.loads(as_json(streamed)), sort_keys=True)
    # a single frame shows no motion: the video is not read
    single = list(action_stream(iter(frames[5:6]), ClassifierConfig(), ctx, str(panning_video.parent / "missing.mp4")))
    assert as_json(single) == as_json(reference_classify(frames[5:6]))


def test_scale_window_config_is_bounded():
    from forgeflow.plugins.builtin.classifier import plugin
    from forgeflow.plugins.errors import ConfigError

    tool = plugin.tools["classify_actions"]
    assert tool.parse_config({}).scale_window_s == 30.0
    assert tool.parse_config({"scale_window_s": 60}).scale_window_s == 60.0
    for bad in (0, 121):
        with pytest.raises(ConfigError, match="scale_window_s"):
            tool.parse_config({"scale_window_s": bad})
