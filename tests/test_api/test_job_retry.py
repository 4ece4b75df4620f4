"""Retry through the API: a job that failed at stage k, retried (``POST /v1/jobs/{id}/retry``), is a
linked job that starts at stage k with the earlier stages' outputs and artifacts, and gives the
result an uninterrupted run gives. A running API (engine, Prefect); the stand-in detector counts
the frames it makes in a tally file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.test_api.conftest import wait_job
from tests.test_pipeline_orchestration.test_long_video import make_video
from tests.test_pipeline_orchestration.test_resume import frames_made, resume_pipeline


def test_a_failed_job_retried_through_the_api_starts_at_the_failed_stage(api_factory: Any, tmp_path: Path) -> None:
    api = api_factory(frame_chunk_frames=50, annotate_media=False)
    video = make_video(tmp_path / "v.mp4", 300)
    tally, blocker = tmp_path / "tally", tmp_path / "blocker"
    blocker.write_text("stage 1 fails while this file exists")
    pipeline = resume_pipeline(tally)["pipeline"]
    pipeline[1]["config"] = {"fail_while_file": str(blocker)}
    with api.client() as client:
        with video.open("rb") as fh:
            ref = client.post("/v1/media", files={"file": ("v.mp4", fh, "video/mp4")}).json()["ref"]
        first = client.post("/v1/jobs", json={"pipeline": pipeline, "input": {"media": ref}}).json()["job_id"]
        failed = wait_job(client, first)
        assert failed["status"] == "failed" and failed["envelope"]["stage_failed"] == 1
        assert frames_made(tally) == 300

        # retried while the cause is still there: stage 0 is taken from the first attempt, stage 1 fails again
        early = client.post(f"/v1/jobs/{first}/retry")
        assert early.status_code == 202, early.text
        early_job = wait_job(client, early.json()["job_id"])
        assert early_job["status"] == "failed" and early_job["envelope"]["stage_failed"] == 1
        assert early_job["envelope"]["stages"][0]["from_checkpoint"] is True
        assert frames_made(tally) == 300

        blocker.unlink()  # what made stage 1 fail is gone
        retry = client.post(f"/v1/jobs/{first}/retry")
        assert retry.status_code == 202, retry.text  # a new attempt: the earlier retry ended failed
        body = retry.json()
        assert body["retry_of"] == first and body["job_id"] != early_job["job_id"]
        done = wait_job(client, body["job_id"])
        assert done["status"] == "succeeded", done
        assert done["retry_of"] == first and done["source"] == "retry"
        stages = done["envelope"]["stages"]
        assert stages[0].get("from_checkpoint") is True and "from_checkpoint" not in stages[1]
        assert frames_made(tally) == 300  # stage 0 was not run again
        players = done["envelope"]["result"]["players"]
        assert players == failed["envelope"]["partial_result"]["players"]  # its artifact, by the same ref
        assert done["envelope"]["result"]["counts"]["frames"] == 300

        again = client.post(f"/v1/jobs/{first}/retry")  # the same retry, not a new one
        assert again.status_code == 200 and again.json()["job_id"] == body["job_id"]
        refused = client.post(f"/v1/jobs/{body['job_id']}/retry")
        assert refused.status_code == 409 and "succeeded" in refused.json()["error"]
        assert client.post("/v1/jobs/no-such-job/retry").status_code == 404
