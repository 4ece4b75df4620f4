"""Every stage emits the seed's messages, in order, numbered without gaps; delivery survives outages."""

from __future__ import annotations

import re
import time

from forgeflow.events.models import JobStatusEvent, StageStart
from forgeflow.events.sinks import HttpSink
from forgeflow.events.spool import read_events

from .conftest import IngestServer, chain

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def test_pipeline_realtime_messages_sent(executor, services):
    executor.execute(chain("numbers", "scale", "total"), {"count": 3}, "job-rt")
    events = [e.model_dump() for e in services.sink.for_job("job-rt")]
    assert [e["type"] for e in events] == [
        "job_status",
        *["pipeline_stage_start", "pipeline_stage_end", "pipeline_progress"] * 3,
        "job_status",
    ]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["status"] for e in events if e["type"] == "job_status"] == ["running", "succeeded"]
    for event in events:
        assert event["job_id"] == "job-rt"
        assert ISO_UTC.match(event["timestamp"]), event["timestamp"]
    starts = [e for e in events if e["type"] == "pipeline_stage_start"]
    assert [(e["stage_index"], e["plugin"], e["tool"]) for e in starts] == [
        (0, "testkit", "numbers"),
        (1, "testkit", "scale"),
        (2, "testkit", "total"),
    ]
    ends = [e for e in events if e["type"] == "pipeline_stage_end"]
    assert all(e["ok"] is True and isinstance(e["duration_ms"], int) and e["result_size_bytes"] > 0 for e in ends)
    progress = [e for e in events if e["type"] == "pipeline_progress"]
    assert [(p["stages_completed"], p["stages_total"], p["percent"]) for p in progress] == [
        (1, 3, 33),
        (2, 3, 67),
        (3, 3, 100),
    ]
    assert events[-1]["envelope"]["result"]["total"] == 6


def test_failure_messages_name_the_stage_and_error_type(executor, services):
    executor.execute(
        chain("numbers", "fail", fail={"message": "Memory error during inference"}), {"count": 1}, "job-rt-fail"
    )
    events = [e.model_dump() for e in services.sink.for_job("job-rt-fail")]
    assert [e["type"] for e in events] == [
        "job_status",
        "pipeline_stage_start",
        "pipeline_stage_end",
        "pipeline_progress",
        "pipeline_stage_start",
        "pipeline_stage_end",
        "pipeline_error",
        "job_status",
    ]
    end, error, terminal = events[5], events[6], events[7]
    assert end["ok"] is False and end["stage_index"] == 1
    assert (error["stage_index"], error["plugin"], error["tool"], error["error_type"]) == (
        1,
        "testkit",
        "fail",
        "RuntimeError",
    )
    assert "Memory error during inference" in error["error"]
    assert terminal["status"] == "failed"
    assert terminal["envelope"]["partial_result"] == {"numbers": [0]}


def test_http_sink_delivers_in_order_with_auth(ingest, tmp_path):
    sink = HttpSink(ingest.url, ingest.token, tmp_path / "spool")
    for index in range(50):
        sink.emit(StageStart(job_id="j1", stage_index=index, plugin="p", tool="t"))
    assert sink.flush(timeout=10)
    sink.close()
    assert [e["stage_index"] for e in ingest.for_job("j1")] == list(range(50))
    assert [e["seq"] for e in ingest.for_job("j1")] == list(range(1, 51))


def test_http_sink_says_which_jobs_still_run_until_they_end(ingest, tmp_path):
    sink = HttpSink(ingest.url, ingest.token, tmp_path / "spool", heartbeat_s=0.2)
    try:
        sink.emit(JobStatusEvent(job_id="runs", status="running"))
        sink.emit(JobStatusEvent(job_id="ends", status="running"))
        sink.emit(JobStatusEvent(job_id="ends", status="succeeded", envelope=None))
        deadline = time.monotonic() + 10
        while len(ingest.heartbeats) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ingest.heartbeats[:3] == [["runs"]] * 3  # every 0.2 s, only the job that has not ended
        sink.emit(JobStatusEvent(job_id="runs", status="failed", envelope=None))
        assert sink.flush(timeout=10)
        time.sleep(0.3)
        count = len(ingest.heartbeats)
        time.sleep(0.6)
        assert len(ingest.heartbeats) == count  # nothing runs: no more heartbeats
    finally:
        sink.close()


def test_http_sink_spools_during_an_outage_and_loses_nothing(tmp_path):
    server = IngestServer()
    sink = HttpSink(server.url, server.token, tmp_path / "spool", max_backoff_s=0.3)
    started = time.perf_counter()
    for index in range(20):
        sink.emit(StageStart(job_id="j2", stage_index=index, plugin="p", tool="t"))
    emit_time = time.perf_counter() - started
    assert emit_time < 0.5  # emit never waits on the network
    time.sleep(0.5)
    assert read_events(next((tmp_path / "spool").glob("*.jsonl")))  # safe on disk while the service is down
    server.start()  # the service comes back
    try:
        assert sink.flush(timeout=15)
        sink.emit(JobStatusEvent(job_id="j2", status="succeeded"))
        assert sink.flush(timeout=10)
        sink.close()
        received = server.for_job("j2")
        assert [e.get("stage_index") for e in received] == [*range(20), None]
        assert not list((tmp_path / "spool").glob("*.jsonl"))
    finally:
        server.stop()


def test_spool_left_by_a_dead_process_is_delivered_by_the_next_sink(ingest, tmp_path):
    down = HttpSink("http://127.0.0.1:9", ingest.token, tmp_path / "spool", max_backoff_s=0.2)
    down.emit(StageStart(job_id="j3", stage_index=0, plugin="p", tool="t"))
    assert down.flush(timeout=1) is False
    down.close()
    assert list((tmp_path / "spool").glob("*.jsonl"))
    later = HttpSink(ingest.url, ingest.token, tmp_path / "spool")
    ingest.wait_for(lambda e: e["job_id"] == "j3", timeout=10)
    later.close()
    assert len(ingest.for_job("j3")) == 1
    assert not list((tmp_path / "spool").glob("*.jsonl"))
