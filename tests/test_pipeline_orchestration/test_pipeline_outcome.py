"""How a job ends (forgeflow.pipeline.outcome): pure functions, tested in-process on hand-made reports."""

from __future__ import annotations

from typing import Any

import pytest

from forgeflow.events.reduce import replay
from forgeflow.pipeline import outcome
from forgeflow.pipeline.definition import PipelineStage
from forgeflow.pipeline.outcome import EndReason, StageReport

pytestmark = pytest.mark.fast

STAGES = [
    {"plugin": "testkit", "tool": "numbers"},
    {"plugin": "tk", "tool": "scale"},
    {"plugin": "testkit", "tool": "total"},
]


def reports(*statuses: str) -> list[StageReport]:
    """Reports of the three STAGES with the given statuses."""
    return [
        StageReport(index=i, plugin=s["plugin"], tool=s["tool"], status=status)  # type: ignore[arg-type]
        for i, (s, status) in enumerate(zip(STAGES, statuses, strict=True))
    ]


def statuses(items: list[StageReport] | list[dict[str, Any]]) -> list[str]:
    return [r["status"] if isinstance(r, dict) else r.status for r in items]


def stage_event(kind: str, index: Any, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "stage_index": index, **fields}


# --- pending_reports ------------------------------------------------------------------------------


def test_pending_reports_from_models_mappings_and_anything_else():
    from_json = outcome.pending_reports(STAGES)
    assert [(r.index, r.plugin, r.tool, r.status) for r in from_json] == [
        (0, "testkit", "numbers", "pending"),
        (1, "tk", "scale", "pending"),
        (2, "testkit", "total", "pending"),
    ]
    from_models = outcome.pending_reports([PipelineStage(plugin="pose", tool="estimate_poses")])
    assert [(r.index, r.plugin, r.tool) for r in from_models] == [(0, "pose", "estimate_poses")]
    # a stage with missing or null names, or something that is no stage at all, gives blanks
    odd = outcome.pending_reports([{"plugin": None}, 42])
    assert [(r.index, r.plugin, r.tool, r.status) for r in odd] == [(0, "", "", "pending"), (1, "", "", "pending")]
    assert outcome.pending_reports([]) == []


# --- replay -----------------------------------------------------------------------------------------


def test_replay_follows_stage_starts_and_ends():
    before = outcome.pending_reports(STAGES)
    after = replay(
        before,
        [
            {"type": "job_status", "status": "running"},
            stage_event("pipeline_stage_start", 0),
            stage_event("pipeline_stage_end", 0, ok=True, duration_ms=12, result_size_bytes=40, peak_memory_mb=50.5),
            stage_event("pipeline_stage_start", 1),
            stage_event("pipeline_stage_end", 1, ok=False, duration_ms=7, result_size_bytes=0),
            stage_event("pipeline_stage_start", 2),
        ],
    )
    assert statuses(after) == ["completed", "failed", "running"]
    assert (after[0].duration_ms, after[0].result_size_bytes, after[0].peak_memory_mb) == (12, 40, 50.5)
    assert (after[1].duration_ms, after[1].result_size_bytes, after[1].peak_memory_mb) == (7, 0, None)
    assert after[2].duration_ms is None
    assert statuses(before) == ["pending"] * 3  # the given reports are left as they were


def test_replay_ignores_events_that_name_no_known_stage():
    before = outcome.pending_reports(STAGES)
    after = replay(
        before,
        [
            stage_event("pipeline_stage_start", 3),
            stage_event("pipeline_stage_start", -1),
            stage_event("pipeline_stage_start", "0"),
            stage_event("pipeline_stage_end", None, ok=True),
            stage_event("pipeline_progress", 0),
            {"type": "pipeline_stage_start"},
        ],
    )
    assert after == before


# --- settle -----------------------------------------------------------------------------------------


def test_settle_at_a_failed_stage_skips_the_rest_and_keeps_settled_ones():
    settled = outcome.settle(reports("completed", "running", "pending"), stage_failed=1, error="boom", error_type="E")
    assert statuses(settled) == ["completed", "failed", "skipped"]
    assert (settled[1].error, settled[1].error_type) == ("boom", "E")
    assert settled[2].error is None


def test_settle_without_a_stage_index_ends_the_running_stage():
    settled = outcome.settle(reports("completed", "running", "pending"), stage_failed=None, ending="cancelled")
    assert statuses(settled) == ["completed", "cancelled", "skipped"]
    nothing_running = outcome.settle(reports("completed", "pending", "pending"), stage_failed=None)
    assert statuses(nothing_running) == ["completed", "skipped", "skipped"]


def test_settle_keeps_a_stages_own_error_and_earlier_endings():
    own = reports("failed", "running", "pending")
    own[0] = own[0].model_copy(update={"error": "its own", "error_type": "ValueError"})
    own[1] = own[1].model_copy(update={"error": "worker said", "error_type": "WorkerCrashed"})
    settled = outcome.settle(own, stage_failed=1, error="generic", error_type="FlowRunCrashed")
    assert statuses(settled) == ["failed", "failed", "skipped"]  # a failed stage stays failed
    assert (settled[0].error, settled[1].error, settled[1].error_type) == ("its own", "worker said", "WorkerCrashed")
    cancelled = outcome.settle(reports("completed", "cancelled", "pending"), stage_failed=1)
    assert statuses(cancelled) == ["completed", "cancelled", "skipped"]
    assert statuses(own) == ["failed", "running", "pending"]  # inputs are not changed


# --- the four endings ------------------------------------------------------------------------------


def test_succeeded_envelope():
    envelope = outcome.succeeded({"total": 6}, reports("completed", "completed", "completed"))
    assert envelope.ok is True and envelope.result == {"total": 6} and envelope.stages_executed == 3
    data = envelope.to_dict()
    assert data["ok"] is True and data["result"] == {"total": 6} and data["stages_executed"] == 3
    assert not {"error", "error_type", "stage_failed", "partial_result"} & set(data)
    assert statuses(data["stages"]) == ["completed"] * 3
    assert outcome.job_status_of(data) == "succeeded"


def test_failed_envelope_names_the_stage_and_keeps_the_partial_result():
    envelope = outcome.failed(
        reports("completed", "running", "pending"),
        error="model exploded",
        error_type="RuntimeError",
        stage_failed=1,
        partial_result={"numbers": [0, 1]},
    )
    data = envelope.to_dict()
    assert "result" not in data
    assert (data["ok"], data["error"], data["error_type"], data["stage_failed"]) == (
        False,
        "model exploded",
        "RuntimeError",
        1,
    )
    assert data["partial_result"] == {"numbers": [0, 1]} and data["stages_executed"] == 1
    assert statuses(data["stages"]) == ["completed", "failed", "skipped"]
    assert outcome.job_status_of(data) == "failed"


def test_failed_before_any_stage_has_an_empty_partial_result():
    envelope = outcome.failed(
        outcome.pending_reports(STAGES), error="bad", error_type=EndReason.VALIDATION, stage_failed=None
    )
    assert envelope.partial_result == {} and envelope.stage_failed is None and envelope.stages_executed == 0
    assert statuses(envelope.stages) == ["skipped"] * 3
    assert envelope.to_dict()["error_type"] == "PipelineValidationError"


def test_failed_with_a_cancelled_ending():
    envelope = outcome.failed(
        reports("completed", "running", "pending"),
        error="cancelled by request",
        error_type=EndReason.CANCELLED,
        stage_failed=1,
        ending="cancelled",
    )
    assert statuses(envelope.stages) == ["completed", "cancelled", "skipped"]
    assert outcome.job_status_of(envelope.to_dict()) == "cancelled"


def test_crashed_while_running_blames_the_running_stage():
    envelope = outcome.ended_abnormally(
        reports("completed", "running", "pending"),
        status="crashed",
        error="job process killed by SIGKILL",
        error_type=EndReason.FLOW_RUN_CRASHED,
        partial_result={"numbers": [0]},
    )
    assert envelope.ok is False and envelope.stage_failed == 1 and envelope.stages_executed == 1
    assert statuses(envelope.stages) == ["completed", "failed", "skipped"]
    assert (envelope.stages[1].error, envelope.stages[1].error_type) == (
        "job process killed by SIGKILL",
        "FlowRunCrashed",
    )
    assert envelope.partial_result == {"numbers": [0]}
    assert outcome.job_status_of(envelope.to_dict()) == "failed"  # not a cancel reason


def test_cancelled_while_running_cancels_the_running_stage():
    envelope = outcome.ended_abnormally(
        reports("completed", "completed", "running"),
        status="cancelled",
        error="cancelled by the user",
        error_type=EndReason.FLOW_RUN_CANCELLED,
    )
    assert envelope.stage_failed == 2 and envelope.stages_executed == 2 and envelope.partial_result == {}
    assert statuses(envelope.stages) == ["completed", "completed", "cancelled"]
    assert envelope.stages[2].error_type == "FlowRunCancelled"
    assert outcome.job_status_of(envelope.to_dict()) == "cancelled"


def test_ended_abnormally_between_stages_blames_the_first_that_had_not_run():
    envelope = outcome.ended_abnormally(
        reports("completed", "pending", "pending"), status="crashed", error="gone", error_type="FlowRunCrashed"
    )
    assert envelope.stage_failed == 1
    assert statuses(envelope.stages) == ["completed", "skipped", "skipped"]
    every_stage_done = outcome.ended_abnormally(
        reports("completed", "completed", "completed"), status="crashed", error="gone", error_type="FlowRunCrashed"
    )
    assert every_stage_done.stage_failed is None and every_stage_done.stages_executed == 3


def test_not_started_skips_every_stage():
    envelope = outcome.not_started(
        reports("pending", "pending", "pending"), error="cancelled while queued", error_type=EndReason.CANCELLED
    )
    data = envelope.to_dict()
    assert (data["ok"], data["stage_failed"], data["stages_executed"], data["partial_result"]) == (False, None, 0, {})
    assert statuses(data["stages"]) == ["skipped"] * 3
    assert data["error"] == "cancelled while queued"
    assert outcome.job_status_of(data) == "cancelled"
    launch = outcome.not_started(outcome.pending_reports(STAGES), error="no engine", error_type=EndReason.LAUNCH_ERROR)
    assert outcome.job_status_of(launch.to_dict()) == "failed"


# --- reading an envelope ------------------------------------------------------------------------------


def test_as_cancelled_turns_the_crashed_stage_into_a_cancelled_one():
    crash = outcome.ended_abnormally(
        reports("completed", "running", "pending"), status="crashed", error="killed", error_type="FlowRunCrashed"
    ).to_dict()
    cancelled = outcome.as_cancelled(crash, "cancelled by the user")
    assert (cancelled["ok"], cancelled["error"], cancelled["error_type"]) == (
        False,
        "cancelled by the user",
        "Cancelled",
    )
    assert statuses(cancelled["stages"]) == ["completed", "cancelled", "skipped"]
    assert cancelled["stages"][1]["error"] == "cancelled by the user"
    assert cancelled["stages"][1]["error_type"] == "Cancelled"
    assert cancelled["stages"][0] == crash["stages"][0]
    assert cancelled["stage_failed"] == 1 and cancelled["partial_result"] == crash["partial_result"]
    assert statuses(crash["stages"]) == ["completed", "failed", "skipped"]  # the given envelope is unchanged
    assert outcome.job_status_of(cancelled) == "cancelled"


def test_as_cancelled_leaves_other_failed_stages_and_accepts_no_stages():
    envelope = {
        "ok": False,
        "stage_failed": 1,
        "stages": [{"index": 0, "status": "failed"}, {"index": 1, "status": "completed"}],
    }
    cancelled = outcome.as_cancelled(envelope, "stop")
    assert statuses(cancelled["stages"]) == ["failed", "completed"]
    assert outcome.as_cancelled({"ok": False}, "stop")["stages"] == []


@pytest.mark.parametrize(
    ("envelope", "status"),
    [
        ({"ok": True, "result": {}}, "succeeded"),
        ({"ok": False, "error_type": "RuntimeError"}, "failed"),
        ({"ok": False, "error_type": "FlowRunCrashed"}, "failed"),
        ({"ok": False, "error_type": "Cancelled"}, "cancelled"),
        ({"ok": False, "error_type": "FlowRunCancelled"}, "cancelled"),
        ({"ok": False, "error_type": "CancelledError"}, "cancelled"),
        ({"ok": False, "error_type": "JobCancelled"}, "cancelled"),
        ({}, "failed"),
    ],
)
def test_job_status_of(envelope, status):
    assert outcome.job_status_of(envelope) == status


@pytest.mark.parametrize(
    ("stage", "job", "shown"),
    [
        ("pending", "running", "pending"),
        ("running", "running", "running"),
        ("running", "queued", "running"),
        ("pending", "failed", "skipped"),
        ("pending", "succeeded", "skipped"),
        ("running", "failed", "failed"),
        ("running", "crashed", "failed"),
        ("running", "cancelled", "cancelled"),
        ("completed", "cancelled", "completed"),
        ("failed", "cancelled", "failed"),
        ("skipped", "failed", "skipped"),
    ],
)
def test_shown_stage_status(stage, job, shown):
    assert outcome.shown_stage_status(stage, job) == shown


def test_terminal_statuses():
    assert [
        s for s in ("queued", "running", "succeeded", "failed", "cancelled", "crashed") if outcome.is_terminal(s)
    ] == [
        "succeeded",
        "failed",
        "cancelled",
        "crashed",
    ]
    assert outcome.running_stage(reports("completed", "running", "running")).index == 1
    assert outcome.running_stage(reports("completed", "pending", "pending")) is None
