"""The classifier's rules on synthetic keypoint sequences (no model: fast and exact)."""

from __future__ import annotations

import json
import math

import pytest

from forgeflow.plugins.builtin.classifier import STILL_CLASSES, ClassifierConfig, classify
from forgeflow.plugins.builtin.schemas import FramePoses, Pose
from forgeflow.plugins.errors import ConfigError

pytestmark = pytest.mark.fast

FPS = 25.0
L = 60.0  # torso length in pixels


def skeleton(
    cx: float, ground: float, posture: str = "stand", lift: float = 0.0, conf: float = 0.9
) -> list[list[float]]:
    """17 COCO keypoints of a person whose feet are at (cx, ground - lift*L), torso length L."""
    g = ground - lift * L
    if posture == "crouch":
        hip_y, knee = g - 0.9 * L, (0.6 * L, g - 0.5 * L)
    else:
        hip_y, knee = g - 1.7 * L, (0.0, g - 0.85 * L)
    sh_y = hip_y - L
    if posture == "arms_up":
        elbow_y, wrist_y = sh_y - 0.4 * L, sh_y - 0.9 * L
    else:
        elbow_y, wrist_y = sh_y + 0.5 * L, sh_y + 1.0 * L
    pts = [
        (cx, sh_y - 0.45 * L),  # nose
        (cx - 0.1 * L, sh_y - 0.55 * L),
        (cx + 0.1 * L, sh_y - 0.55 * L),  # eyes
        (cx - 0.2 * L, sh_y - 0.5 * L),
        (cx + 0.2 * L, sh_y - 0.5 * L),  # ears
        (cx - 0.35 * L, sh_y),
        (cx + 0.35 * L, sh_y),  # shoulders
        (cx - 0.45 * L, elbow_y),
        (cx + 0.45 * L, elbow_y),  # elbows
        (cx - 0.45 * L, wrist_y),
        (cx + 0.45 * L, wrist_y),  # wrists
        (cx - 0.2 * L, hip_y),
        (cx + 0.2 * L, hip_y),  # hips
        (cx - 0.2 * L + knee[0], knee[1]),
        (cx + 0.2 * L + knee[0], knee[1]),  # knees
        (cx - 0.2 * L, g),
        (cx + 0.2 * L, g),  # ankles
    ]
    if posture == "lying":  # the standing body turned 90 degrees around its feet
        pts = [(cx + (ground - y), ground - 0.2 * L + (x - cx) * 0.5) for x, y in pts]
    return [[round(x, 2), round(y, 2), conf] for x, y in pts]


def pose_of(kps: list[list[float]], track_id: int | None = 1, index: int = 0) -> Pose:
    xs, ys = [k[0] for k in kps], [k[1] for k in kps]
    box = [min(xs) - 5, min(ys) - 10, max(xs) + 5, max(ys) + 5]
    return Pose(track_id=track_id, player_index=index, box=box, confidence=0.9, match_iou=0.9, keypoints=kps)


def sequence(n: int, cx_of, posture_of=lambda t: "stand", lift_of=lambda t: 0.0) -> list[FramePoses]:
    frames = []
    for i in range(n):
        t = round(i / FPS, 4)
        kps = skeleton(cx_of(t), 400.0, posture_of(t), lift_of(t))
        frames.append(FramePoses(frame_index=i, timestamp_s=t, poses=[pose_of(kps)]))
    return frames


def actions(frames: list[FramePoses], **cfg) -> list[str]:
    return [f.actions[0].action for f in classify(frames, ClassifierConfig(**cfg))]


def middle(labels: list[str]) -> list[str]:
    return labels[8:-8]  # away from the ends of the speed window


def test_standing_still():
    labels = actions(sequence(50, lambda t: 300.0))
    assert set(labels) == {"standing"}


def test_walking():
    labels = actions(sequence(50, lambda t: 100.0 + 2.5 * L * t))  # 2.5 torso lengths/s ~ 1.25 m/s
    assert set(middle(labels)) == {"walking"}


def test_running():
    labels = actions(sequence(50, lambda t: 100.0 + 7.0 * L * t))  # 7 torso lengths/s ~ 3.5 m/s
    assert set(middle(labels)) == {"running"}


def test_speed_is_in_body_lengths_per_second_and_uses_timestamps():
    frames = sequence(50, lambda t: 100.0 + 2.5 * L * t)
    speeds = [f.actions[0].speed for f in classify(frames)][10:-10]
    assert all(math.isclose(s, 2.5, abs_tol=0.05) for s in speeds)
    # every other frame (stride 2): same speed, since the rules use timestamps, not frame counts
    halved = classify(frames[::2])
    assert all(math.isclose(f.actions[0].speed, 2.5, abs_tol=0.05) for f in halved[5:-5])


def test_jumping():
    def lift(t: float) -> float:  # a 0.5 s jump, 0.8 torso lengths high at its apex (t = 1.05 s)
        return 0.8 * math.sin(math.pi * (t - 0.8) / 0.5) if 0.8 <= t <= 1.3 else 0.0

    labels = actions(sequence(60, lambda t: 300.0, lift_of=lift))
    assert labels[26] == "jumping"  # the apex
    assert labels[:15] == ["standing"] * 15
    assert labels[40:] == ["standing"] * 20


def test_arms_raised():
    labels = actions(sequence(30, lambda t: 300.0, posture_of=lambda t: "arms_up"))
    assert set(labels) == {"arms_raised"}
    result = classify(sequence(30, lambda t: 300.0, posture_of=lambda t: "arms_up"))
    assert result[15].actions[0].labels == ["arms_raised", "standing"]


def test_running_with_arms_raised_keeps_both_labels():
    result = classify(sequence(50, lambda t: 100.0 + 7.0 * L * t, posture_of=lambda t: "arms_up"))
    mid = result[25].actions[0]
    assert mid.action == "running" and mid.labels == ["running", "arms_raised"]


def test_crouching_is_not_a_jump_when_standing_up():
    labels = actions(sequence(50, lambda t: 300.0, posture_of=lambda t: "crouch" if t < 1.0 else "stand"))
    assert labels[:20] == ["crouching"] * 20
    assert "jumping" not in labels


def test_still_image_shows_only_still_classes():
    for posture, expected in (
        ("stand", "standing"),
        ("arms_up", "arms_raised"),
        ("crouch", "crouching"),
        ("lying", "lying"),
    ):
        frame = FramePoses(frame_index=0, timestamp_s=0.0, poses=[pose_of(skeleton(300, 400, posture))])
        action = classify([frame])[0].actions[0]
        assert action.action == expected, posture
        assert set(action.labels) <= set(STILL_CLASSES)
        assert action.speed is None
        assert 0.0 < action.confidence <= 1.0


def test_untracked_player_gets_still_rules_only():
    frames = sequence(30, lambda t: 100.0 + 7.0 * L * t)
    for f in frames:
        f.poses[0].track_id = None
    result = classify(frames)
    assert {f.actions[0].action for f in result} == {"standing"}
    assert all(f.actions[0].speed is None for f in result)


def test_camera_pan_is_removed():
    # the person stands still; the camera pans, so in the image they move at 'walking' speed
    frames = sequence(50, lambda t: 100.0 + 2.5 * L * t)
    offsets = {f.frame_index: (2.5 * L * f.timestamp_s, 0.0) for f in frames}
    result = classify(frames, camera_offsets=offsets)
    assert {f.actions[0].action for f in result} == {"standing"}


def test_too_few_keypoints():
    # an upright box still says 'standing', with a low confidence
    upright = pose_of(skeleton(300, 400, conf=0.05))
    action = classify([FramePoses(frame_index=0, timestamp_s=0.0, poses=[upright])])[0].actions[0]
    assert action.action == "standing" and action.confidence == 0.45
    # anything else: unknown
    wide = upright.model_copy(update={"box": [0.0, 0.0, 200.0, 100.0]})
    action = classify([FramePoses(frame_index=0, timestamp_s=0.0, poses=[wide])])[0].actions[0]
    assert action.action == "unknown" and action.confidence == 0.0 and action.labels == []


def test_deterministic_and_ordered():
    frames = sequence(40, lambda t: 100.0 + 2.5 * L * t)
    for f in frames:  # two players, listed in reverse order
        extra = pose_of(skeleton(500.0, 400.0), track_id=7, index=1)
        f.poses.insert(0, extra)
    before = json.dumps([f.model_dump(mode="json") for f in frames], sort_keys=True)
    a = json.dumps([f.model_dump(mode="json") for f in classify(frames)], sort_keys=True)
    copies = [FramePoses.model_validate(f.model_dump()) for f in frames]  # the same input, built anew
    b = json.dumps([f.model_dump(mode="json") for f in classify(copies)], sort_keys=True)
    assert a == b
    assert json.dumps([f.model_dump(mode="json") for f in frames], sort_keys=True) == before  # input untouched
    assert '"action":"walking"' in a.replace(" ", "") and '"track_id":7' in a.replace(" ", "")
    first = classify(frames)[0].actions
    assert [x.track_id for x in first] == [1, 7]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, {"camera_motion": "auto", "walk_speed": 1.0, "run_speed": 4.0, "min_keypoint_confidence": 0.3}),
        (
            {"camera_motion": "off", "walk_speed": 0.8},
            {"camera_motion": "off", "walk_speed": 0.8, "run_speed": 4.0, "min_keypoint_confidence": 0.3},
        ),
    ],
)
def test_config_validates(config, expected):
    from forgeflow.plugins.builtin.classifier import plugin

    parsed = plugin.tools["classify_actions"].parse_config(config)
    assert isinstance(parsed, ClassifierConfig)
    assert {name: getattr(parsed, name) for name in expected} == expected


@pytest.mark.parametrize(
    "config",
    [
        {"camera_motion": "on"},
        {"walk_speed": 0},
        {"min_keypoint_confidence": 1.5},
        {"crouch_knee_angle": 180},
        {"speed_window_s": 11},
        {"walkspeed": 1.0},
    ],
)
def test_bad_config_is_a_config_error_naming_the_field(config):
    from forgeflow.plugins.builtin.classifier import plugin

    with pytest.raises(ConfigError, match=r"classifier\.classify_actions: invalid config") as info:
        plugin.tools["classify_actions"].parse_config(config)
    assert next(iter(config)) in str(info.value)


def test_config_thresholds_change_the_labels():
    frames = sequence(50, lambda t: 100.0 + 2.5 * L * t)  # 2.5 torso lengths/s
    assert set(middle(actions(frames))) == {"walking"}
    assert set(middle(actions(frames, walk_speed=3.0))) == {"standing"}
    assert set(middle(actions(frames, run_speed=2.0))) == {"running"}
