"""A job's annotated media reaches its reader: ``GET /v1/jobs/{id}`` → ``envelope.annotated_media``, and
the stored terminal message (``/events``) keeps it in its summary. In process: no uvicorn, no Prefect."""

from __future__ import annotations

import pytest

from forgeflow.pipeline import outcome
from tests.test_api.conftest import InProcessApi, event

pytestmark = pytest.mark.fast

PIPELINE = {"stages": [{"plugin": "testkit", "tool": "fake_players", "config": {}}]}


def _envelope(**extra: object) -> dict[str, object]:
    reports = [outcome.StageReport(index=0, plugin="testkit", tool="fake_players", status="completed")]
    return {**outcome.succeeded({"players": [], "poses": []}, reports).to_dict(), **extra}


def test_the_annotated_media_is_in_the_jobs_envelope_and_its_terminal_message(in_process_api: InProcessApi) -> None:
    api = in_process_api
    media = "sha256:" + "b" * 64
    annotated = {
        "ref": "sha256:" + "c" * 64,
        "media_type": "video/mp4",
        "kind": "video",
        "size_bytes": 4321,
        "frames": 64,
    }
    running = event("annotated-job", "job_status", status="running", pipeline=PIPELINE, input={"media": media})
    done = event("annotated-job", "job_status", status="succeeded", envelope=_envelope(annotated_media=annotated))
    assert api.ingest([running, done]).status_code == 200
    job = api.client.get("/v1/jobs/annotated-job")
    assert job.status_code == 200, job.text
    assert job.json()["status"] == "succeeded"
    assert job.json()["envelope"]["annotated_media"] == annotated
    terminal = api.client.get("/v1/jobs/annotated-job/events").json()["events"][-1]
    assert terminal["type"] == "job_status" and terminal["envelope"]["annotated_media"] == annotated

    failed = event("annotated-error", "job_status", status="running", pipeline=PIPELINE, input={"media": media})
    reason = "annotated media not made: cannot open video (corrupt or truncated?): x.mp4"
    ended = event("annotated-error", "job_status", status="succeeded", envelope=_envelope(annotated_media_error=reason))
    assert api.ingest([failed, ended]).status_code == 200
    envelope = api.client.get("/v1/jobs/annotated-error").json()["envelope"]
    assert envelope["annotated_media_error"] == reason and "annotated_media" not in envelope


def test_an_annotated_media_of_the_wrong_shape_is_refused(in_process_api: InProcessApi) -> None:
    bad = {"ref": "not-a-ref", "media_type": "video/mp4", "kind": "video", "size_bytes": -1, "frames": None}
    response = in_process_api.ingest(
        [event("bad", "job_status", status="succeeded", envelope=_envelope(annotated_media=bad))]
    )
    assert response.status_code == 422
    assert "annotated_media" in response.text
