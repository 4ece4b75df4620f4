"""Jobs end to end: real job processes (one Prefect flow run each) running the testkit plugin,
observed over REST and WebSockets."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from forgeflow.jobs.handle import JobEnd
from tests.test_api.conftest import THREE_STAGES, ApiServer, wait_job, ws_collect

TERMINAL = {"succeeded", "failed", "cancelled", "crashed"}


def _assert_gapless(messages: list[dict[str, Any]], first: int = 1) -> None:
    seqs = [m["seq"] for m in messages]
    assert seqs == list(range(first, first + len(seqs))), seqs
    for m in messages:
        assert m["timestamp"].endswith("Z") and m["job_id"] and m["type"]


def test_three_stage_pipeline_full_message_sequence(api: ApiServer) -> None:
    client = api.client()
    body = {"job_id": "job-123", "pipeline": THREE_STAGES, "input": {"count": 4}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["job_id"] == "job-123"

    messages, close = ws_collect(f"{api.ws_url}/v1/ws/jobs/job-123")
    assert close is not None and close.code == 1000
    _assert_gapless(messages)
    kinds = [(m["type"], m.get("stage_index"), m.get("status")) for m in messages]
    expected = [("job_status", None, "queued"), ("job_status", None, "running")]
    for index in range(3):
        expected += [
            ("pipeline_stage_start", index, None),
            ("pipeline_stage_end", index, None),
            ("pipeline_progress", None, None),
        ]
    expected.append(("job_status", None, "succeeded"))
    assert kinds == expected
    progress = [m for m in messages if m["type"] == "pipeline_progress"]
    assert [(p["stages_completed"], p["stages_total"], p["percent"]) for p in progress] == [
        (1, 3, 33),
        (2, 3, 67),
        (3, 3, 100),
    ]
    ends = [m for m in messages if m["type"] == "pipeline_stage_end"]
    assert all(e["ok"] and e["duration_ms"] >= 0 and e["result_size_bytes"] > 0 for e in ends)
    assert messages[1]["flow_run_id"]

    job = client.get("/v1/jobs/job-123").json()
    assert job["status"] == "succeeded"
    assert job["envelope"]["ok"] is True
    assert job["envelope"]["result"] == {"numbers": [0, 1, 2, 3], "scaled": [0, 3, 6, 9], "total": 18}
    assert job["envelope"]["stages_executed"] == 3
    assert job["flow_run_id"] == messages[1]["flow_run_id"]

    state = client.get("/v1/jobs/job-123/pipeline").json()
    assert state["job_id"] == "job-123"
    assert state["status"] == "succeeded"
    assert state["stages_executed"] == 3 and state["current_stage"] is None and state["percent"] == 100
    assert [s["status"] for s in state["stages"]] == ["completed"] * 3
    assert all(s["duration_ms"] is not None and s["started_at"] and s["ended_at"] for s in state["stages"])
    assert [s["plugin"] for s in state["stages"]] == ["testkit", "testkit", "testkit"]  # canonical, not the alias tk

    # A late subscriber gets everything by replay; a reconnecting one what came after its seq.
    late, _ = ws_collect(f"{api.ws_url}/v1/ws/jobs/job-123")
    assert late == messages
    resumed, close = ws_collect(f"{api.ws_url}/v1/ws/jobs/job-123?after_seq=5")
    assert resumed == messages[5:] and close.code == 1000
    stored = client.get("/v1/jobs/job-123/events", params={"after_seq": 2}).json()
    assert stored["events"] == messages[2:] and stored["last_seq"] == len(messages)

    # The same body again is the same job; another body with this id is a conflict.
    again = client.post("/v1/jobs", json=body)
    assert again.status_code == 200 and again.json()["created"] is False
    other = client.post("/v1/jobs", json={**body, "input": {"count": 5}})
    assert other.status_code == 409 and other.json()["field"] == "job_id"


def test_every_submission_form_runs(api: ApiServer) -> None:
    client = api.client()
    saved = client.post("/v1/pipelines", json={"name": "Number Chain", "stages": THREE_STAGES})
    assert saved.status_code == 201, saved.text
    assert saved.json()["id"] == "number-chain"

    forms = {
        "definition": {"pipeline": {"stages": THREE_STAGES, "timeout_seconds": 60}, "input": {"count": 2}},
        "template": {"pipeline_id": "number-chain", "input": {"count": 2}},
        "legacy": {"plugin_id": "tk", "tool_name": "numbers", "config": {"start": 5}, "input": {"count": 2}},
    }
    ids = {}
    for name, body in forms.items():
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 202, (name, response.text)
        ids[name] = response.json()["job_id"]
    results = {name: wait_job(client, job_id) for name, job_id in ids.items()}
    assert {n: r["status"] for n, r in results.items()} == dict.fromkeys(forms, "succeeded")
    assert results["definition"]["envelope"]["result"]["total"] == 3
    assert results["template"]["envelope"]["result"]["total"] == 3
    assert results["template"]["pipeline_id"] == "number-chain"
    assert results["legacy"]["envelope"]["result"] == {"numbers": [5, 6]}
    assert results["legacy"]["source"] == "legacy"
    assert results["definition"]["pipeline"]["timeout_seconds"] == 60

    listing = client.get("/v1/jobs", params={"status": "succeeded", "limit": 2}).json()
    assert listing["total"] == 3 and len(listing["items"]) == 2 and listing["next_offset"] == 2
    page2 = client.get("/v1/jobs", params={"status": "succeeded", "limit": 2, "offset": 2}).json()
    assert len(page2["items"]) == 1 and page2["next_offset"] is None
    assert client.get("/v1/jobs", params={"status": "running"}).json()["total"] == 0


def test_failing_stage_reports_error_and_partial_result(api: ApiServer) -> None:
    client = api.client()
    pipeline = [
        {"plugin": "testkit", "tool": "numbers"},
        {"plugin": "testkit", "tool": "fail", "config": {"message": "stage two broke", "error": "ValueError"}},
        {"plugin": "testkit", "tool": "noop"},
    ]
    job_id = client.post("/v1/jobs", json={"pipeline": pipeline, "input": {"count": 3}}).json()["job_id"]
    messages, _ = ws_collect(f"{api.ws_url}/v1/ws/jobs/{job_id}")
    _assert_gapless(messages)
    errors = [m for m in messages if m["type"] == "pipeline_error"]
    assert len(errors) == 1
    assert errors[0]["stage_index"] == 1 and errors[0]["error_type"] == "ValueError"
    assert "stage two broke" in errors[0]["error"]
    assert not any(m["type"] == "pipeline_stage_start" and m["stage_index"] == 2 for m in messages)
    assert messages[-1]["type"] == "job_status" and messages[-1]["status"] == "failed"

    job = client.get(f"/v1/jobs/{job_id}").json()
    envelope = job["envelope"]
    assert job["status"] == "failed"
    assert envelope["ok"] is False and envelope["stage_failed"] == 1 and envelope["error_type"] == "ValueError"
    assert envelope["partial_result"] == {"numbers": [0, 1, 2]}
    assert envelope["stages_executed"] == 1

    state = client.get(f"/v1/jobs/{job_id}/pipeline").json()
    assert [s["status"] for s in state["stages"]] == ["completed", "failed", "skipped"]
    assert state["stage_failed"] == 1 and "stage two broke" in state["stages"][1]["error"]

    plugin = client.get("/v1/plugins/testkit").json()
    assert plugin["lifecycle"]["state"] == "FAILED"
    assert "stage two broke" in plugin["lifecycle"]["last_error"]
    assert client.get("/v1/plugins/tk/health").json()["healthy"] is False

    # A later successful call recovers it.
    ok_id = client.post("/v1/jobs", json={"pipeline": [pipeline[0]], "input": {"count": 1}}).json()["job_id"]
    assert wait_job(client, ok_id)["status"] == "succeeded"
    assert client.get("/v1/plugins/testkit/health").json()["healthy"] is True


def test_two_concurrent_jobs_never_mix(api: ApiServer) -> None:
    import json

    from websockets.sync.client import connect

    client = api.client()
    with connect(f"{api.ws_url}/v1/ws/jobs") as all_ws:
        slow = [{"plugin": "testkit", "tool": "sleep", "config": {"seconds": 0.3}}, *THREE_STAGES]
        ids = [
            client.post("/v1/jobs", json={"job_id": f"mix-{n}", "pipeline": slow, "input": {"count": n}}).json()[
                "job_id"
            ]
            for n in (2, 3)
        ]
        per_job = {job_id: ws_collect(f"{api.ws_url}/v1/ws/jobs/{job_id}")[0] for job_id in ids}
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while sum(1 for m in seen if m["type"] == "job_status" and m["status"] in TERMINAL) < 2:
            seen.append(json.loads(all_ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
    for job_id, messages in per_job.items():
        assert {m["job_id"] for m in messages} == {job_id}
        _assert_gapless(messages)
        assert messages[-1]["status"] == "succeeded"
        from_all = [{k: v for k, v in m.items() if k != "cursor"} for m in seen if m["job_id"] == job_id]
        assert from_all == messages
    cursors = [m["cursor"] for m in seen]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    totals = {j: client.get(f"/v1/jobs/{j}").json()["envelope"]["result"]["total"] for j in ids}
    assert totals == {"mix-2": 3, "mix-3": 9}


def test_template_statistics_change_after_runs(api: ApiServer) -> None:
    client = api.client()
    stages = [{"plugin": "testkit", "tool": "numbers"}, {"plugin": "testkit", "tool": "scale"}]
    assert client.post("/v1/pipelines", json={"name": "Scaled Numbers", "stages": stages}).status_code == 201
    before = client.get("/v1/pipelines/scaled-numbers").json()
    assert before["runs"]["total"] == 0 and before["last_used"] is None and before["success_rate"] is None
    assert before["job_input_fields"] == ["count"]

    ids = [
        client.post("/v1/jobs", json={"pipeline_id": "scaled-numbers", "input": {"count": n}}).json()["job_id"]
        for n in (1, 2)
    ]
    for job_id in ids:
        assert wait_job(client, job_id)["status"] == "succeeded"
    after = client.get("/v1/pipelines/scaled-numbers").json()
    assert after["runs"]["total"] == 2 and after["runs"]["succeeded"] == 2
    assert after["success_rate"] == 1.0 and after["last_used"] is not None
    assert [s["runs"] for s in after["stage_stats"]] == [2, 2]
    assert all(s["mean_duration_ms"] is not None for s in after["stage_stats"])
    assert after["mean_duration_ms"] is not None
    listed = client.get("/v1/pipelines").json()
    assert [(p["id"], p["name"]) for p in listed] == [("scaled-numbers", "Scaled Numbers")]
    assert set(listed[0]) >= {"id", "name", "stages", "created_at"}


def _flow_run_state(prefect_api_url: str, flow_run_id: str) -> str:
    import httpx

    return httpx.get(f"{prefect_api_url}/flow_runs/{flow_run_id}", timeout=10).json()["state"]["type"]


def test_cancel_running_and_queued_jobs(api_factory: Any, prefect_api_url: str) -> None:
    api = api_factory(max_concurrent_jobs=1)
    client = api.client()
    hang = [{"plugin": "testkit", "tool": "hang", "config": {"seconds": 600}}]
    running = client.post("/v1/jobs", json={"job_id": "hangs", "pipeline": hang}).json()["job_id"]
    queued = client.post("/v1/jobs", json={"job_id": "waits", "pipeline": hang}).json()["job_id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{running}/pipeline").json()["current_stage"] != 0:
        assert time.monotonic() < deadline, "the hang stage never started"
        time.sleep(0.1)
    assert client.get(f"/v1/jobs/{queued}").json()["status"] == "queued"

    response = client.post(f"/v1/jobs/{queued}/cancel")
    assert response.status_code == 202
    assert wait_job(client, queued, timeout=10)["status"] == "cancelled"

    proc = api.state.launcher.procs[running]
    assert client.post(f"/v1/jobs/{running}/cancel").status_code == 202
    job = wait_job(client, running, timeout=60)
    assert job["status"] == "cancelled"
    assert job["envelope"]["ok"] is False
    deadline = time.monotonic() + 30
    while (end := proc.poll()) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert end == JobEnd("cancelled")  # the engine ended it cancelled, and keeps running
    assert _flow_run_state(prefect_api_url, job["flow_run_id"]) == "CANCELLED"
    messages, _ = ws_collect(f"{api.ws_url}/v1/ws/jobs/{running}")
    _assert_gapless(messages)
    assert messages[-1]["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{running}/cancel").status_code == 409


def test_killed_job_process_is_reconciled_as_crashed(api: ApiServer, prefect_api_url: str) -> None:
    import os
    import signal

    client = api.client()
    pipeline = [*THREE_STAGES, {"plugin": "testkit", "tool": "sleep", "config": {"seconds": 120}}]
    job_id = client.post("/v1/jobs", json={"pipeline": pipeline, "input": {"count": 3}}).json()["job_id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job_id}/pipeline").json()["current_stage"] != 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(api.state.launcher.procs[job_id].pid, signal.SIGKILL)
    job = wait_job(client, job_id, timeout=60)
    assert job["status"] == "crashed"
    assert job["envelope"]["ok"] is False and job["envelope"]["stage_failed"] == 3
    assert job["envelope"]["partial_result"]["total"] == 9
    messages, close = ws_collect(f"{api.ws_url}/v1/ws/jobs/{job_id}")
    _assert_gapless(messages)
    assert [m["type"] for m in messages[-2:]] == ["pipeline_error", "job_status"]
    assert messages[-2]["stage_index"] == 3 and close.code == 1000
    assert _flow_run_state(prefect_api_url, job["flow_run_id"]) == "CRASHED"


@pytest.mark.every_database
@pytest.mark.parametrize("job_dies_meanwhile", [False, True], ids=["job-survives", "job-killed-while-api-down"])
def test_api_restart_mid_job_loses_nothing(
    tmp_path: Any, database_url: str, prefect_api_url: str, job_dies_meanwhile: bool
) -> None:
    import os
    import signal

    from forgeflow.api.store import Store
    from tests.conftest import free_port
    from tests.test_api.conftest import start_subprocess_server

    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    first = start_subprocess_server(
        home,
        port,
        database_url=database_url,
        prefect_api_url=prefect_api_url,
        extra_env={"FORGEFLOW_MAX_CONCURRENT_JOBS": "1"},
    )
    second = None
    try:
        client = first.client()
        slow = [{"plugin": "testkit", "tool": "sleep", "config": {"seconds": 4}}, *THREE_STAGES]
        running = client.post("/v1/jobs", json={"job_id": "survivor", "pipeline": slow, "input": {"count": 2}})
        assert running.status_code == 202
        queued = client.post(
            "/v1/jobs", json={"job_id": "next-in-line", "pipeline": THREE_STAGES, "input": {"count": 1}}
        )
        assert queued.status_code == 202
        deadline = time.monotonic() + 60
        while client.get("/v1/jobs/survivor/pipeline").json()["current_stage"] != 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        first.kill()  # SIGKILL: no shutdown hook runs
        if job_dies_meanwhile:
            store = Store(database_url)
            pid = store.get_job("survivor")["pid"]
            store.close()
            os.killpg(pid, signal.SIGKILL)
        time.sleep(1.0)
        second = start_subprocess_server(
            home,
            port,
            database_url=database_url,
            prefect_api_url=prefect_api_url,
            extra_env={"FORGEFLOW_MAX_CONCURRENT_JOBS": "1"},
        )
        client = second.client()
        expected = {"survivor": ("crashed" if job_dies_meanwhile else "succeeded", 3), "next-in-line": ("succeeded", 0)}
        for job_id, (status, total) in expected.items():
            job = wait_job(client, job_id, timeout=120)
            assert job["status"] == status, job
            messages, _ = ws_collect(f"{second.ws_url}/v1/ws/jobs/{job_id}")
            _assert_gapless(messages)
            kinds = [m["type"] for m in messages]
            assert kinds.count("job_status") == 3  # queued, running, terminal: nothing lost, nothing twice
            if status == "succeeded":
                assert job["envelope"]["result"]["total"] == total
                assert kinds.count("pipeline_stage_end") == len(job["pipeline"]["stages"])
            else:
                assert job["envelope"]["stage_failed"] == 0 and kinds[-2] == "pipeline_error"
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()


def test_in_stage_progress_streams_and_the_result_is_stored_once(api_factory: Any) -> None:
    api = api_factory(progress_interval_s=0)
    client = api.client()
    pad = "A" * (1024 * 1024 - 300)  # a job input just under FORGEFLOW_MAX_JOB_INPUT_BYTES reaches its flow run
    stages = [
        {"plugin": "testkit", "tool": "steps", "config": {"steps": 3, "delay_s": 0.2}},
        {"plugin": "testkit", "tool": "numbers"},
    ]
    body = {"job_id": "job-steps", "pipeline": stages, "input": {"count": 3000, "pad": pad}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text[:500]
    messages, close = ws_collect(f"{api.ws_url}/v1/ws/jobs/job-steps")
    assert close is not None and close.code == 1000
    _assert_gapless(messages)
    first_stage = [m["type"] for m in messages if m.get("stage_index") == 0]
    assert first_stage == ["pipeline_stage_start"] + ["pipeline_stage_progress"] * 3 + ["pipeline_stage_end"], [
        m["type"] for m in messages
    ]
    reports = [m for m in messages if m["type"] == "pipeline_stage_progress"]
    assert [(r["done"], r["total"], r["message"]) for r in reports] == [(i, 3, f"step {i}") for i in (1, 2, 3)]
    assert reports[-1]["fraction"] == 1.0 and reports[-1]["plugin"] == "testkit" and reports[-1]["tool"] == "steps"

    job = client.get("/v1/jobs/job-steps").json()
    assert job["status"] == "succeeded", job.get("error")
    result = job["envelope"]["result"]
    assert result["numbers"] == list(range(3000)) and result["steps"] == 3
    terminal = messages[-1]
    assert terminal["type"] == "job_status" and terminal["status"] == "succeeded"
    assert "result" not in terminal["envelope"]  # the result is stored once, with the job
    assert terminal["envelope"]["result_size_bytes"] == len(json.dumps(result, separators=(",", ":")).encode())
    assert sum(len(json.dumps(m)) for m in messages) < 20_000
    state = client.get("/v1/jobs/job-steps/pipeline").json()
    kept = state["stages"][0]["progress"]
    assert {k: kept[k] for k in ("done", "total", "fraction", "message")} == {
        "done": 3,
        "total": 3,
        "fraction": 1.0,
        "message": "step 3",
    }
    assert kept["rate"] > 0 and kept["eta_s"] == 0  # frames/s and the time left ride along
    assert state["stages"][1]["progress"] is None
