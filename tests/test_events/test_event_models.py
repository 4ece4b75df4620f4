"""The realtime messages: their fields, parsing by ``type``, and the messages that end a job abnormally."""

from __future__ import annotations

import re
import uuid

import pytest
from pydantic import ValidationError

from forgeflow.events.models import (
    JobStatusEvent,
    PipelineError,
    PipelineProgress,
    StageEnd,
    StageStart,
    abnormal_end,
    is_terminal_event,
    parse_event,
    progress,
    utc_timestamp,
)
from forgeflow.events.reduce import replay
from forgeflow.events.sinks import MemorySink
from forgeflow.pipeline import outcome

pytestmark = pytest.mark.fast

ISO_UTC_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def test_every_message_has_type_timestamp_and_a_fresh_event_id():
    first = StageStart(job_id="j", stage_index=0, plugin="p", tool="t")
    second = StageStart(job_id="j", stage_index=0, plugin="p", tool="t")
    data = first.model_dump()
    assert data["type"] == "pipeline_stage_start" and data["seq"] is None and data["attempt"] == 1
    assert ISO_UTC_MS.match(data["timestamp"]), data["timestamp"]
    assert ISO_UTC_MS.match(utc_timestamp())
    assert uuid.UUID(hex=first.event_id) and first.event_id != second.event_id


@pytest.mark.parametrize(
    "event",
    [
        StageStart(job_id="j", stage_index=1, plugin="p", tool="t"),
        StageEnd(job_id="j", stage_index=1, plugin="p", tool="t", duration_ms=5, ok=True, result_size_bytes=9),
        PipelineError(job_id="j", stage_index=None, plugin=None, error="e", error_type="E"),
        PipelineProgress(job_id="j", stages_total=3, stages_completed=1, percent=33),
        JobStatusEvent(job_id="j", status="succeeded", envelope={"ok": True}),
    ],
    ids=lambda e: e.type,
)
def test_parse_event_picks_the_model_by_type_and_round_trips(event):
    parsed = parse_event(event.model_dump(mode="json"))
    assert type(parsed) is type(event)
    assert parsed == event


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"type": "pipeline_stage_start", "job_id": "j", "plugin": "p", "tool": "t"}, "stage_index"),
        ({"type": "pipeline_stage_start", "job_id": "j", "stage_index": 0, "plugin": "p", "tool": "t", "x": 1}, "x"),
        ({"type": "job_status", "job_id": "j", "status": "sleeping"}, "status"),
        ({"type": "stage_started", "job_id": "j"}, "type"),
        ({"job_id": "j", "status": "running"}, "type"),
        (
            {
                "type": "pipeline_stage_end",
                "job_id": "j",
                "stage_index": 0,
                "plugin": "p",
                "tool": "t",
                "duration_ms": 1,
                "ok": "maybe",
                "result_size_bytes": 0,
            },
            "ok",
        ),
    ],
)
def test_malformed_messages_are_rejected_naming_the_field(data, where):
    with pytest.raises(ValidationError) as info:
        parse_event(data)
    assert any(where in [str(p) for p in err["loc"]] or where in err["msg"] for err in info.value.errors()), (
        info.value.errors()
    )


@pytest.mark.parametrize(
    ("completed", "total", "percent"), [(0, 3, 0), (1, 3, 33), (2, 3, 67), (3, 3, 100), (0, 0, 100)]
)
def test_progress_percent(completed, total, percent):
    message = progress("j", completed, total)
    assert (message.stages_completed, message.stages_total, message.percent) == (completed, total, percent)


def test_terminal_events():
    assert is_terminal_event(JobStatusEvent(job_id="j", status="cancelled"))
    assert not is_terminal_event(JobStatusEvent(job_id="j", status="running"))
    assert not is_terminal_event(PipelineProgress(job_id="j", stages_total=1, stages_completed=1, percent=100))


def test_abnormal_end_names_the_running_stage_then_ends_the_job():
    reports = replay(
        outcome.pending_reports([{"plugin": "testkit", "tool": "numbers"}, {"plugin": "testkit", "tool": "hang"}]),
        [
            {"type": "pipeline_stage_start", "stage_index": 0},
            {"type": "pipeline_stage_end", "stage_index": 0, "ok": True, "duration_ms": 3},
            {"type": "pipeline_stage_start", "stage_index": 1},
        ],
    )
    envelope = outcome.ended_abnormally(
        reports, status="crashed", error="killed", error_type="FlowRunCrashed", partial_result={"numbers": [0]}
    )
    error, status = abnormal_end(
        "j", status="crashed", envelope=envelope, stage=outcome.running_stage(reports), flow_run_id="fr"
    )
    assert isinstance(error, PipelineError) and isinstance(status, JobStatusEvent)
    assert (error.stage_index, error.plugin, error.tool, error.error, error.error_type) == (
        1,
        "testkit",
        "hang",
        "killed",
        "FlowRunCrashed",
    )
    assert (status.status, status.flow_run_id) == ("crashed", "fr")
    assert status.envelope == envelope.to_dict() and status.envelope["stage_failed"] == 1
    assert is_terminal_event(status)
    # with no stage running (ended between stages), the error names no stage
    error, _ = abnormal_end("j", status="cancelled", envelope=envelope, stage=None, flow_run_id=None)
    assert (error.stage_index, error.plugin, error.tool) == (None, None, None)


def test_memory_sink_numbers_each_job_from_one_and_tells_listeners():
    sink = MemorySink()
    seen: list[tuple[str, int | None]] = []
    sink.subscribe(lambda e: seen.append((e.job_id, e.seq)))
    sink.subscribe(lambda e: 1 / 0)  # a broken listener changes nothing
    original = StageStart(job_id="a", stage_index=0, plugin="p", tool="t")
    sink.emit(original)
    sink.emit(StageStart(job_id="b", stage_index=0, plugin="p", tool="t"))
    sink.emit(StageStart(job_id="a", stage_index=1, plugin="p", tool="t"))
    assert [(e.job_id, e.seq) for e in sink.events] == [("a", 1), ("b", 1), ("a", 2)]
    assert seen == [("a", 1), ("b", 1), ("a", 2)]
    assert [e.seq for e in sink.for_job("a")] == [1, 2]
    assert original.seq is None  # emit numbers a copy
    assert sink.flush() is True
