"""annotate_media writes a readable image or video; the sample clip is readable and reproducible."""

from __future__ import annotations

import hashlib

import pytest

from forgeflow.cli.annotate import annotate_media
from forgeflow.cli.sample_clip import make_sample_clip
from forgeflow.plugins.errors import MediaError, MediaNotFound

# With pytest-xdist (--dist loadgroup) one worker runs the whole group: the session's vision fixtures
# (sample clip, models, inference results) are made once.
pytestmark = pytest.mark.xdist_group("vision")


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

    out = annotate_media(assets / "bus.jpg", bus_result, tmp_path / "bus.png")
    assert out == tmp_path / "bus.png"
    drawn, source = cv2.imread(str(out)), cv2.imread(str(assets / "bus.jpg"))
    assert drawn.shape == source.shape
    assert np.abs(drawn.astype(int) - source.astype(int)).sum() > 0  # something was drawn
    # no image suffix: written as JPEG
    assert annotate_media(assets / "bus.jpg", bus_result, tmp_path / "bus-annotated").suffix == ".jpg"


@pytest.mark.vision
def test_annotate_video(clip_result, sample_clip, tmp_path):
    import cv2

    out = annotate_media(sample_clip, clip_result, tmp_path / "clip.avi")
    assert out.suffix == ".mp4"
    cap = cv2.VideoCapture(str(out))
    assert cap.isOpened()
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (640, 360)
    count = 0
    while cap.read()[0]:
        count += 1
    assert count == 64


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
    assert annotate_media(sample_clip, partial, tmp_path / "partial.mp4").is_file()
    with pytest.raises(MediaNotFound):
        annotate_media(tmp_path / "missing.mp4", partial, tmp_path / "x.mp4")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not media at all")
    with pytest.raises(MediaError):
        annotate_media(junk, partial, tmp_path / "x.mp4")
