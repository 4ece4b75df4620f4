"""A job's per-frame outputs over REST: listed, paged by frame range, downloaded as one Parquet file.

In process (fast): an envelope naming an artifact the API's media store holds. Then one job of a long
video run for real by a running API (engine, Prefect), read back the way an analyst would."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from forgeflow.pipeline import outcome
from forgeflow.plugins.builtin.schemas import FramePlayers
from forgeflow.plugins.frames import FRAMES_KEY, FrameWriter
from tests.test_api.conftest import ApiServer, InProcessApi, event, wait_job

PIPELINE = {"stages": [{"plugin": "testkit", "tool": "crowd_players", "config": {}}]}


def _record(index: int, people: int = 2) -> dict[str, Any]:
    players = [{"box": [i * 10.0, 0.0, i * 10.0 + 5, 9.0], "confidence": 0.9, "track_id": i + 1} for i in range(people)]
    return {"frame_index": index, "timestamp_s": index / 25, "players": players}


def _ended_job(api: InProcessApi, job_id: str, result: dict[str, Any], ok: bool = True) -> None:
    reports = [outcome.StageReport(index=0, plugin="testkit", tool="crowd_players", status="completed")]
    if ok:
        envelope = outcome.succeeded(result, reports).to_dict()
    else:
        envelope = outcome.failed(
            reports, error="boom", error_type="RuntimeError", stage_failed=1, partial_result=result
        )
        envelope = envelope.to_dict()
    running = event(job_id, "job_status", status="running", pipeline=PIPELINE, input={})
    done = event(job_id, "job_status", status="succeeded" if ok else "failed", envelope=envelope)
    assert api.ingest([running, done]).status_code == 200


@pytest.fixture
def artifact_job(in_process_api: InProcessApi) -> dict[str, Any]:
    writer = FrameWriter(
        store=in_process_api.state.media, record_type=FramePlayers, field_name="players", chunk_frames=10
    )
    players = writer.write_all(_record(i) for i in range(0, 70, 2))  # 35 frames, every other one
    inline = [_record(i, people=1) for i in range(3)]
    _ended_job(in_process_api, "long-job", {"players": players, "poses": inline, "total": 7})
    return players


@pytest.mark.fast
def test_outputs_are_listed_with_their_frame_ranges(in_process_api, artifact_job):
    body = in_process_api.client.get("/v1/jobs/long-job/outputs").json()
    by_name = {o["name"]: o for o in body["outputs"]}
    assert set(by_name) == {"players", "poses"}  # `total` is not per-frame
    players = by_name["players"]
    assert players["stored"] == "artifact" and players["ref"] == artifact_job[FRAMES_KEY]
    assert (players["frames"], players["first_frame"], players["last_frame"], players["chunks"]) == (35, 0, 68, 4)
    assert players["counts"] == {"players": 70} and players["columns"]["frame_index"] == "int64"
    assert players["download_url"] == "/v1/jobs/long-job/outputs/players"
    assert by_name["poses"]["stored"] == "inline" and by_name["poses"]["frames"] == 3


@pytest.mark.fast
def test_pages_follow_frame_indices_across_chunks(in_process_api, artifact_job):
    client = in_process_api.client
    page = client.get("/v1/jobs/long-job/outputs/players/frames", params={"start": 15, "limit": 12}).json()
    assert [r["frame_index"] for r in page["frames"]] == list(range(16, 40, 2))
    assert page["next_start"] == 40
    seen: list[int] = []
    start: int | None = 0
    while start is not None:  # paging to the end visits every frame once
        page = client.get("/v1/jobs/long-job/outputs/players/frames", params={"start": start, "limit": 7}).json()
        seen += [r["frame_index"] for r in page["frames"]]
        start = page["next_start"]
    assert seen == list(range(0, 70, 2))
    assert page["frames"][-1] == FramePlayers.model_validate(_record(68)).model_dump(mode="json")
    inline = client.get("/v1/jobs/long-job/outputs/poses/frames", params={"start": 1}).json()
    assert [r["frame_index"] for r in inline["frames"]] == [1, 2] and inline["next_start"] is None


@pytest.mark.fast
def test_an_output_downloads_as_one_parquet_file(in_process_api, artifact_job):
    import polars as pl
    import pyarrow.parquet as pq

    response = in_process_api.client.get("/v1/jobs/long-job/outputs/players")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    assert 'filename="long-job-players.parquet"' in response.headers["content-disposition"]
    assert pq.ParquetFile(io.BytesIO(response.content)).num_row_groups == 4
    frame = pl.read_parquet(io.BytesIO(response.content))
    assert frame["frame_index"].to_list() == list(range(0, 70, 2))
    assert frame.explode("players").height == 70
    media_root = Path(in_process_api.state.media.root)
    assert not list(media_root.glob(".output-*")), "the temporary file is removed once sent"


@pytest.mark.fast
def test_partial_results_are_readable_and_bad_names_are_404(in_process_api):
    writer = FrameWriter(
        store=in_process_api.state.media, record_type=FramePlayers, field_name="players", chunk_frames=5
    )
    players = writer.write_all(_record(i) for i in range(12))
    _ended_job(in_process_api, "failed-job", {"players": players}, ok=False)
    client = in_process_api.client
    assert client.get("/v1/jobs/failed-job/outputs").json()["outputs"][0]["frames"] == 12
    assert len(client.get("/v1/jobs/failed-job/outputs/players/frames").json()["frames"]) == 12
    for path in ("/v1/jobs/failed-job/outputs/nothing", "/v1/jobs/nobody/outputs/players/frames"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error_type"] == "NotFound"
    assert client.get("/v1/jobs/failed-job/outputs/players/frames", params={"limit": 1001}).status_code == 422
    assert client.get("/v1/jobs/failed-job/outputs/players/frames", params={"start": -1}).status_code == 422


def test_a_long_video_job_through_the_api(api_factory: Any, tmp_path: Path) -> None:
    """Upload a 300-frame video, run the stand-in detector and a streaming consumer, read the result
    back as an analyst would: the envelope names artifacts, the REST pages and file hold every frame."""
    import polars as pl

    from tests.test_pipeline_orchestration.test_long_video import make_video

    api: ApiServer = api_factory(frame_chunk_frames=50, annotate_media=False)
    video = make_video(tmp_path / "v.mp4", 300)
    with api.client() as client:
        with video.open("rb") as fh:
            ref = client.post("/v1/media", files={"file": ("v.mp4", fh, "video/mp4")}).json()["ref"]
        pipeline = [
            {"plugin": "testkit", "tool": "crowd_players", "config": {"people": 3}},
            {"plugin": "testkit", "tool": "count_players"},
        ]
        accepted = client.post("/v1/jobs", json={"pipeline": pipeline, "input": {"media": ref}})
        assert accepted.status_code in (200, 201, 202), accepted.text
        job = wait_job(client, accepted.json()["job_id"])
        assert job["status"] == "succeeded", job
        envelope = job["envelope"]
        assert envelope["result"]["players"]["frames"] == 300 and envelope["result"]["players"]["chunks"] == 6
        assert (envelope["media_frames"], envelope["frames_read"], envelope["truncated"]) == (300, 300, False)
        job_id = accepted.json()["job_id"]
        counts = pl.read_parquet(io.BytesIO(client.get(f"/v1/jobs/{job_id}/outputs/counts").content))
        assert counts.height == 300 and set(counts["players"].to_list()) == {3}
        page = client.get(f"/v1/jobs/{job_id}/outputs/players/frames", params={"start": 290}).json()
        assert [r["frame_index"] for r in page["frames"]] == list(range(290, 300))
