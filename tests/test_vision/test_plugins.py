"""The three vision plugins with real inference on the CPU (yolo11n-pose, bus.jpg, zidane.jpg, the sample clip)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from forgeflow.plugins.builtin.classifier import PRECEDENCE, STILL_CLASSES
from forgeflow.plugins.errors import ConfigError, DeviceUnavailable

# With pytest-xdist (--dist loadgroup) one worker runs the whole group: the session's vision fixtures
# (sample clip, models, inference results) are made once.
pytestmark = pytest.mark.xdist_group("vision")

CLIP_SHOT = 32  # the sample clip: frames 0-31 pan over bus.jpg, frames 32-63 over zidane.jpg


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# --- discovery and availability (no inference) -------------------------------------------------


def test_plugin_modules_import_without_torch_or_ultralytics():
    code = (
        "import sys\n"
        "import forgeflow.plugins.builtin.yolo_tracker, forgeflow.plugins.builtin.pose_estimator\n"
        "import forgeflow.plugins.builtin.classifier, forgeflow.jobs.annotate\n"
        "import forgeflow.cli.sample_clip\n"
        "heavy = [m for m in ('torch', 'ultralytics', 'cv2') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_registry_finds_the_plugins_and_aliases(registry):
    for name, alias in (("forgesyte-yolo-tracker", "videotracker"), ("pose-estimator", "pose"), ("classifier", None)):
        entry = registry.resolve(alias or name)
        assert entry.name == name and entry.available, entry.unavailable_reason
    assert set(registry.resolve("videotracker").plugin.tools) == {"detect_players", "track_players"}
    assert set(registry.resolve("pose").plugin.tools) == {"estimate_poses"}
    assert set(registry.resolve("classifier").plugin.tools) == {"classify_actions"}
    # workers import torch and Ultralytics at start, outside a call's memory budget
    for name in ("videotracker", "pose"):
        assert registry.resolve(name).plugin.preload == ("forgeflow.plugins.builtin._preload",)


def test_missing_weights_make_the_plugins_unavailable(monkeypatch):
    from forgeflow.plugins.builtin import _vision, pose_estimator, yolo_tracker

    monkeypatch.setattr(_vision, "bundled_pose_weights", lambda: None)
    for plugin in (yolo_tracker.plugin, pose_estimator.plugin):
        reason = plugin.unavailable_reason()
        assert reason and "yolo11n-pose.pt" in reason


def test_the_seed_configs_validate(get_tool):
    detect = get_tool("yolo_tracker", "detect_players")
    assert detect.parse_config({"device": "cuda", "confidence": 0.25}).device == "cuda"
    assert get_tool("pose_estimator", "estimate_poses").parse_config({"model": "light"}).model == "light"
    assert get_tool("classifier", "classify_actions").parse_config({}).camera_motion == "auto"
    for bad in ({"device": "gpu"}, {"confidence": 2}, {"model": "../x.pt"}, {"frame_stride": 0}, {"nope": 1}):
        with pytest.raises(ConfigError):
            detect.parse_config(bad)


def test_stage_schemas_are_compatible():
    """The engine checks stage N's output against stage N+1's input from the JSON Schemas."""
    from forgeflow.pipeline.compat import field_schema, incompatibility
    from forgeflow.plugins.builtin import classifier, pose_estimator, yolo_tracker

    detect = yolo_tracker.plugin.tools["detect_players"].schemas()
    track = yolo_tracker.plugin.tools["track_players"].schemas()
    pose = pose_estimator.plugin.tools["estimate_poses"].schemas()
    classify = classifier.plugin.tools["classify_actions"].schemas()
    for out, inp, name in ((detect, pose, "players"), (track, pose, "players"), (pose, classify, "poses")):
        src, src_defs = field_schema(out["output"], name)
        dst, dst_defs = field_schema(inp["input"], name)
        assert incompatibility(src, dst, src_defs, dst_defs) is None


# --- device ------------------------------------------------------------------------------------


def test_cuda_on_a_host_without_gpu_is_a_clear_error(vision_ctx, assets, get_tool):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA GPU")
    for tool, cfg in (
        (get_tool("yolo_tracker", "detect_players"), {"device": "cuda", "confidence": 0.25}),
        (get_tool("pose_estimator", "estimate_poses"), {"device": "cuda:0"}),
    ):
        with pytest.raises(DeviceUnavailable, match="no CUDA GPU is available"):
            tool.invoke(cfg, {"media": str(assets / "bus.jpg"), "players": []}, vision_ctx)


@pytest.mark.gpu
@pytest.mark.vision
def test_detect_on_cuda(vision_ctx, assets, get_tool):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this host")
    out = get_tool("yolo_tracker", "detect_players").invoke(
        {"device": "cuda", "confidence": 0.25}, {"media": str(assets / "bus.jpg")}, vision_ctx
    )
    assert len(out["players"][0]["players"]) == 4


def test_cuda_index_beyond_the_devices_is_an_error():
    import torch

    from forgeflow.plugins.builtin._vision import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceUnavailable):
        resolve_device("cuda:97")


# --- images ------------------------------------------------------------------------------------


@pytest.mark.vision
@pytest.mark.parametrize("name, people", [("bus", 4), ("zidane", 2)])
def test_image_players_poses_actions(name, people, request):
    result = request.getfixturevalue(f"{name}_result")
    assert set(result) == {"players", "poses", "actions"}
    (players,) = result["players"]
    (poses,) = result["poses"]
    (actions,) = result["actions"]
    assert players["frame_index"] == poses["frame_index"] == actions["frame_index"] == 0
    assert len(players["players"]) == people
    assert len(poses["poses"]) == people
    assert len(actions["actions"]) == people
    # still image: ids 1..n from left to right
    assert [p["track_id"] for p in players["players"]] == list(range(1, people + 1))
    xs = [p["box"][0] for p in players["players"]]
    assert xs == sorted(xs)
    for pose in poses["poses"]:
        player = players["players"][pose["player_index"]]
        assert pose["track_id"] == player["track_id"]
        assert pose["match_iou"] >= 0.3
        assert len(pose["keypoints"]) == 17 and all(len(k) == 3 for k in pose["keypoints"])
    for player in players["players"]:
        assert player["class_name"] == "person" and player["class_id"] == 0
        assert 0.25 <= player["confidence"] <= 1
        x1, y1, x2, y2 = player["box"]
        assert x2 > x1 and y2 > y1
    for action in actions["actions"]:
        assert action["action"] in STILL_CLASSES
        assert set(action["labels"]) <= set(STILL_CLASSES)
        assert action["speed"] is None


@pytest.mark.vision
def test_same_image_twice_is_byte_identical(vision_ctx, assets, bus_result, soccer):
    assert canonical(soccer(vision_ctx, str(assets / "bus.jpg"))) == canonical(bus_result)


@pytest.mark.vision
def test_values_are_rounded(bus_result):
    for player in bus_result["players"][0]["players"]:
        assert all(round(v, 2) == v for v in player["box"])
        assert round(player["confidence"], 4) == player["confidence"]


# --- video -------------------------------------------------------------------------------------


@pytest.mark.vision
def test_clip_frames_line_up_across_stages(clip_result):
    indices = [f["frame_index"] for f in clip_result["players"]]
    assert indices == list(range(64))
    assert [f["frame_index"] for f in clip_result["poses"]] == indices
    assert [f["frame_index"] for f in clip_result["actions"]] == indices
    assert [f["timestamp_s"] for f in clip_result["players"]][:3] == [0.0, 0.04, 0.08]  # 25 fps


@pytest.mark.vision
def test_track_ids_are_stable_across_the_clip(clip_result):
    shots = (clip_result["players"][:CLIP_SHOT], clip_result["players"][CLIP_SHOT:])
    ids_per_shot = []
    for shot, people in zip(shots, (4, 2), strict=True):
        counts = Counter(p["track_id"] for f in shot for p in f["players"] if p["track_id"] is not None)
        ids_per_shot.append(set(counts))
        # the clearly visible people keep one id for the whole shot, no id switches or duplicates
        steady = [tid for tid, n in counts.items() if n == len(shot)]
        assert len(steady) >= min(people, 2), counts
        assert len(counts) <= people, counts
        for frame in shot:
            ids = [p["track_id"] for p in frame["players"] if p["track_id"] is not None]
            assert len(ids) == len(set(ids))
    # the scene cut retires the first shot's tracks: no id continues into the other photo
    assert not (ids_per_shot[0] & ids_per_shot[1])


@pytest.mark.vision
def test_clip_poses_follow_their_players(clip_result):
    for players, poses in zip(clip_result["players"], clip_result["poses"], strict=True):
        for pose in poses["poses"]:
            assert pose["track_id"] == players["players"][pose["player_index"]]["track_id"]
        tracked = [p for p in players["players"] if p["track_id"] is not None]
        assert len(poses["poses"]) >= len(tracked) - 1


@pytest.mark.vision
def test_clip_actions_see_through_the_camera_pan(clip_result):
    """The people in the photos stand still; only the camera moves. Camera-motion compensation
    must keep every tracked, measured player below walking speed."""
    for frame in clip_result["actions"]:
        for action in frame["actions"]:
            assert action["action"] in PRECEDENCE or action["action"] == "unknown"
            if action["track_id"] is not None and action["speed"] is not None:
                assert action["action"] in ("standing", "arms_raised", "crouching"), frame["frame_index"]
                assert action["speed"] < 1.0


@pytest.mark.vision
def test_same_video_twice_is_byte_identical(vision_ctx, sample_clip, clip_result, get_tool):
    """Tracking is causal, so the first 12 frames of a second run equal those of the first."""
    cfg = {"device": "cpu", "imgsz": 320, "max_frames": 12}
    players = get_tool("yolo_tracker", "detect_players").invoke(cfg, {"media": str(sample_clip)}, vision_ctx)
    assert canonical(players["players"]) == canonical(clip_result["players"][:12])
    poses = get_tool("pose_estimator", "estimate_poses").invoke(
        {"device": "cpu", "imgsz": 320}, {"media": str(sample_clip), **players}, vision_ctx
    )
    assert canonical(poses["poses"]) == canonical(clip_result["poses"][:12])
    actions = [
        get_tool("classifier", "classify_actions").invoke(
            {}, {"media": str(sample_clip), "poses": clip_result["poses"]}, vision_ctx
        )
        for _ in range(2)
    ]
    assert canonical(actions[0]) == canonical(actions[1]) == canonical({"actions": clip_result["actions"]})


@pytest.mark.vision
def test_track_players_stride_and_summary(vision_ctx, sample_clip, get_tool):
    out = get_tool("yolo_tracker", "track_players").invoke(
        {"device": "cpu", "imgsz": 320, "frame_stride": 4, "max_frames": 8}, {"media": str(sample_clip)}, vision_ctx
    )
    assert [f["frame_index"] for f in out["players"]] == [0, 4, 8, 12, 16, 20, 24, 28]
    assert out["tracks"] and all(t["first_frame"] <= t["last_frame"] for t in out["tracks"])
    seen = {p["track_id"] for f in out["players"] for p in f["players"] if p["track_id"] is not None}
    assert seen == {t["track_id"] for t in out["tracks"]}
    # pose follows detection's frames whatever its stride
    poses = get_tool("pose_estimator", "estimate_poses").invoke(
        {"device": "cpu", "imgsz": 320}, {"media": str(sample_clip), "players": out["players"]}, vision_ctx
    )
    assert [f["frame_index"] for f in poses["poses"]] == [0, 4, 8, 12, 16, 20, 24, 28]


@pytest.mark.vision
def test_detection_and_pose_report_frames_as_progress(vision_ctx, sample_clip, get_tool):
    from dataclasses import replace

    detect_reports: list[dict] = []
    ctx = replace(vision_ctx, progress_sink=detect_reports.append, progress_interval_s=0)
    cfg = {"device": "cpu", "imgsz": 320, "frame_stride": 4, "max_frames": 8, "batch": 2}
    players = get_tool("yolo_tracker", "detect_players").invoke(cfg, {"media": str(sample_clip)}, ctx)
    # per batch of 2; the closing report repeats the last batch's, so it is not sent again
    assert [r["done"] for r in detect_reports] == [2, 4, 6, 8]
    assert {r["total"] for r in detect_reports} == {8}
    assert detect_reports[-1] == {"done": 8, "total": 8, "message": "8/8 frames"}

    pose_reports: list[dict] = []
    ctx = replace(vision_ctx, progress_sink=pose_reports.append, progress_interval_s=0)
    get_tool("pose_estimator", "estimate_poses").invoke(
        {"device": "cpu", "imgsz": 320}, {"media": str(sample_clip), **players}, ctx
    )
    assert [r["done"] for r in pose_reports] == list(range(1, 9))
    assert pose_reports[-1] == {"done": 8, "total": 8, "message": "8/8 frames"}


# --- models ------------------------------------------------------------------------------------


def test_model_names_and_paths(tmp_path):
    from forgeflow.plugins.builtin._vision import bundled_pose_weights, resolve_weights

    assert resolve_weights("light") == bundled_pose_weights()
    assert resolve_weights(str(bundled_pose_weights())) == bundled_pose_weights()
    with pytest.raises(ConfigError, match="not found"):
        resolve_weights(str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="unknown model 'heavy'"):
        resolve_weights("heavy")


def test_missing_model_file_fails_the_tool(vision_ctx, assets, tmp_path, get_tool):
    with pytest.raises(ConfigError, match="model weights not found"):
        get_tool("yolo_tracker", "detect_players").invoke(
            {"device": "cpu", "model": str(tmp_path / "nope.pt")}, {"media": str(assets / "bus.jpg")}, vision_ctx
        )


def test_quiet_offline_setup(vision_ctx, assets, get_tool, capfd):
    """No banner, no settings message, no download: Ultralytics runs offline from a private config dir."""
    import os

    get_tool("yolo_tracker", "detect_players").invoke(
        {"device": "cpu", "imgsz": 64}, {"media": str(assets / "zidane.jpg")}, vision_ctx
    )
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "False"
    font_dir = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics"
    assert (font_dir / "Arial.ttf").is_file() and (font_dir / "Arial.Unicode.ttf").is_file()
