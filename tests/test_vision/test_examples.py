"""The example pipelines through the real engine (PipelineExecutor: Prefect flow, process runner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgeflow.canonical import canonical_json
from forgeflow.pipeline.definition import PipelineDefinition
from forgeflow.plugins.media import MediaStore
from tests.conftest import environment

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# With pytest-xdist (--dist loadgroup) one worker runs the whole group: the session's vision fixtures
# (sample clip, models, inference results) are made once.
pytestmark = [pytest.mark.vision, pytest.mark.xdist_group("vision")]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, prefect_api_url, assets):
    """An executor with its own FORGEFLOW_HOME, the process runner and a memory sink."""
    from forgeflow.events.sinks import MemorySink
    from forgeflow.jobs.executor import PipelineExecutor
    from forgeflow.jobs.stages import Services
    from forgeflow.settings import get_settings

    home = tmp_path_factory.mktemp("ffhome-examples")
    try:
        with environment({"FORGEFLOW_HOME": str(home), "FORGEFLOW_MEDIA_INPUT_ROOTS": json.dumps([str(assets)])}):
            get_settings.cache_clear()
            services = Services.from_settings(get_settings(), sink=MemorySink())
            try:
                yield PipelineExecutor(services), services
            finally:
                services.close()
    finally:
        get_settings.cache_clear()


def test_examples_are_valid_pipelines():
    soccer = PipelineDefinition.model_validate(json.loads((EXAMPLES / "soccer-analysis.json").read_text()))
    seed = PipelineDefinition.model_validate(json.loads((EXAMPLES / "seed-phase-12.json").read_text()))
    assert (
        [(s.plugin, s.tool) for s in soccer.stages]
        == [(s.plugin, s.tool) for s in seed.stages]
        == [
            ("forgesyte-yolo-tracker", "detect_players"),
            ("pose-estimator", "estimate_poses"),
            ("classifier", "classify_actions"),
        ]
    )
    assert seed.stages[0].config == {"device": "cuda", "confidence": 0.25}
    assert seed.stages[1].config == {"model": "light"}


def test_soccer_analysis_runs_and_is_deterministic(engine, assets):
    executor, services = engine
    ref = MediaStore(services.settings.media_root).put_file(assets / "bus.jpg").ref  # as POST /v1/media does
    pipeline = json.loads((EXAMPLES / "soccer-analysis.json").read_text())
    first = executor.execute(pipeline, {"media": ref}, "job-soccer-1")
    assert first["ok"], first
    assert first["stages_executed"] == 3
    result = first["result"]
    assert {"players", "poses", "actions"} <= set(result)
    assert len(result["players"][0]["players"]) == 4
    assert all(len(p["keypoints"]) == 17 for p in result["poses"][0]["poses"])
    assert len(result["actions"][0]["actions"]) == 4
    # the job drew its result on the image and stored it
    annotated = first["annotated_media"]
    assert (annotated["kind"], annotated["media_type"], annotated["frames"]) == ("image", "image/jpeg", None)
    assert MediaStore(services.settings.media_root).has(annotated["ref"])
    # a local path inside the allowed root gives the same result (and the same drawing) as the media ref
    second = executor.execute(pipeline, {"media": str(assets / "bus.jpg")}, "job-soccer-2")
    assert second["ok"], second
    assert canonical_json(second["result"]) == canonical_json(result)
    assert second["annotated_media"] == annotated


def test_seed_example_verbatim(engine, assets):
    """The seed's JSON asks for CUDA: on a host without a GPU, stage 0 fails with DeviceUnavailable."""
    import torch

    executor, _ = engine
    seed = json.loads((EXAMPLES / "seed-phase-12.json").read_text())
    outcome = executor.execute(seed, {"media": str(assets / "zidane.jpg")}, seed["job_id"])
    if torch.cuda.is_available():
        assert outcome["ok"], outcome
        assert len(outcome["result"]["players"][0]["players"]) == 2
        return
    assert outcome["ok"] is False
    assert outcome["stage_failed"] == 0
    assert outcome["error_type"] == "DeviceUnavailable"
    assert "no CUDA GPU" in outcome["error"]


def test_soccer_analysis_on_the_sample_clip(engine, sample_clip):
    """The main job verbatim (default imgsz 640) on the sample video, through the process runner
    with its memory limit: workers preload torch outside the call's budget."""
    executor, services = engine
    ref = MediaStore(services.settings.media_root).put_file(sample_clip).ref
    pipeline = json.loads((EXAMPLES / "soccer-analysis.json").read_text())
    outcome = executor.execute(pipeline, {"media": ref}, "job-soccer-clip")
    assert outcome["ok"], outcome
    result = outcome["result"]
    assert [len(result[k]) for k in ("players", "poses", "actions")] == [64, 64, 64]
    tracked = {p["track_id"] for f in result["players"] for p in f["players"] if p["track_id"] is not None}
    assert 4 <= len(tracked) <= 8
    # the annotated video: H.264 MP4 (what browsers play) with every frame of the clip
    annotated = outcome["annotated_media"]
    assert (annotated["kind"], annotated["media_type"], annotated["frames"]) == ("video", "video/mp4", 64)
    data = MediaStore(services.settings.media_root).path(annotated["ref"]).read_bytes()
    assert b"avc1" in data and b"mp4v" not in data and len(data) == annotated["size_bytes"]
