"""Jobs on long videos, through a real Prefect flow run and the process runner: per-frame outputs go
between stages as chunked artifacts, every stage says how many frames it read, and nothing is cut
silently (the model-free stand-in detector of the test plugins reads every frame of the video)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from forgeflow.plugins import MediaStore
from forgeflow.plugins.frames import FRAMES_KEY, is_frames, iter_frame_records


def make_video(path: Path, frames: int, size: tuple[int, int] = (32, 24), fps: float = 25.0) -> Path:
    """A small MP4 (mp4v) of ``frames`` frames whose brightness changes with the frame index."""
    import cv2
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    try:
        for index in range(frames):
            writer.write(np.full((size[1], size[0], 3), index % 251, dtype=np.uint8))
    finally:
        writer.release()
    return path


@pytest.fixture
def long_settings(ff_home: Path, monkeypatch: pytest.MonkeyPatch):
    """Chunks of 50 frames (so a 300-frame job crosses several) and no annotated video unless asked."""
    from forgeflow.settings import get_settings

    monkeypatch.setenv("FORGEFLOW_FRAME_CHUNK_FRAMES", "50")
    monkeypatch.setenv("FORGEFLOW_ANNOTATE_MEDIA", "false")
    get_settings.cache_clear()
    yield get_settings
    get_settings.cache_clear()


@pytest.fixture
def video_300(long_settings, tmp_path: Path) -> str:
    video = make_video(tmp_path / "v300.mp4", 300)
    return MediaStore(long_settings().media_root).put_file(video).ref


def crowd_then_count(**crowd: Any) -> dict[str, Any]:
    return {
        "pipeline": [
            {"plugin": "testkit", "tool": "crowd_players", "config": {"people": 3, **crowd}},
            {"plugin": "testkit", "tool": "count_players"},
        ]
    }


def test_stages_pass_per_frame_outputs_as_artifacts(long_settings, video_300, executor, services):
    envelope = executor.execute(crowd_then_count(), {"media": video_300}, "job-long-300")
    assert envelope["ok"], envelope
    players, counts = envelope["result"]["players"], envelope["result"]["counts"]
    assert is_frames(players) and is_frames(counts)
    assert players["frames"] == counts["frames"] == 300 and players["chunks"] == 6
    assert players["counts"] == {"players": 900}
    store = MediaStore(long_settings().media_root)
    assert [r["players"] for r in iter_frame_records(counts, store)] == [3] * 300
    # the envelope says how much of the media was read, stage by stage: all of it
    assert (envelope["media_frames"], envelope["frames_read"], envelope["truncated"]) == (300, 300, False)
    stage0 = envelope["stages"][0]
    assert (stage0["media_frames"], stage0["frames_read"], stage0["truncated"]) == (300, 300, False)
    assert "media_frames" not in envelope["stages"][1]  # it read no media: no counts to say
    # the stage's output as it travelled (the inline part) is small whatever the length
    assert stage0["result_size_bytes"] < 2000


def test_the_same_job_gives_the_same_artifacts(long_settings, video_300, executor):
    first = executor.execute(crowd_then_count(), {"media": video_300}, "job-long-a")
    second = executor.execute(crowd_then_count(), {"media": video_300}, "job-long-b")
    assert first["result"] == second["result"]
    assert first["result"]["players"][FRAMES_KEY] == second["result"]["players"][FRAMES_KEY]


def run_with(settings: Any, pipeline: dict[str, Any], input_data: dict[str, Any], job_id: str) -> tuple[Any, list[Any]]:
    """The job run with services made from ``settings`` (what the test changed): envelope and messages."""
    from forgeflow.events.sinks import MemorySink
    from forgeflow.jobs.executor import PipelineExecutor
    from forgeflow.jobs.stages import Services

    sink = MemorySink()
    services = Services.from_settings(settings, sink=sink)
    try:
        envelope = PipelineExecutor(services).execute(pipeline, input_data, job_id)
    finally:
        services.close()
    return envelope, [e.model_dump() for e in sink.events]


def test_a_frame_cap_that_is_hit_is_never_silent(long_settings, video_300, monkeypatch, prefect_api_url):
    monkeypatch.setenv("FORGEFLOW_MAX_FRAMES", "100")
    long_settings.cache_clear()
    envelope, events = run_with(long_settings(), crowd_then_count(), {"media": video_300}, "job-capped")
    assert envelope["ok"] is True and envelope["truncated"] is True
    assert (envelope["media_frames"], envelope["frames_read"]) == (300, 100)
    assert envelope["stages"][0]["truncated"] is True
    assert envelope["result"]["players"]["frames"] == 100
    warnings = [e for e in events if e["type"] == "pipeline_stage_warning"]
    assert len(warnings) == 1
    assert warnings[0]["reason"] == "truncated" and warnings[0]["stage_index"] == 0
    assert (warnings[0]["media_frames"], warnings[0]["frames_read"]) == (300, 100)
    assert "FORGEFLOW_MAX_FRAMES=100" in warnings[0]["warning"]
    # progress on a long stage says frames/s and the time left
    progress = [e for e in events if e["type"] == "pipeline_stage_progress" and e["stage_index"] == 0]
    assert progress and all(e["rate"] > 0 for e in progress)
    assert progress[-1]["done"] == progress[-1]["total"] and progress[-1]["eta_s"] == 0


def test_a_video_longer_than_the_old_cap_is_read_to_the_end(long_settings, executor, tmp_path):
    """The old default cut every video at 20,000 frames without a word; there is no cap by default now.
    And the stage's memory stays flat: its worker's peak for 20,100 frames is that for 300 (its records
    as JSON would be ~40 MB more)."""
    assert long_settings().max_frames is None
    store = MediaStore(long_settings().media_root)
    pipeline = {"pipeline": [{"plugin": "testkit", "tool": "crowd_players", "config": {"people": 10}}]}
    peaks = {}
    for frames in (300, 20_100):
        ref = store.put_file(make_video(tmp_path / f"v{frames}.mp4", frames, size=(16, 16))).ref
        envelope = executor.execute(pipeline, {"media": ref}, f"job-frames-{frames}")
        assert envelope["ok"], envelope
        players = envelope["result"]["players"]
        assert players["frames"] == frames and players["last_frame"] == frames - 1
        assert (envelope["media_frames"], envelope["frames_read"], envelope["truncated"]) == (frames, frames, False)
        peaks[frames] = envelope["stages"][0]["peak_memory_mb"]
    assert peaks[20_100] < peaks[300] + 25, peaks


def test_a_failed_stage_keeps_the_completed_stages_artifacts(long_settings, video_300, executor):
    pipeline = crowd_then_count()
    pipeline["pipeline"][1]["config"] = {"fail_at_frame": 120}
    envelope = executor.execute(pipeline, {"media": video_300}, "job-long-fail")
    assert envelope["ok"] is False and envelope["stage_failed"] == 1
    assert "frame 120" in envelope["error"]
    players = envelope["partial_result"]["players"]
    store = MediaStore(long_settings().media_root)
    assert len(list(iter_frame_records(players, store))) == 300


def test_the_annotated_video_is_drawn_from_the_artifacts(long_settings, video_300, monkeypatch, prefect_api_url):
    monkeypatch.setenv("FORGEFLOW_ANNOTATE_MEDIA", "true")
    long_settings.cache_clear()
    pipeline = {"pipeline": [{"plugin": "testkit", "tool": "crowd_players", "config": {"people": 2}}]}
    envelope, _ = run_with(long_settings(), pipeline, {"media": video_300}, "job-long-drawn")
    assert envelope["ok"], envelope
    assert is_frames(envelope["result"]["players"])
    annotated = envelope["annotated_media"]
    assert annotated["kind"] == "video" and annotated["frames"] == 300


def test_a_stage_starts_on_the_first_chunks_of_the_one_before(long_settings, video_300, prefect_api_url):
    """Stages overlap: the consumer's start comes before the producer's end, and the result is the same
    as the stages run one after the other (here: with the producer's output inline, read at its end)."""
    pipeline = crowd_then_count(delay_s=0.01)  # ~3 s of producing: time for the consumer to start early
    envelope, events = run_with(long_settings(), pipeline, {"media": video_300}, "job-overlap")
    assert envelope["ok"], envelope
    order = [(e["type"], e.get("stage_index")) for e in events if e["type"].startswith("pipeline_stage_")]
    assert order.index(("pipeline_stage_start", 1)) < order.index(("pipeline_stage_end", 0))
    seqless = [e for e in events if e["type"] == "pipeline_progress"]
    assert [e["stages_completed"] for e in seqless] == [1, 2]
    sequential, _ = run_with(long_settings(), crowd_then_count(), {"media": video_300}, "job-no-overlap")
    assert sequential["result"] == envelope["result"]


def test_a_failed_producer_stops_the_stage_reading_it(long_settings, video_300, prefect_api_url):
    pipeline = crowd_then_count(delay_s=0.005, fail_at_frame=200)
    envelope, events = run_with(long_settings(), pipeline, {"media": video_300}, "job-overlap-fails")
    assert envelope["ok"] is False and envelope["stage_failed"] == 0
    assert "fails on purpose at frame 200" in envelope["error"]
    consumer = envelope["stages"][1]
    assert consumer["status"] == "failed" and consumer["error_type"] == "UpstreamFailed"
    assert envelope["partial_result"] == {}
    terminal = [e for e in events if e["type"] == "job_status"][-1]
    assert terminal["status"] == "failed" and events[-1] is terminal  # nothing after the terminal message


def test_the_video_is_annotated_while_the_last_stage_runs(long_settings, video_300, monkeypatch, prefect_api_url):
    """With every drawable output a stream, the annotated video is drawn from the stages' feeds while
    they write: the envelope names it as before; when a stage fails, the drawing stops with the job."""
    monkeypatch.setenv("FORGEFLOW_ANNOTATE_MEDIA", "true")
    long_settings.cache_clear()
    envelope, _ = run_with(long_settings(), crowd_then_count(delay_s=0.005), {"media": video_300}, "job-drawn-live")
    assert envelope["ok"], envelope
    assert envelope["annotated_media"]["frames"] == 300 and envelope["annotated_media"]["kind"] == "video"
    failing = crowd_then_count(delay_s=0.005, fail_at_frame=200)
    started = time.monotonic()
    failed, events = run_with(long_settings(), failing, {"media": video_300}, "job-drawn-live-fails")
    assert failed["ok"] is False and failed["stage_failed"] == 0
    assert "annotated_media" not in failed  # its partial result holds nothing to draw
    assert time.monotonic() - started < 60 and events[-1]["type"] == "job_status"
