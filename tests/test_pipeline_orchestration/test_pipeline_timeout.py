"""Per-stage timeouts kill the stage; a job killed without hooks or cancelled still ends cleanly."""

from __future__ import annotations

import os
import signal
import time

import psutil

from forgeflow.jobs.supervise import JobProcess, JobSpec, reconcile_crash

from .conftest import chain, prefect_flow_run

HANG = {"plugin": "testkit", "tool": "hang", "config": {"seconds": 3600}}


def _worker_processes(job: JobProcess) -> list[psutil.Process]:
    """The testkit workers the job process started (only its own: other tests, in this process or
    in another pytest-xdist worker, may run testkit workers at the same time)."""
    found = []
    for proc in psutil.Process(job.pid).children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if "forgeflow.engine.runners.worker" in cmdline and "testkit" in cmdline:
            found.append(proc)
    return found


def test_stage_timeout_kills_the_stage_within_grace(executor, services):
    started = time.monotonic()
    envelope = executor.execute(
        {"pipeline": [{"plugin": "testkit", "tool": "numbers"}, HANG], "timeout_seconds": 2.0}, {"count": 2}, "job-to"
    )
    elapsed = time.monotonic() - started
    assert envelope["ok"] is False
    assert envelope["error_type"] == "TimeoutError"
    assert envelope["stage_failed"] == 1
    assert envelope["partial_result"] == {"numbers": [0, 1]}
    end = next(e for e in services.sink.events if e.type == "pipeline_stage_end" and e.stage_index == 1)
    assert 2000 <= end.duration_ms < 4000
    assert elapsed < 60  # the hang (an hour) did not run on
    # the stage can run again straight away with a fresh worker
    assert executor.execute(chain("numbers"), {"count": 1}, "job-to-after")["ok"]


def test_a_stage_timeout_overrides_the_pipeline_timeout(executor):
    pipeline = {"pipeline": [{**HANG, "timeout_seconds": 1.0}], "timeout_seconds": 300}
    started = time.monotonic()
    envelope = executor.execute(pipeline, {}, "job-to-stage")
    assert envelope["error_type"] == "TimeoutError"
    assert envelope["stages"][0]["duration_ms"] < 3000
    assert time.monotonic() - started < 60


def _start(ingest, job_id: str, pipeline: dict, job_input: dict) -> JobProcess:
    return JobProcess.start(JobSpec(job_id, pipeline, job_input), api_url=ingest.url, ingest_token=ingest.token)


def test_sigkilled_job_still_ends_with_a_terminal_message(ff_home, prefect_api_url, ingest):
    """SIGKILL runs no Prefect hook: reconciliation sends the terminal messages and marks the run Crashed."""
    pipeline = {"pipeline": [{"plugin": "testkit", "tool": "numbers"}, HANG]}
    job = _start(ingest, "job-kill", pipeline, {"count": 3})
    ingest.wait_for(
        lambda e: e["job_id"] == "job-kill" and e["type"] == "pipeline_stage_start" and e["stage_index"] == 1
    )
    workers = _worker_processes(job)
    assert workers
    os.kill(job.pid, signal.SIGKILL)  # the flow-run process only: no hook, no cleanup
    assert job.wait(10) == -signal.SIGKILL
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)  # the stage died with it

    events = ingest.for_job("job-kill")
    assert not any(e["type"] == "job_status" and e["status"] != "running" for e in events)
    flow_run_id = next(e["flow_run_id"] for e in events if e["type"] == "job_status")
    terminal = reconcile_crash(
        "job-kill", reason="job process killed by SIGKILL", flow_run_id=flow_run_id, pipeline=pipeline, events=events
    )
    error, status = (e.model_dump() for e in terminal)
    assert error["type"] == "pipeline_error" and error["stage_index"] == 1 and error["error_type"] == "FlowRunCrashed"
    assert status["status"] == "crashed"
    assert status["envelope"]["partial_result"] == {"numbers": [0, 1, 2]}
    assert status["envelope"]["stage_failed"] == 1
    assert [s["status"] for s in status["envelope"]["stages"]] == ["completed", "failed"]
    assert prefect_flow_run(flow_run_id)["state"]["type"] == "CRASHED"


def test_cancelled_job_kills_its_stage_and_reports_cancelled(ff_home, prefect_api_url, ingest):
    pipeline = {"pipeline": [{"plugin": "testkit", "tool": "numbers"}, HANG, {"plugin": "testkit", "tool": "noop"}]}
    job = _start(ingest, "job-cancel", pipeline, {"count": 1})
    ingest.wait_for(
        lambda e: e["job_id"] == "job-cancel" and e["type"] == "pipeline_stage_start" and e["stage_index"] == 1
    )
    workers = _worker_processes(job)
    assert workers
    assert job.cancel(grace_s=20) == 3
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    terminal = ingest.wait_for(
        lambda e: e["job_id"] == "job-cancel" and e["type"] == "job_status" and e["status"] != "running"
    )
    assert [e["status"] for e in terminal] == ["cancelled"]  # one terminal message, no "crashed" after it
    assert terminal[0]["envelope"]["partial_result"] == {"numbers": [0]}
    assert [s["status"] for s in terminal[0]["envelope"]["stages"]] == ["completed", "cancelled", "skipped"]
    flow_run_id = terminal[0]["flow_run_id"]
    assert prefect_flow_run(flow_run_id)["state"]["type"] == "CANCELLED"
    seqs = [e["seq"] for e in ingest.for_job("job-cancel")]
    assert seqs == list(range(1, len(seqs) + 1))


def test_job_process_exit_codes(ff_home, prefect_api_url, ingest):
    ok = _start(ingest, "job-exit-ok", chain("numbers", "scale"), {"count": 2})
    failed = _start(ingest, "job-exit-fail", chain("fail"), {})
    invalid = _start(ingest, "job-exit-invalid", chain("total"), {})
    assert (ok.wait(120), failed.wait(120), invalid.wait(120)) == (0, 1, 2)
    terminal = [e for e in ingest.for_job("job-exit-ok") if e["type"] == "job_status"][-1]
    assert terminal["status"] == "succeeded"
    assert terminal["envelope"]["result"]["scaled"] == [0, 2]


def test_attach_watches_a_job_started_elsewhere(ff_home, prefect_api_url, ingest):
    job = _start(ingest, "job-attach", {"pipeline": [HANG]}, {})
    watcher = JobProcess.attach("job-attach", job.pid, job.create_time)
    assert watcher.poll() is None
    job.kill()
    job.wait(10)
    assert watcher.wait(10) == -1
