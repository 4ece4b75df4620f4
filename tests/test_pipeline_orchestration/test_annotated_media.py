"""A job with input media and a drawable result stores its annotated media (``forgeflow.jobs.annotate``)
and names it in its envelope: the stage loop with the inline runner and testkit's ``fake_players``.

The encoder is real (imageio-ffmpeg's ffmpeg, H.264); the media are a few small frames made here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from forgeflow.events.models import JobStatusEvent
from forgeflow.jobs.annotate import ffmpeg_exe
from forgeflow.pipeline import outcome
from forgeflow.plugins.media import MediaStore
from forgeflow.settings import get_settings
from tests.conftest import video_frames_and_size
from tests.test_pipeline_orchestration.conftest import run_stage_loop

pytestmark = pytest.mark.fast

FAKE_PLAYERS = {"plugin": "testkit", "tool": "fake_players"}


class RecordingSync:
    """Stands in for :class:`~forgeflow.jobs.media_sync.MediaSync` (a worker host): records what it is given."""

    def __init__(self) -> None:
        self.fetched: list[Any] = []
        self.uploaded: list[Any] = []

    def fetch(self, value: Any) -> list[str]:
        self.fetched.append(value)
        return []

    def upload(self, value: Any) -> list[str]:
        self.uploaded.append(value)
        return []

    def close(self) -> None:
        pass


def _image(path: Path, size: tuple[int, int] = (320, 240)) -> Path:
    import cv2
    import numpy as np

    width, height = size
    image = np.full((height, width, 3), 90, dtype=np.uint8)
    cv2.circle(image, (width // 2, height // 2), min(size) // 4, (30, 160, 220), -1)
    assert cv2.imwrite(str(path), image)
    return path


def _video(path: Path, frames: int = 8, size: tuple[int, int] = (320, 180)) -> Path:
    """A short MP4 (OpenCV's mp4v: what an uploaded video may well be)."""
    import cv2
    import numpy as np

    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    assert writer.isOpened()
    for i in range(frames):
        frame = np.full((height, width, 3), 20 + 20 * i, dtype=np.uint8)
        cv2.rectangle(frame, (10 + 10 * i, 20), (60 + 10 * i, 120), (0, 200, 0), -1)
        writer.write(frame)
    writer.release()
    return path


def test_an_image_job_stores_its_result_drawn_on_the_image(registry, ff_home, tmp_path):
    import cv2
    import numpy as np

    store = MediaStore(get_settings().media_root)
    source = _image(tmp_path / "in.png", (321, 241))
    ref = store.put_file(source).ref
    envelope, events = run_stage_loop(registry, [FAKE_PLAYERS], {"media": ref}, job_id="job-image")
    assert envelope["ok"] is True, envelope
    annotated = envelope["annotated_media"]
    assert set(annotated) == {"ref", "media_type", "kind", "size_bytes", "frames"}
    assert (annotated["kind"], annotated["media_type"], annotated["frames"]) == ("image", "image/jpeg", None)
    assert annotated["ref"] != ref and store.has(annotated["ref"])
    path = store.path(annotated["ref"])
    assert annotated["size_bytes"] == path.stat().st_size
    assert store.info(annotated["ref"]).filename == "annotated-job-image.jpg"
    drawn, original = cv2.imread(str(path)), cv2.imread(str(source))
    assert drawn.shape == original.shape == (241, 321, 3)
    assert np.abs(drawn.astype(int) - original.astype(int)).mean() > 1  # the box and skeleton were drawn
    assert "annotated_media_error" not in envelope
    # the terminal message carries it, and so does its summary (what is stored and sent to clients)
    terminal = events[-1]
    assert isinstance(terminal, JobStatusEvent) and terminal.envelope == envelope
    assert terminal.summarized().envelope["annotated_media"] == annotated  # type: ignore[index]
    assert not list((get_settings().jobs_dir / "job-image").glob(".annotate-*"))  # temporary files are gone


def test_a_video_job_stores_an_h264_mp4_of_every_frame(registry, ff_home, tmp_path, monkeypatch):
    clips = tmp_path / "clips"
    clips.mkdir()
    source = _video(clips / "in.mp4")
    monkeypatch.setenv("FORGEFLOW_MEDIA_INPUT_ROOTS", json.dumps([str(clips)]))
    get_settings.cache_clear()
    # a local path inside the allowed media roots, as the job input may name it
    envelope, _ = run_stage_loop(registry, [FAKE_PLAYERS], {"media": str(source)}, job_id="job-video")
    assert envelope["ok"] is True, envelope
    annotated = envelope["annotated_media"]
    assert (annotated["kind"], annotated["media_type"], annotated["frames"]) == ("video", "video/mp4", 8)
    path = MediaStore(get_settings().media_root).path(annotated["ref"])
    assert video_frames_and_size(path) == (8, (320, 180))
    data = path.read_bytes()
    assert b"avc1" in data and b"mp4v" not in data and data[4:8] == b"ftyp"  # H.264, not MPEG-4 Part 2
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True, timeout=60)
    video = next(line for line in probe.stderr.splitlines() if "Video:" in line)
    assert "h264" in video and "yuv420p" in video, video
    moov, mdat = data.find(b"moov"), data.find(b"mdat")
    assert 0 < moov < mdat  # +faststart: the index comes first, a browser plays while it downloads


def test_the_annotated_video_covers_the_frames_that_were_analysed(registry, ff_home, tmp_path):
    """A stage that read 3 frames of an 8-frame clip (``max_frames``, a legacy job's config) gives a
    3-frame annotated video, not the whole clip with 5 frames of nothing drawn."""
    ref = MediaStore(get_settings().media_root).put_file(_video(tmp_path / "in.mp4")).ref
    stages = [{**FAKE_PLAYERS, "config": {"frames": 3}}]
    envelope, _ = run_stage_loop(registry, stages, {"media": ref}, job_id="job-first-frames")
    assert envelope["ok"] is True, envelope
    annotated = envelope["annotated_media"]
    assert annotated["frames"] == 3
    assert video_frames_and_size(MediaStore(get_settings().media_root).path(annotated["ref"])) == (3, (320, 180))


def test_a_job_without_media_or_without_anything_to_draw_has_no_annotated_media(registry, ff_home, tmp_path):
    envelope, _ = run_stage_loop(registry, [{"plugin": "testkit", "tool": "numbers"}], {"count": 2})
    assert envelope["ok"] is True
    assert "annotated_media" not in envelope and "annotated_media_error" not in envelope
    ref = MediaStore(get_settings().media_root).put_file(_image(tmp_path / "in.jpg")).ref
    envelope, _ = run_stage_loop(registry, [{"plugin": "testkit", "tool": "probe_media"}], {"media": ref})
    assert envelope["ok"] is True and envelope["result"]["media_kind"] == "image"
    assert "annotated_media" not in envelope and "annotated_media_error" not in envelope


def test_annotation_can_be_switched_off(registry, ff_home, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGEFLOW_ANNOTATE_MEDIA", "false")
    get_settings.cache_clear()
    ref = MediaStore(get_settings().media_root).put_file(_image(tmp_path / "in.jpg")).ref
    envelope, _ = run_stage_loop(registry, [FAKE_PLAYERS], {"media": ref})
    assert envelope["ok"] is True and envelope["result"]["players"]
    assert "annotated_media" not in envelope and "annotated_media_error" not in envelope


def test_media_that_cannot_be_decoded_leaves_the_job_succeeded_with_the_reason(registry, ff_home):
    store = MediaStore(get_settings().media_root)
    broken = store.put_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00\x01garbage" * 64, filename="broken.mp4").ref
    before = {p.name for p in store.root.rglob("*") if p.is_file()}
    # the tool reports players without reading the media: only the drawing meets the broken file
    envelope, events = run_stage_loop(registry, [{**FAKE_PLAYERS, "config": {"frames": 3}}], {"media": broken})
    assert envelope["ok"] is True, envelope
    assert events[-1].status == "succeeded"
    assert "annotated_media" not in envelope
    assert "cannot open video" in envelope["annotated_media_error"]
    assert {p.name for p in store.root.rglob("*") if p.is_file()} == before  # nothing half-made was stored


def test_a_failed_stage_still_draws_the_partial_result(registry, ff_home, tmp_path):
    ref = MediaStore(get_settings().media_root).put_file(_image(tmp_path / "in.jpg")).ref
    stages = [FAKE_PLAYERS, {"plugin": "testkit", "tool": "fail", "config": {"message": "pose model broke"}}]
    envelope, events = run_stage_loop(registry, stages, {"media": ref})
    assert envelope["ok"] is False and envelope["stage_failed"] == 1
    assert envelope["partial_result"]["players"]
    assert envelope["annotated_media"]["kind"] == "image"
    assert MediaStore(get_settings().media_root).has(envelope["annotated_media"]["ref"])
    assert events[-1].status == "failed" and events[-1].envelope["annotated_media"] == envelope["annotated_media"]


def test_on_a_worker_host_the_annotated_media_is_uploaded_to_the_api(registry, ff_home, tmp_path):
    sync = RecordingSync()
    ref = MediaStore(get_settings().media_root).put_file(_image(tmp_path / "in.jpg")).ref
    envelope, _ = run_stage_loop(registry, [FAKE_PLAYERS], {"media": ref}, media_sync=sync)
    annotated = envelope["annotated_media"]["ref"]
    assert {"annotated_media": annotated} in sync.uploaded
    assert sync.uploaded[-1] == {"annotated_media": annotated}  # after the stages' own uploads


def test_the_envelope_model_takes_the_annotated_media_strictly():
    reports = [outcome.StageReport(index=0, plugin="testkit", tool="fake_players", status="completed")]
    envelope = outcome.succeeded({"players": []}, reports).to_dict()
    assert "annotated_media" not in envelope and "annotated_media_error" not in envelope
    annotated = {"ref": "sha256:" + "a" * 64, "media_type": "video/mp4", "kind": "video", "size_bytes": 9, "frames": 8}
    event = JobStatusEvent(job_id="j", status="succeeded", envelope={**envelope, "annotated_media": annotated})
    assert event.summarized().envelope["annotated_media"] == annotated  # type: ignore[index]
    with pytest.raises(ValueError):
        JobStatusEvent(
            job_id="j", status="succeeded", envelope={**envelope, "annotated_media": {**annotated, "ref": "x"}}
        )
