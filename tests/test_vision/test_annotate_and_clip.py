"""annotate_media writes a readable image or H.264 video; the sample clip is readable and reproducible."""

from __future__ import annotations

import hashlib

import pytest

from forgeflow.cli.sample_clip import make_sample_clip
from forgeflow.jobs.annotate import annotate_media, ffmpeg_exe
from forgeflow.jobs.annotated_media import layers_of
from forgeflow.plugins.builtin import classifier, pose_estimator, yolo_tracker
from forgeflow.plugins.errors import MediaError, MediaNotFound
from tests.conftest import video_frames_and_size

# With pytest-xdist (--dist loadgroup) one worker runs the whole group: the session's vision fixtures
# (sample clip, models, inference results) are made once.
pytestmark = pytest.mark.xdist_group("vision")

#: What the soccer pipeline's tools declare to draw: players as boxes, poses, actions as labels.
SOCCER_LAYERS = layers_of(
    [
        yolo_tracker.plugin.tools["track_players"],
        pose_estimator.plugin.tools["estimate_poses"],
        classifier.plugin.tools["classify_actions"],
    ]
)


def test_the_soccer_tools_declare_what_their_annotated_media_draws():
    assert SOCCER_LAYERS == {"boxes": "players", "poses": "poses", "labels": "actions"}


def test_sample_clip_is_readable_and_reproducible(sample_clip, tmp_path):
    import cv2

    cap = cv2.VideoCapture(str(sample_clip))
    assert cap.isOpened()
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (640, 360)
    assert cap.get(cv2.CAP_PROP_FPS) == 25.0
    frames = 0
    while cap.read()[0]:
        frames += 1
    cap.release()
    assert frames == 64
    again = make_sample_clip(tmp_path / "again.mp4")
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(sample_clip.read_bytes()).digest()
    assert sample_clip.read_bytes()[4:8] == b"ftyp"


def test_sample_clip_options(tmp_path):
    import cv2

    path = make_sample_clip(tmp_path / "short.mp4", frames=8, size=(320, 180), fps=10)
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == 8 and cap.get(cv2.CAP_PROP_FRAME_WIDTH) == 320
    cap.release()
    with pytest.raises(ValueError):
        make_sample_clip(tmp_path / "one.mp4", frames=1)


@pytest.mark.vision
def test_annotate_image(bus_result, assets, tmp_path):
    import cv2
    import numpy as np

    out = annotate_media(assets / "bus.jpg", bus_result, tmp_path / "bus.png", layers=SOCCER_LAYERS)
    assert (out.path, out.kind, out.frames) == (tmp_path / "bus.png", "image", None)
    drawn, source = cv2.imread(str(out.path)), cv2.imread(str(assets / "bus.jpg"))
    assert drawn.shape == source.shape
    assert np.abs(drawn.astype(int) - source.astype(int)).sum() > 0  # something was drawn
    # no image suffix: written as JPEG
    assert (
        annotate_media(assets / "bus.jpg", bus_result, tmp_path / "bus-annotated", layers=SOCCER_LAYERS).path.suffix
        == ".jpg"
    )


def _video_codec(path):
    """The codec line of the first video stream, as ``ffmpeg -i`` reports it."""
    import subprocess

    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True, timeout=60)
    return next(line for line in probe.stderr.splitlines() if "Video:" in line)


@pytest.mark.vision
def test_annotate_video(clip_result, sample_clip, tmp_path):
    out = annotate_media(sample_clip, clip_result, tmp_path / "clip.avi", layers=SOCCER_LAYERS)
    assert (out.path.suffix, out.kind, out.frames) == (".mp4", "video", 64)
    assert video_frames_and_size(out.path) == (64, (640, 360))
    codec = _video_codec(out.path)
    assert "h264" in codec and "avc1" in codec and "yuv420p" in codec, codec  # what browsers play
    assert not list(tmp_path.glob(".*partial*"))  # the temporary file became the output


def test_annotate_video_of_odd_size_is_padded_to_even(tmp_path):
    import subprocess

    import numpy as np

    # OpenCV's writers crop to even sizes: ffmpeg writes the 161x91 source (lossless FFV1 in Matroska)
    source = tmp_path / "odd.mkv"
    frames = b"".join(np.full((91, 161, 3), 40 * i, dtype=np.uint8).tobytes() for i in range(5))
    command = [ffmpeg_exe(), "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", "161x91"]
    command += ["-r", "10", "-i", "-", "-c:v", "ffv1", str(source)]
    subprocess.run(command, input=frames, check=True, timeout=60)
    assert video_frames_and_size(source) == (5, (161, 91))
    # players on every frame: the video annotates what was analysed (all 5 frames here)
    result = {
        "players": [{"frame_index": i, "players": [{"box": [5, 5, 60, 80], "confidence": 0.8}]} for i in range(5)]
    }
    out = annotate_media(source, result, tmp_path / "odd.mp4", layers=SOCCER_LAYERS)
    assert out.frames == 5
    assert video_frames_and_size(out.path) == (5, (162, 92))
    assert "h264" in _video_codec(out.path)


def test_annotate_partial_result_and_errors(sample_clip, tmp_path):
    # a result with players only (a failed pose stage's partial result) still draws
    partial = {
        "players": [
            {
                "frame_index": 0,
                "timestamp_s": 0.0,
                "players": [{"box": [10, 10, 100, 200], "confidence": 0.9, "track_id": 1}],
            }
        ]
    }
    assert annotate_media(sample_clip, partial, tmp_path / "partial.mp4", layers=SOCCER_LAYERS).path.is_file()
    with pytest.raises(MediaNotFound):
        annotate_media(tmp_path / "missing.mp4", partial, tmp_path / "x.mp4", layers=SOCCER_LAYERS)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not media at all")
    with pytest.raises(MediaError):
        annotate_media(junk, partial, tmp_path / "x.mp4", layers=SOCCER_LAYERS)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(sample_clip.read_bytes()[:64])  # an MP4 header and no frames
    with pytest.raises(MediaError):
        annotate_media(truncated, partial, tmp_path / "x.mp4", layers=SOCCER_LAYERS)
    assert not (tmp_path / "x.mp4").exists()


def test_an_encoder_failure_is_a_media_error_with_ffmpegs_words(sample_clip, tmp_path, monkeypatch):
    import forgeflow.jobs.annotate as annotate

    monkeypatch.setattr(annotate, "H264_OPTIONS", ("-c:v", "no-such-encoder", "-f", "mp4"))
    partial = {"players": [{"frame_index": 0, "players": [{"box": [10, 10, 100, 200], "confidence": 0.9}]}]}
    with pytest.raises(MediaError) as failed:
        annotate_media(sample_clip, partial, tmp_path / "x.mp4", layers=SOCCER_LAYERS)
    assert "ffmpeg failed" in failed.value.message and "no-such-encoder" in failed.value.message
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*"))
