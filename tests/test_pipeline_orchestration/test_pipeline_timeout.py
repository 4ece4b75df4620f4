"""Per-stage timeouts kill the stage and the pipeline's timeout yields to a stage's own.

A job killed without hooks or cancelled mid-stage is tested where jobs run: on the engine
(``tests/test_engine/test_job_handles.py``) and through the API (``test_api_jobs.py``)."""

from __future__ import annotations

import time

from .conftest import chain

HANG = {"plugin": "testkit", "tool": "hang", "config": {"seconds": 3600}}


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
