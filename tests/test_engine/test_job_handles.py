"""The launcher's view of a job on this host's engine (:class:`EngineJobHandle`): how the job
ended, as a status, for a job that succeeded, failed, was cancelled, or lost its engine."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

from forgeflow.engine.client import EngineUnavailable
from forgeflow.jobs.engine_jobs import EngineJobHandle
from forgeflow.jobs.handle import JobEnd, JobHandle
from forgeflow.processes import pid_alive, process_create_time

from .test_engine import SLEEP, in_thread, run, wait_for, workers_of


def _handle(client: Any, job_id: str) -> EngineJobHandle:
    pid = int(client.status()["pid"])
    return EngineJobHandle(job_id, client, pid, process_create_time(pid))


def test_a_handle_says_how_an_engine_job_ended(start_engine: Any) -> None:
    client = start_engine()
    assert isinstance(_handle(client, "x"), JobHandle)
    run(client, "ok", [{"plugin": "testkit", "tool": "noop"}])
    run(client, "broken", [{"plugin": "testkit", "tool": "fail"}])
    assert _handle(client, "ok").poll() == JobEnd("succeeded")
    assert _handle(client, "broken").poll() == JobEnd("failed")
    unknown = _handle(client, "never-submitted").poll()
    assert unknown is not None and unknown.status == "crashed" and "no longer knows" in (unknown.reason or "")


def test_a_handle_cancels_a_running_job_and_reports_it_cancelled(start_engine: Any) -> None:
    client = start_engine()
    thread, _ = in_thread(lambda: run(client, "long", [{**SLEEP, "config": {"seconds": 60}}]))
    wait_for(lambda: any(w["job_id"] == "long" for w in workers_of(client, "testkit")))
    handle = _handle(client, "long")
    assert handle.poll(client.jobs(active_only=True)) is None  # running
    started = time.monotonic()
    assert handle.cancel(grace_s=30) == JobEnd("cancelled")
    assert time.monotonic() - started < 30
    thread.join(30)


def test_a_handle_whose_engine_died_says_crashed_with_the_reason(start_engine: Any) -> None:
    client = start_engine()

    def run_until_the_engine_dies() -> None:
        with contextlib.suppress(EngineUnavailable):
            run(client, "orphan", [{**SLEEP, "config": {"seconds": 60}}])

    thread, _ = in_thread(run_until_the_engine_dies)
    wait_for(lambda: any(w["job_id"] == "orphan" for w in workers_of(client, "testkit")))
    handle = _handle(client, "orphan")
    assert handle.poll() is None
    os.kill(handle.pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(handle.pid, handle.create_time), timeout=30)
    end = handle.poll()
    assert end is not None and end.status == "crashed"
    assert f"pid {handle.pid}" in (end.reason or "") and "without reporting its result" in (end.reason or "")
    thread.join(30)
