"""A batch through the API in local mode (the host's engine runs its files' jobs concurrently):
each file its own job, a corrupt file fails alone, the summary names every file, a second run
reuses every result (0 tool calls), a retry runs only the failed file, progress on the stream."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.batch_helpers import calls, file_work, make_images, wait_batch
from tests.test_api.conftest import ApiServer


@pytest.fixture
def media_api(api_factory: Any, tmp_path: Path) -> tuple[ApiServer, Path]:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    return api_factory(media_input_roots=[incoming], max_concurrent_jobs=4), incoming


def test_a_batch_runs_each_file_as_its_own_job_and_a_rerun_reuses_them(
    media_api: tuple[ApiServer, Path], tmp_path: Path
) -> None:
    api, incoming = media_api
    names = make_images(incoming, 4, corrupt=1)
    log = tmp_path / "calls.log"
    client = api.client()
    body = {"name": "nightly", "pipeline": file_work(log), "folder": str(incoming), "pattern": "*.png"}
    answer = client.post("/v1/batches", json=body)
    assert answer.status_code == 201, answer.text
    batch_id = answer.json()["batch_id"]
    batch = wait_batch(client, batch_id)
    assert batch["status"] == "failed"  # one file failed: the batch says so, the others succeeded
    files = {f["name"]: f for f in batch["files"]}
    assert set(files) == set(names)
    assert files["bad-0.png"]["status"] == "failed" and files["bad-0.png"]["error_type"] == "MediaError"
    assert files["bad-0.png"]["attempts"] == 1  # its own failure: never retried
    assert all(files[n]["status"] == "succeeded" for n in names if n != "bad-0.png")
    assert batch["counts"] | {"total": 5} == batch["counts"]
    assert (batch["counts"]["succeeded"], batch["counts"]["failed"], batch["counts"]["reused"]) == (4, 1, 0)
    assert calls(log) == 4
    jobs = {n: client.get(f"/v1/jobs/{f['job_id']}").json() for n, f in files.items()}
    assert all(j["batch_id"] == batch_id and j["source"] == "batch" for j in jobs.values())
    assert jobs["img-00.png"]["envelope"]["result"]["frame_count"] == 1
    assert len({j["job_id"] for j in jobs.values()}) == 5  # one job per file

    summary = list(csv.DictReader(io.StringIO(client.get(f"/v1/batches/{batch_id}/summary.csv").text)))
    assert [row["name"] for row in summary] == names
    assert {row["name"]: row["status"] for row in summary}["bad-0.png"] == "failed"
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(client.get(f"/v1/batches/{batch_id}/summary.parquet").content))
    assert table.column("name").to_pylist() == names
    assert table.column("job_id").to_pylist() == [files[n]["job_id"] for n in names]

    # The same batch again: every file that succeeded takes its earlier result, nothing is computed.
    again = client.post("/v1/batches", json=body).json()
    rerun = wait_batch(client, again["batch_id"])
    assert calls(log) == 4
    reused = {f["name"]: f for f in rerun["files"]}
    assert rerun["counts"]["reused"] == 4
    for name in names:
        if name != "bad-0.png":
            assert reused[name]["reused_from"] == files[name]["job_id"]
            outputs = client.get(f"/v1/jobs/{reused[name]['job_id']}").json()
            assert outputs["envelope"]["result"] == jobs[name]["envelope"]["result"]
    assert reused["bad-0.png"]["status"] == "failed"  # a failure is never reused: it ran again
    # With force, everything is computed again.
    forced = wait_batch(client, client.post("/v1/batches", json={**body, "force": True}).json()["batch_id"])
    assert forced["counts"]["reused"] == 0 and calls(log) == 8


def test_a_retry_runs_only_the_failed_and_new_files(media_api: tuple[ApiServer, Path], tmp_path: Path) -> None:
    api, incoming = media_api
    make_images(incoming, 2, corrupt=1)
    log = tmp_path / "calls.log"
    client = api.client()
    body = {"pipeline": file_work(log), "folder": str(incoming), "max_concurrency": 1}
    first = wait_batch(client, client.post("/v1/batches", json=body).json()["batch_id"])
    assert first["max_concurrency"] == 1 and first["counts"]["failed"] == 1 and calls(log) == 2
    # The bad file is replaced by a good one, and a new file arrives: a new run computes only those two.
    (incoming / "bad-0.png").unlink()
    import cv2
    import numpy as np

    cv2.imwrite(str(incoming / "bad-0.png"), np.full((8, 8, 3), 200, dtype=np.uint8))
    cv2.imwrite(str(incoming / "new.png"), np.full((8, 8, 3), 99, dtype=np.uint8))
    second = wait_batch(client, client.post("/v1/batches", json=body).json()["batch_id"])
    assert second["status"] == "succeeded" and second["counts"]["reused"] == 2 and calls(log) == 4
    # POST /retry on the first batch: only its failed file gets a new job (it resumes the failed one).
    assert client.post(f"/v1/batches/{second['batch_id']}/retry").status_code == 409  # nothing failed
    retried = client.post(f"/v1/batches/{first['batch_id']}/retry")
    assert retried.status_code == 202, retried.text
    assert retried.json()["retried"] == ["bad-0.png"]
    batch = wait_batch(client, first["batch_id"])
    bad = next(f for f in batch["files"] if f["name"] == "bad-0.png")
    assert bad["attempts"] == 2 and bad["status"] == "failed"  # the first batch stored the corrupt bytes
    job = client.get(f"/v1/jobs/{bad['job_id']}").json()
    assert job["retry_of"] == next(f for f in first["files"] if f["name"] == "bad-0.png")["job_id"]


def test_an_api_job_reuses_only_on_request(media_api: tuple[ApiServer, Path], tmp_path: Path) -> None:
    api, incoming = media_api
    make_images(incoming, 1)
    log = tmp_path / "calls.log"
    client = api.client()
    ref = client.post("/v1/media", files={"file": ("a.png", (incoming / "img-00.png").read_bytes())}).json()["ref"]
    job = {"pipeline": file_work(log), "input": {"media": ref}}
    first = client.post("/v1/jobs", json=job).json()
    from tests.test_api.conftest import wait_job

    assert wait_job(client, first["job_id"])["status"] == "succeeded"
    plain = wait_job(client, client.post("/v1/jobs", json=job).json()["job_id"])
    assert plain["reused_from"] is None and calls(log) == 2
    reused = client.post("/v1/jobs", json={**job, "reuse": True}).json()
    assert reused["reused_from"] == first["job_id"] and reused["status"] == "succeeded"
    assert calls(log) == 2


def test_batch_progress_is_on_the_all_jobs_stream_and_cancel_stops_the_batch(
    media_api: tuple[ApiServer, Path], tmp_path: Path
) -> None:
    from websockets.sync.client import connect

    api, incoming = media_api
    make_images(incoming, 6)
    client = api.client()
    body = {"pipeline": file_work(tmp_path / "calls.log", seconds=30), "folder": str(incoming), "max_concurrency": 2}
    with connect(f"{api.ws_url}/v1/ws/jobs", additional_headers=api.headers) as ws:
        batch_id = client.post("/v1/batches", json=body).json()["batch_id"]
        progress: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = json.loads(ws.recv(timeout=deadline - time.monotonic()))
            if message["type"] == "batch_progress" and message["batch_id"] == batch_id:
                progress.append(message)
                if message["counts"]["running"] == 2:
                    break
        assert progress and progress[-1]["counts"]["running"] == 2 and progress[-1]["counts"]["queued"] == 4
        assert progress[-1]["status"] == "running" and progress[-1]["counts"]["total"] == 6
        cancelled = client.post(f"/v1/batches/{batch_id}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        batch = wait_batch(client, batch_id, timeout=30)
        while True:  # the stream says so too
            message = json.loads(ws.recv(timeout=30))
            if (
                message["type"] == "batch_progress"
                and message["batch_id"] == batch_id
                and message["status"] != "running"
            ):
                break
    assert message["status"] == "cancelled" == batch["status"]
    assert batch["counts"]["cancelled"] == 6 and batch["counts"]["succeeded"] == 0
    started = [f for f in batch["files"] if client.get(f"/v1/jobs/{f['job_id']}").json()["started_at"]]
    assert len(started) == 2  # nothing new started after the cancel


def test_the_batch_flow_registers_its_batch_and_writes_the_results(
    media_api: tuple[ApiServer, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called directly (as a schedule's run would run it), the batch flow uploads the folder's files,
    registers the batch under its flow run, follows it and writes each file's envelope and the summary."""
    from forgeflow.jobs.batch import batch_flow
    from forgeflow.settings import get_settings

    api, _ = media_api
    elsewhere = tmp_path / "on-this-host"  # not an API media root: the flow uploads the files
    names = make_images(elsewhere, 2, corrupt=1)
    (elsewhere / "notes.txt").write_text("not media")
    monkeypatch.setenv("FORGEFLOW_API_URL", api.url)
    monkeypatch.setenv("FORGEFLOW_INGEST_TOKEN", api.ingest_token)
    get_settings.cache_clear()
    try:
        out = tmp_path / "out"
        result = batch_flow(
            pipeline={"pipeline": file_work(tmp_path / "calls.log")},
            folder=str(elsewhere),
            pattern="*.png",
            out_dir=str(out),
        )
    finally:
        get_settings.cache_clear()
    assert result["files"] == 3 and result["succeeded"] == 2 and result["failed"] == ["bad-0.png"]
    batch = api.client().get(f"/v1/batches/{result['batch_id']}").json()
    assert batch["flow_run_id"] and batch["created_by"] in (None, "ingest")
    assert [f["name"] for f in batch["files"]] == names
    good = json.loads((out / "img-00.png.json").read_text())
    assert good["ok"] and good["result"]["frame_count"] == 1
    bad = json.loads((out / "bad-0.png.json").read_text())
    assert bad["ok"] is False and bad["error_type"] == "MediaError"
    assert [row["name"] for row in csv.DictReader(io.StringIO((out / "summary.csv").read_text()))] == names
    assert (out / "summary.parquet").stat().st_size > 0


def test_the_batch_command_runs_a_folder_with_a_progress_bar_and_acts_on_a_batch(
    media_api: tuple[ApiServer, Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from forgeflow.cli.main import app

    api, _ = media_api
    folder = tmp_path / "clips"
    names = make_images(folder, 2, corrupt=1)
    pipeline_file = tmp_path / "pipeline.json"
    pipeline_file.write_text(json.dumps({"pipeline": file_work(tmp_path / "calls.log")}))
    out = tmp_path / "out"
    runner = CliRunner()
    done = runner.invoke(app, ["batch", str(pipeline_file), str(folder), "--out", str(out), "--api", api.url])
    assert done.exit_code == 1, done.output  # one file failed
    assert "batch-" in done.output and "2 ok" in done.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{n}.json" for n in names), "summary.csv", "summary.parquet"]
    )
    batch_id = api.client().get("/v1/batches").json()["items"][0]["batch_id"]
    shown = runner.invoke(app, ["batch", "status", batch_id, "--api", api.url])
    assert shown.exit_code == 1 and "bad-0.png" in shown.output and "MediaError" in shown.output
    retried = runner.invoke(app, ["batch", "retry", batch_id, "--api", api.url])
    assert "retrying 1 files: bad-0.png" in retried.output, retried.output
    refused = runner.invoke(app, ["batch", "cancel", "batch-unknown", "--api", api.url])
    assert refused.exit_code == 2 and "unknown batch" in refused.output.lower()
