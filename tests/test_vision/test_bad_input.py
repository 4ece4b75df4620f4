"""Bad input gives a clear error from the stage (a MediaError family error, a ConfigError or an
InputError), never a crash or a silent empty result."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from forgeflow.plugins.errors import ForgeFlowError, InputError, MediaError, MediaNotFound, MediaTooLarge

# With pytest-xdist (--dist loadgroup) one worker runs the whole group: the session's vision fixtures
# (sample clip, models, inference results) are made once.
pytestmark = pytest.mark.xdist_group("vision")


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\x00" * 64
    )


@pytest.fixture(scope="module")
def bad_dir(vision_dir: Path, sample_clip: Path) -> Path:
    import cv2

    folder = vision_dir / "bad"
    folder.mkdir(exist_ok=True)
    clip = sample_clip.read_bytes()
    (folder / "truncated.mp4").write_bytes(clip[: len(clip) // 2])
    (folder / "corrupt.mp4").write_bytes(clip[:32] + bytes(range(256)) * 64)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10)
    (folder / "huge.png").write_bytes(_png_header(100_000, 100_000))
    (folder / "notmedia.txt").write_bytes(b"hello, I am text")
    writer = cv2.VideoWriter(str(folder / "noframes.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (64, 64))
    writer.release()  # a container with no frames at all
    return folder


CASES = [
    ("truncated.mp4", MediaError, "corrupt or truncated"),
    ("corrupt.mp4", MediaError, "corrupt or truncated"),
    ("empty.jpg", MediaError, "empty"),
    ("garbage.jpg", MediaError, "cannot decode image"),
    ("huge.png", MediaTooLarge, "over the limit"),
    ("notmedia.txt", MediaError, "unsupported"),
    ("noframes.mp4", MediaError, "video"),
    ("missing.mp4", MediaNotFound, "not found"),
]


@pytest.mark.parametrize("tool_id", [("yolo_tracker", "detect_players"), ("pose_estimator", "estimate_poses")])
@pytest.mark.parametrize("name, error, text", CASES)
def test_bad_media_is_a_clear_error(bad_dir, vision_ctx, get_tool, tool_id, name, error, text):
    tool = get_tool(*tool_id)
    inputs = {"media": str(bad_dir / name), "players": [{"frame_index": 0, "timestamp_s": 0.0, "players": []}]}
    with pytest.raises(error, match=text) as info:
        tool.invoke({"device": "cpu"}, inputs, vision_ctx)
    assert isinstance(info.value, ForgeFlowError) and info.value.error_type.startswith("Media")


def test_path_outside_the_media_roots(vision_ctx, get_tool):
    with pytest.raises(MediaError, match="outside the allowed media roots"):
        get_tool("yolo_tracker", "detect_players").invoke({"device": "cpu"}, {"media": "/etc/hostname"}, vision_ctx)


def test_relative_path_and_unknown_ref(vision_ctx, get_tool):
    detect = get_tool("yolo_tracker", "detect_players")
    with pytest.raises(MediaError, match="must be absolute"):
        detect.invoke({"device": "cpu"}, {"media": "bus.jpg"}, vision_ctx)
    with pytest.raises(MediaNotFound, match="unknown media ref"):
        detect.invoke({"device": "cpu"}, {"media": "sha256:" + "0" * 64}, vision_ctx)
    with pytest.raises(MediaError, match="malformed media ref"):
        detect.invoke({"device": "cpu"}, {"media": "sha256:abc"}, vision_ctx)


def test_missing_media_field_is_an_input_error(vision_ctx, get_tool):
    with pytest.raises(InputError, match="media"):
        get_tool("yolo_tracker", "detect_players").invoke({"device": "cpu"}, {}, vision_ctx)


def test_players_from_another_media(vision_ctx, assets, sample_clip, get_tool):
    pose = get_tool("pose_estimator", "estimate_poses")
    far = [{"frame_index": 500, "timestamp_s": 20.0, "players": [{"box": [0, 0, 10, 10], "confidence": 0.9}]}]
    with pytest.raises(InputError, match="single image"):
        pose.invoke({"device": "cpu"}, {"media": str(assets / "bus.jpg"), "players": far}, vision_ctx)
    with pytest.raises(MediaError, match="does not have"):
        pose.invoke({"device": "cpu"}, {"media": str(sample_clip), "players": far}, vision_ctx)


def test_malformed_players_are_an_input_error(vision_ctx, assets, get_tool):
    bad = [{"frame_index": 0, "timestamp_s": 0.0, "players": [{"box": [1, 2, 3], "confidence": 0.9}]}]
    with pytest.raises(InputError, match="box"):
        get_tool("pose_estimator", "estimate_poses").invoke(
            {}, {"media": str(assets / "bus.jpg"), "players": bad}, vision_ctx
        )


def test_frame_limit_of_the_host(vision_dir, assets, sample_clip, get_tool):
    """The host's max_frames caps a stage even where the config asks for more."""
    from forgeflow.plugins import MediaStore, ToolContext

    ctx = ToolContext(media_store=MediaStore(vision_dir / "media"), input_roots=[vision_dir], max_frames=3)
    out = get_tool("yolo_tracker", "detect_players").invoke(
        {"device": "cpu", "imgsz": 64, "max_frames": 100}, {"media": str(sample_clip)}, ctx
    )
    assert [f["frame_index"] for f in out["players"]] == [0, 1, 2]
