"""A failing stage stops the pipeline, is isolated, and marks its plugin FAILED."""

from __future__ import annotations

import pytest

from .conftest import chain, prefect_flow_run, prefect_task_runs


def test_pipeline_error_in_stage_2_stops_execution(executor, services):
    envelope = executor.execute(
        chain("numbers", "scale", "fail", "sleep", fail={"message": "model exploded"}), {"count": 3}, "job-fail"
    )
    assert envelope["ok"] is False
    assert envelope["stage_failed"] == 2
    assert envelope["error_type"] == "RuntimeError"
    assert "model exploded" in envelope["error"]
    assert envelope["stages_executed"] == 2
    assert [s["status"] for s in envelope["stages"]] == ["completed", "completed", "failed", "skipped"]
    started = [e.stage_index for e in services.sink.events if e.type == "pipeline_stage_start"]
    assert started == [0, 1, 2]  # stage 3 never ran

    flow_run_id = next(e.flow_run_id for e in services.sink.events if e.type == "job_status")
    assert prefect_flow_run(flow_run_id)["state"]["type"] == "FAILED"
    states = {r["name"]: r["state"]["type"] for r in prefect_task_runs(flow_run_id, 3)}
    assert states == {
        "stage-0: testkit.numbers": "COMPLETED",
        "stage-1: testkit.scale": "COMPLETED",
        "stage-2: testkit.fail": "FAILED",
    }


def test_failed_plugin_is_marked_failed_and_recovers_on_the_next_success(executor, services):
    executor.execute(chain("fail", fail={"message": "bad frame", "error": "ValueError"}), {}, "job-f1")
    status = services.registry.status("testkit")
    assert status.state == "FAILED"
    assert status.last_error_type == "ValueError"
    assert "bad frame" in status.last_error
    failures = status.failures
    envelope = executor.execute(chain("numbers"), {"count": 1}, "job-f2")
    assert envelope["ok"]
    status = services.registry.status("testkit")
    assert status.state == "INITIALIZED"
    assert status.failures == failures


@pytest.mark.parametrize(
    ("tool", "config", "error_type", "text"),
    [
        ("segfault", {}, "WorkerCrashed", "SIGSEGV"),
        ("hard_exit", {"code": 7}, "WorkerCrashed", "7"),
        ("allocate", {"megabytes": 2048}, "MemoryError", "memory"),
    ],
)
def test_crashing_stages_fail_their_stage_not_the_caller(executor, tool, config, error_type, text):
    pipeline = {
        "pipeline": [
            {"plugin": "testkit", "tool": "numbers"},
            {"plugin": "testkit", "tool": tool, "config": config, "memory_limit_mb": 256},
        ]
    }
    envelope = executor.execute(pipeline, {"count": 2}, f"job-{tool}")
    assert envelope["ok"] is False
    assert envelope["stage_failed"] == 1
    assert envelope["error_type"] == error_type
    assert text.lower() in envelope["error"].lower()
    assert envelope["partial_result"] == {"numbers": [0, 1]}
    # the next job runs normally
    assert executor.execute(chain("numbers", "scale"), {"count": 2}, f"job-after-{tool}")["ok"]


def test_a_failure_does_not_leak_into_another_stages_config(executor):
    failed = executor.execute(chain("numbers", "scale", "fail", scale={"factor": 100}), {"count": 2}, "job-x")
    assert failed["partial_result"]["scaled"] == [0, 100]
    envelope = executor.execute(chain("numbers", "scale"), {"count": 2}, "job-y")
    assert envelope["result"]["scaled"] == [0, 2]  # the default factor, untouched by the failed job


def test_an_invalid_pipeline_runs_no_stage(executor, services):
    envelope = executor.execute(
        {"pipeline": [{"plugin": "testkit", "tool": "numbers"}, {"plugin": "testkit", "tool": "label_total"}]},
        {"count": 2},
        "job-invalid",
    )
    assert envelope["ok"] is False
    assert envelope["error_type"] == "PipelineValidationError"
    assert envelope["stage_failed"] == 1
    assert not [e for e in services.sink.events if e.type == "pipeline_stage_start"]
    errors = [e for e in services.sink.events if e.type == "pipeline_error"]
    assert errors and errors[0].stage_index == 1
