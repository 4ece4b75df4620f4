"""A pipeline runs as one Prefect flow run with one task per stage, in order, output feeding input."""

from __future__ import annotations

import os

from forgeflow.canonical import canonical_json
from forgeflow.pipeline.definition import PipelineDefinition

from .conftest import chain, prefect_flow_run, prefect_task_runs


def test_pipeline_executes_stages_in_order(executor, services):
    envelope = executor.execute(chain("numbers", "scale", "total"), {"count": 4}, "job-order")
    assert envelope["ok"] is True
    assert envelope["stages_executed"] == 3
    starts = [e.stage_index for e in services.sink.events if e.type == "pipeline_stage_start"]
    ends = [e.stage_index for e in services.sink.events if e.type == "pipeline_stage_end"]
    assert starts == ends == [0, 1, 2]
    kinds = [e.type for e in services.sink.events]
    # each stage ends before the next one starts
    for index in range(2):
        end_pos = next(
            i for i, e in enumerate(services.sink.events) if e.type == "pipeline_stage_end" and e.stage_index == index
        )
        start_next = next(
            i
            for i, e in enumerate(services.sink.events)
            if e.type == "pipeline_stage_start" and e.stage_index == index + 1
        )
        assert end_pos < start_next, kinds


def test_pipeline_passes_output_to_next_stage(executor):
    envelope = executor.execute(chain("numbers", "scale", "total", scale={"factor": 3}), {"count": 5}, "job-pass")
    assert envelope["result"] == {"numbers": [0, 1, 2, 3, 4], "scaled": [0, 3, 6, 9, 12], "total": 30}
    assert [s["status"] for s in envelope["stages"]] == ["completed"] * 3


def test_same_input_and_pipeline_give_a_byte_identical_result(executor):
    first = executor.execute(chain("numbers", "scale", "total"), {"count": 50}, "job-det-1")
    second = executor.execute(chain("numbers", "scale", "total"), {"count": 50}, "job-det-2")
    assert first["ok"] and second["ok"]
    assert first["result"]["total"] == 2 * sum(range(50))
    assert canonical_json(first["result"]).encode() == canonical_json(second["result"]).encode()


def test_one_prefect_task_per_stage_named_by_index_plugin_and_tool(executor, services):
    executor.execute(chain("numbers", "scale", "total"), {"count": 2}, "job-prefect")
    flow_run_id = next(e.flow_run_id for e in services.sink.events if e.type == "job_status")
    flow_run = prefect_flow_run(flow_run_id)
    assert flow_run["name"] == "job-job-prefect"
    assert flow_run["state"]["type"] == "COMPLETED"
    runs = prefect_task_runs(flow_run_id, 3)
    assert sorted(r["name"] for r in runs) == [
        "stage-0: testkit.numbers",
        "stage-1: testkit.scale",
        "stage-2: testkit.total",
    ]
    assert {r["state"]["type"] for r in runs} == {"COMPLETED"}


def test_stages_run_outside_the_callers_process_in_a_warm_worker(executor):
    first = executor.execute(chain("pid"), {}, "job-pid-1")
    second = executor.execute(chain("pid"), {}, "job-pid-2")
    assert first["result"]["pid"] != os.getpid()
    assert first["result"]["pid"] == second["result"]["pid"]  # the worker stays warm between jobs


def test_single_plugin_jobs_still_work_as_one_stage_pipelines(executor):
    legacy = PipelineDefinition.from_legacy("tk", "numbers", {"start": 10})
    envelope = executor.execute(legacy, {"count": 3}, "job-legacy")
    assert {k: v for k, v in envelope.items() if k != "stages"} == {
        "ok": True,
        "result": {"numbers": [10, 11, 12]},
        "stages_executed": 1,
    }
    [stage] = envelope["stages"]
    # the envelope names the plugin canonically, not by the alias the legacy job gave
    assert (stage["index"], stage["plugin"], stage["tool"], stage["status"]) == (0, "testkit", "numbers", "completed")
    assert stage["error"] is None and stage["duration_ms"] is not None
    assert stage["result_size_bytes"] == len(b'{"numbers":[10,11,12]}')


def test_successful_calls_leave_plugins_initialized_with_counters(executor, services):
    executor.execute(chain("numbers", "scale"), {"count": 1}, "job-lifecycle")
    status = services.registry.status("testkit")
    assert status.state == "INITIALIZED"
    assert status.calls >= 2
    assert status.last_duration_ms is not None


def test_a_job_input_larger_than_prefect_takes_reaches_its_flow_run_through_a_file(executor, services):
    from forgeflow.jobs.flow import INLINE_PARAMETERS_MAX

    pad = "A" * (2 * INLINE_PARAMETERS_MAX)  # past Prefect's 512 KiB limit on flow-run parameters
    envelope = executor.execute(chain("numbers", "scale", "total"), {"count": 4, "pad": pad}, "job-spill")
    assert envelope["ok"] is True and envelope["result"]["total"] == 12
    flow_run_id = next(e.flow_run_id for e in services.sink.events if e.type == "job_status")
    parameters = prefect_flow_run(flow_run_id)["parameters"]
    assert parameters["job_id"] == "job-spill" and parameters["input"] is None and parameters["pipeline"] is None
    spilled = services.settings.jobs_dir / "job-spill" / "parameters.json"
    assert parameters["parameters_file"] == str(spilled)
    assert len(spilled.read_bytes()) > 2 * INLINE_PARAMETERS_MAX
