"""The stage loop without Prefect (``forgeflow.jobs.stages``): inline runner, in-memory sink.

The same loop runs inside the Prefect flow (one task per stage, whose hooks make the same
transitions); here it runs in this thread, so its contract is checked in milliseconds.
"""

from __future__ import annotations

from typing import Any

import pytest

from forgeflow.engine.runners.inline import InlineRunner
from forgeflow.events.sinks import MemorySink
from forgeflow.jobs.stages import JobRun, PipelineFailed, Services, execute
from forgeflow.pipeline import outcome
from forgeflow.pipeline.definition import PipelineDefinition
from forgeflow.settings import get_settings
from tests.test_pipeline_orchestration.conftest import run_stage_loop

pytestmark = pytest.mark.fast


def _run(registry: Any, stages: list[dict[str, Any]], job_input: dict[str, Any]):
    envelope, events = run_stage_loop(registry, stages, job_input)
    return envelope, [e.model_dump(mode="json") for e in events]


def test_outputs_feed_the_next_stage_and_events_come_in_order(registry):
    stages = [
        {"plugin": "testkit", "tool": "numbers", "config": {"start": 2}},
        {"plugin": "testkit", "tool": "scale", "config": {"factor": 10}},
        {"plugin": "testkit", "tool": "total"},
    ]
    envelope, events = _run(registry, stages, {"count": 3})
    assert envelope["ok"] is True
    assert envelope["result"] == {"numbers": [2, 3, 4], "scaled": [20, 30, 40], "total": 90}
    assert envelope["stages_executed"] == 3
    assert [s["status"] for s in envelope["stages"]] == ["completed"] * 3
    kinds = [(e["type"], e.get("stage_index")) for e in events]
    assert kinds == [
        ("pipeline_stage_start", 0), ("pipeline_stage_end", 0), ("pipeline_progress", None),
        ("pipeline_stage_start", 1), ("pipeline_stage_end", 1), ("pipeline_progress", None),
        ("pipeline_stage_start", 2), ("pipeline_stage_end", 2), ("pipeline_progress", None),
        ("job_status", None),
    ]  # fmt: skip
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["percent"] for e in events if e["type"] == "pipeline_progress"] == [33, 67, 100]
    assert events[-1]["status"] == "succeeded" and events[-1]["envelope"] == envelope


def test_a_failing_stage_keeps_the_partial_result_and_skips_the_rest(registry):
    stages = [
        {"plugin": "testkit", "tool": "numbers"},
        {"plugin": "testkit", "tool": "fail", "config": {"message": "boom at stage 1"}},
        {"plugin": "testkit", "tool": "noop"},
    ]
    envelope, events = _run(registry, stages, {"count": 2})
    assert envelope["ok"] is False
    assert (envelope["error_type"], envelope["error"], envelope["stage_failed"]) == (
        "RuntimeError",
        "boom at stage 1",
        1,
    )
    assert envelope["partial_result"] == {"numbers": [0, 1]}
    assert [s["status"] for s in envelope["stages"]] == ["completed", "failed", "skipped"]
    assert envelope["stages"][1]["error"] == "boom at stage 1"
    error = next(e for e in events if e["type"] == "pipeline_error")
    assert (error["stage_index"], error["plugin"], error["tool"]) == (1, "testkit", "fail")
    end = next(e for e in events if e["type"] == "pipeline_stage_end" and e["stage_index"] == 1)
    assert end["ok"] is False
    assert not any(e.get("stage_index") == 2 for e in events)  # the stage after the failure never starts
    assert events[-1]["type"] == "job_status" and events[-1]["status"] == "failed"


def test_an_invalid_pipeline_runs_nothing_and_names_the_stage(registry):
    stages = [{"plugin": "testkit", "tool": "numbers"}, {"plugin": "testkit", "tool": "no_such_tool"}]
    envelope, events = _run(registry, stages, {"count": 1})
    assert envelope["ok"] is False
    assert envelope["error_type"] == "PipelineValidationError"
    assert envelope["stage_failed"] == 1
    assert [s["status"] for s in envelope["stages"]] == ["skipped", "failed"]
    assert [e["type"] for e in events] == ["pipeline_error", "job_status"]
    assert events[0]["stage_index"] == 1 and "no_such_tool" in events[0]["error"]


def test_a_job_cancelled_before_a_stage_starts_none(registry):
    settings = get_settings()

    class CancelledRunner(InlineRunner):
        def is_cancelled(self, job_id: str) -> bool:
            return True

    sink = MemorySink()
    services = Services(settings, registry, CancelledRunner(settings, registry), sink)
    definition = PipelineDefinition.model_validate({"stages": [{"plugin": "testkit", "tool": "noop"}]})
    run = JobRun("job-cancelled", services, outcome.pending_reports(definition.stages))
    with pytest.raises(PipelineFailed) as failed:
        execute(run, definition, None, {})
    envelope = failed.value.envelope
    assert envelope.error_type == "Cancelled"
    assert [s.status for s in envelope.stages] == ["cancelled"]
    assert [e.type for e in sink.events] == ["job_status"]
    assert sink.events[-1].status == "cancelled"  # type: ignore[union-attr]


def test_a_tools_progress_is_streamed_between_its_stage_start_and_end(registry, monkeypatch):
    monkeypatch.setenv("FORGEFLOW_PROGRESS_INTERVAL_S", "0")
    get_settings.cache_clear()
    envelope, events = _run(registry, [{"plugin": "testkit", "tool": "steps", "config": {"steps": 3}}], {})
    assert envelope["ok"] is True
    kinds = [e["type"] for e in events]
    assert kinds == ["pipeline_stage_start"] + ["pipeline_stage_progress"] * 3 + [
        "pipeline_stage_end",
        "pipeline_progress",
        "job_status",
    ]
    progress = [e for e in events if e["type"] == "pipeline_stage_progress"]
    assert [(p["stage_index"], p["plugin"], p["tool"]) for p in progress] == [(0, "testkit", "steps")] * 3
    assert [(p["done"], p["total"], p["fraction"], p["message"]) for p in progress] == [
        (1, 3, 1 / 3, "step 1"),
        (2, 3, 2 / 3, "step 2"),
        (3, 3, 1.0, "step 3"),
    ]


def test_a_stage_written_with_an_alias_is_reported_under_the_canonical_name(registry):
    stages = [{"plugin": "tk", "tool": "numbers"}, {"plugin": "tk", "tool": "fail"}]
    envelope, events = _run(registry, stages, {"count": 2})
    assert [s["plugin"] for s in envelope["stages"]] == ["testkit", "testkit"]
    named = [e["plugin"] for e in events if "plugin" in e and e["type"] != "job_status"]
    assert named and set(named) == {"testkit"}, named
