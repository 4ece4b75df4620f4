"""The store on its own (no API server): events in, job / stage / plugin rows derived from them, on
SQLite and on PostgreSQL. Dedupe, per-job seq, idempotent job creation, listing and template statistics."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from forgeflow.api.store import Conflict, Store
from forgeflow.events.models import (
    JobStatusEvent,
    PipelineError,
    PipelineProgress,
    StageEnd,
    StageProgress,
    StageStart,
    abnormal_end,
)
from forgeflow.events.reduce import replay
from forgeflow.pipeline import outcome


def new_job(store: Store, job_id: str, *, body: str = "h", stages: int = 2, template_id: str | None = None):
    pipeline = {"stages": [{"plugin": "testkit", "tool": f"t{i}", "config": {}} for i in range(stages)]}
    return store.create_job(
        job_id=job_id,
        pipeline=pipeline,
        input_data={"count": 1},
        request_hash=body,
        source="template" if template_id else "inline",
        template_id=template_id,
    )


def run_stage(job_id: str, index: int, *, ok: bool = True, duration_ms: int = 10, plugin: str = "testkit") -> list[Any]:
    out: list[Any] = [
        StageStart(job_id=job_id, stage_index=index, plugin=plugin, tool=f"t{index}"),
    ]
    if not ok:
        out.append(
            PipelineError(
                job_id=job_id, stage_index=index, plugin=plugin, tool=f"t{index}", error="boom", error_type="ValueError"
            )
        )
    out.append(
        StageEnd(
            job_id=job_id,
            stage_index=index,
            plugin=plugin,
            tool=f"t{index}",
            duration_ms=duration_ms,
            ok=ok,
            result_size_bytes=20,
            peak_memory_mb=33.0,
        )
    )
    return out


def succeed(job_id: str, stages: int = 2) -> JobStatusEvent:
    reports = [outcome.StageReport(index=i, plugin="testkit", tool=f"t{i}", status="completed") for i in range(stages)]
    return JobStatusEvent(job_id=job_id, status="succeeded", envelope=outcome.succeeded({"n": 1}, reports).to_dict())


def test_create_job_is_idempotent_by_request_and_conflicts_otherwise(store: Store):
    published: list[Any] = []
    job, created = store.create_job(
        job_id="j1",
        pipeline={"stages": [{"plugin": "testkit", "tool": "numbers"}]},
        input_data={"count": 2},
        request_hash="same",
        source="inline",
        template_id=None,
        publish=published.extend,
    )
    assert created and job["status"] == "queued" and job["last_seq"] == 1 and job["stages_total"] == 1
    assert [(e.job_id, e.seq, e.type, e.terminal) for e in published] == [("j1", 1, "job_status", False)]
    assert json.loads(published[0].payload)["status"] == "queued"
    again, created = new_job(store, "j1", body="same")
    assert created is False and again["created_at"] == job["created_at"] and again["last_seq"] == 1
    assert again == job  # the row the insert returned is the row as stored, read back
    with pytest.raises(Conflict, match="different request"):
        new_job(store, "j1", body="other")
    assert [e.seq for e in store.events_after("j1", 0)] == [1]  # nothing more was stored


def test_ingest_derives_the_job_and_its_stage_rows(store: Store):
    new_job(store, "j2")
    batch = [
        JobStatusEvent(job_id="j2", status="running", flow_run_id="fr-1"),
        *run_stage("j2", 0, duration_ms=12),
        PipelineProgress(job_id="j2", stages_total=2, stages_completed=1, percent=50),
        *run_stage("j2", 1, duration_ms=30),
        PipelineProgress(job_id="j2", stages_total=2, stages_completed=2, percent=100),
        succeed("j2"),
    ]
    stored = store.ingest(batch[:3])
    assert [e.seq for e in stored] == [2, 3, 4]  # after the queued message of create_job
    running = store.get_job("j2")
    assert (running["status"], running["flow_run_id"], running["last_seq"]) == ("running", "fr-1", 4)
    assert running["started_at"] is not None and running["finished_at"] is None
    stored = store.ingest(batch[3:])
    assert [e.seq for e in stored] == [5, 6, 7, 8, 9]
    assert [e.terminal for e in stored] == [False, False, False, False, True]
    job = store.get_job("j2")
    assert (job["status"], job["stages_completed"], job["stages_total"], job["last_seq"]) == ("succeeded", 2, 2, 9)
    assert job["envelope"]["ok"] is True and job["envelope"]["result"] == {"n": 1}
    assert job["finished_at"] is not None and job["error"] is None
    rows = store.stage_rows("j2")
    assert [(r["stage_index"], r["status"], r["duration_ms"], r["result_size_bytes"]) for r in rows] == [
        (0, "completed", 12, 20),
        (1, "completed", 30, 20),
    ]
    assert all(r["started_at"] and r["ended_at"] and r["peak_memory_mb"] == 33.0 for r in rows)
    payloads = store.event_dicts("j2")
    assert [p["seq"] for p in payloads] == list(range(1, 10))
    assert [p["type"] for p in payloads][-1] == "job_status" and payloads[-1]["status"] == "succeeded"
    assert list(payloads[1])[:3] == ["type", "job_id", "seq"]


def test_stage_progress_is_kept_on_the_stage_and_the_result_is_stored_once(store: Store):
    new_job(store, "jp", stages=1)
    start = StageStart(job_id="jp", stage_index=0, plugin="testkit", tool="t0")
    report = StageProgress(
        job_id="jp", stage_index=0, plugin="testkit", tool="t0", done=16, total=64, fraction=0.25, message="16/64"
    )
    store.ingest([start, report])
    (row,) = store.stage_rows("jp")
    assert row["status"] == "running"
    assert row["progress"] == {"done": 16, "total": 64, "fraction": 0.25, "message": "16/64"}
    paced = report.model_copy(update={"event_id": "paced", "done": 32, "rate": 8.0, "eta_s": 4.0})
    store.ingest([paced])
    assert store.stage_rows("jp")[0]["progress"]["rate"] == 8.0  # frames/s and ETA kept when the job sends them
    assert store.stage_rows("jp")[0]["progress"]["eta_s"] == 4.0
    store.ingest([StageStart(job_id="jp", stage_index=0, plugin="testkit", tool="t0", attempt=2)])
    assert store.stage_rows("jp")[0]["progress"] is None  # a new attempt starts from nothing
    big = {"numbers": list(range(10_000))}
    reports = [outcome.StageReport(index=0, plugin="testkit", tool="t0", status="completed")]
    envelope = outcome.succeeded(big, reports).to_dict()
    store.ingest([JobStatusEvent(job_id="jp", status="succeeded", envelope=envelope)])
    assert store.get_job("jp")["envelope"] == envelope  # the whole result, once: in the job
    terminal = store.event_dicts("jp")[-1]
    assert terminal["type"] == "job_status" and terminal["status"] == "succeeded"
    assert "result" not in terminal["envelope"]
    assert terminal["envelope"]["result_size_bytes"] == len(json.dumps(big, separators=(",", ":")))
    assert terminal["envelope"]["stages"] == envelope["stages"] and terminal["envelope"]["ok"] is True
    assert sum(len(e.payload) for e in store.events_after("jp", 0)) < 2000


def test_a_retried_delivery_is_stored_once(store: Store):
    batch = [JobStatusEvent(job_id="ext", status="running"), *run_stage("ext", 0)]
    assert [e.seq for e in store.ingest(batch)] == [1, 2, 3]
    assert store.ingest(batch) == []
    more = run_stage("ext", 1)
    assert [e.seq for e in store.ingest([*batch[1:], *more])] == [4, 5]  # overlapping: only the new ones
    job = store.get_job("ext")
    assert (job["source"], job["status"], job["last_seq"]) == ("external", "running", 5)
    stored = [json.loads(e.payload)["event_id"] for e in store.events_after("ext", 0)]
    assert stored == [e.event_id for e in [*batch, *more]]


def test_a_failed_stage_and_the_terminal_envelope(store: Store):
    new_job(store, "j3", stages=3)
    store.ingest([JobStatusEvent(job_id="j3", status="running"), *run_stage("j3", 0), *run_stage("j3", 1, ok=False)])
    reports = replay(
        outcome.pending_reports([{"plugin": "testkit", "tool": f"t{i}"} for i in range(3)]),
        store.event_dicts("j3"),
    )
    envelope = outcome.failed(
        reports, error="boom", error_type="ValueError", stage_failed=1, partial_result={"numbers": [0]}
    ).to_dict()
    store.ingest([JobStatusEvent(job_id="j3", status="failed", envelope=envelope)])
    job = store.get_job("j3")
    assert (job["status"], job["error"], job["error_type"], job["stages_completed"]) == (
        "failed",
        "boom",
        "ValueError",
        1,
    )
    rows = store.stage_rows("j3")
    assert [(r["status"], r["error_type"]) for r in rows] == [
        ("completed", None),
        ("failed", "ValueError"),
        ("skipped", None),
    ]
    observed = store.observed_plugins()["testkit"]
    assert (observed["state"], observed["last_error"], observed["calls"], observed["failures"]) == (
        "FAILED",
        "boom",
        2,
        1,
    )


def test_nothing_changes_a_job_that_has_ended(store: Store):
    new_job(store, "j4", stages=1)
    store.ingest([JobStatusEvent(job_id="j4", status="cancelled", envelope={"ok": False, "error": "stop"})])
    store.ingest(
        [
            JobStatusEvent(job_id="j4", status="running"),
            succeed("j4", stages=1),
            PipelineError(job_id="j4", stage_index=None, plugin=None, error="late", error_type="X"),
        ]
    )
    job = store.get_job("j4")
    assert (job["status"], job["error"], job["last_seq"]) == ("cancelled", "stop", 5)  # stored, not applied
    assert store.has_terminal("j4") and not store.has_terminal("nope")


def test_listing_filters_orders_newest_first_and_pages(store: Store):
    for i in range(5):
        new_job(store, f"list-{i}")
        time.sleep(0.002)  # distinct creation times
    store.ingest([JobStatusEvent(job_id="list-1", status="running"), JobStatusEvent(job_id="list-3", status="running")])
    rows, total = store.list_jobs([], 2, 0)
    assert total == 5 and [r["id"] for r in rows] == ["list-4", "list-3"]
    rows, total = store.list_jobs([], 2, 4)
    assert total == 5 and [r["id"] for r in rows] == ["list-0"]
    rows, total = store.list_jobs(["running"], 10, 0)
    assert total == 2 and [r["id"] for r in rows] == ["list-3", "list-1"]
    rows, total = store.list_jobs(["queued", "running"], 10, 0)
    assert total == 5
    assert store.list_jobs(["succeeded"], 10, 0) == ([], 0)
    assert [j["id"] for j in store.jobs_to_launch(2)] == ["list-0", "list-2"]  # oldest queued first


def test_events_after_seq_and_cursor(store: Store):
    store.ingest([JobStatusEvent(job_id="a", status="running"), *run_stage("a", 0)])
    store.ingest([JobStatusEvent(job_id="b", status="running")])
    store.ingest([*run_stage("a", 1)])
    assert [e.seq for e in store.events_after("a", 1)] == [2, 3, 4, 5]
    assert [e.seq for e in store.events_after("a", 1, limit=2)] == [2, 3]
    every = store.events_after_cursor(0)
    assert [(e.job_id, e.seq) for e in every] == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("a", 4), ("a", 5)]
    cursors = [e.cursor for e in every]
    assert cursors == sorted(cursors) and store.max_cursor() == cursors[-1]
    assert [e.cursor for e in store.events_after_cursor(cursors[2])] == cursors[3:]
    assert json.loads(every[3].with_cursor())["cursor"] == cursors[3]


def test_templates_and_their_statistics(store: Store):
    definition = {"stages": [{"plugin": "testkit", "tool": "t0"}, {"plugin": "testkit", "tool": "t1"}]}
    store.create_template("chain", "Chain", definition)
    with pytest.raises(Conflict):
        store.create_template("chain", "chain", definition)
    assert [t["id"] for t in store.list_templates()] == ["chain"]
    empty = store.template_stats("chain")
    assert empty["runs"]["total"] == 0 and empty["success_rate"] is None and empty["last_used"] is None
    new_job(store, "t-ok", template_id="chain")
    new_job(store, "t-bad", template_id="chain")
    new_job(store, "t-queued", template_id="chain")
    store.ingest(
        [
            JobStatusEvent(job_id="t-ok", status="running"),
            *run_stage("t-ok", 0, duration_ms=10),
            *run_stage("t-ok", 1, duration_ms=30),
            succeed("t-ok"),
        ]
    )
    store.ingest(
        [
            JobStatusEvent(job_id="t-bad", status="running"),
            *run_stage("t-bad", 0, duration_ms=20),
            *run_stage("t-bad", 1, ok=False),
            JobStatusEvent(job_id="t-bad", status="failed", envelope={"ok": False, "error": "boom"}),
        ]
    )
    stats = store.template_stats("chain")
    assert stats["runs"] == {
        "total": 3,
        "queued": 1,
        "running": 0,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
        "crashed": 0,
        "finished": 2,
    }
    assert stats["success_rate"] == 0.5 and stats["last_used"].endswith("Z")
    assert stats["mean_duration_ms"] is not None and stats["mean_duration_ms"] >= 0
    assert [
        (s["stage_index"], s["runs"], s["completed"], s["failed"], s["mean_duration_ms"]) for s in stats["stage_stats"]
    ] == [(0, 2, 2, 0, 15.0), (1, 2, 1, 1, 30.0)]
    assert (stats["stage_stats"][0]["min_duration_ms"], stats["stage_stats"][0]["max_duration_ms"]) == (10.0, 20.0)
    assert store.delete_template("chain") and not store.delete_template("chain")
    assert store.get_template("chain") is None


def test_plugin_observations_resolve_aliases_and_recover(store: Store):
    names = {"tk": "testkit"}
    store.ingest([*run_stage("p1", 0, plugin="tk", ok=False)], resolve_plugin=lambda n: names.get(n, n))
    store.ingest([*run_stage("p2", 0, plugin="testkit")], resolve_plugin=lambda n: names.get(n, n))
    observed = store.observed_plugins()
    assert set(observed) == {"testkit"}
    assert (observed["testkit"]["state"], observed["testkit"]["calls"], observed["testkit"]["failures"]) == (
        "INITIALIZED",
        2,
        1,
    )
    assert observed["testkit"]["last_error"] == "boom" and observed["testkit"]["last_duration_ms"] == 10


def test_meta_value_is_created_once(store: Store):
    made: list[str] = []

    def factory() -> str:
        made.append("x")
        return f"token-{len(made)}"

    assert store.meta_value("ingest_token", factory) == "token-1"
    assert store.meta_value("ingest_token", factory) == "token-1"
    assert made == ["x"]
    store.ping()


def test_an_infrastructure_failure_is_not_blamed_on_the_plugin(store: Store):
    new_job(store, "killed", stages=2)
    store.ingest(run_stage("killed", 0, plugin="healthy-plugin"))
    store.ingest([StageStart(job_id="killed", stage_index=1, plugin="innocent", tool="t1")])
    assert store.observed_plugins()["innocent"]["state"] == "RUNNING"
    crash = outcome.ended_abnormally(
        replay(
            outcome.pending_reports([{"plugin": "healthy-plugin", "tool": "t0"}, {"plugin": "innocent", "tool": "t1"}]),
            [json.loads(e.payload) for e in store.events_after("killed", 0)],
        ),
        status="crashed",
        error="the engine running the job (pid 1) ended without reporting its result",
        error_type=outcome.EndReason.FLOW_RUN_CRASHED,
    )
    store.ingest(abnormal_end("killed", status="crashed", envelope=crash, stage=crash.stages[1], flow_run_id=None))
    job = store.get_job("killed")
    assert job is not None and job["status"] == "crashed" and job["error_type"] == "FlowRunCrashed"
    assert [r["status"] for r in store.stage_rows("killed")] == ["completed", "failed"]
    innocent = store.observed_plugins()["innocent"]
    assert innocent["state"] == "INITIALIZED"  # no longer running, and not FAILED
    assert (innocent["failures"], innocent["last_error"], innocent["last_error_type"]) == (0, None, None)

    # The plugin's own failure still counts against it.
    new_job(store, "plugin-bug", stages=1)
    store.ingest(run_stage("plugin-bug", 0, ok=False, plugin="innocent"))
    guilty = store.observed_plugins()["innocent"]
    assert (guilty["state"], guilty["last_error_type"], guilty["failures"]) == ("FAILED", "ValueError", 1)


def test_a_running_job_whose_host_went_silent_is_found_and_a_heard_one_is_not(store: Store) -> None:
    for job_id in ("quiet", "heard", "busy", "unlaunched", "claimed", "ended"):
        new_job(store, job_id)
    store.ingest([JobStatusEvent(job_id=j, status="running") for j in ("quiet", "heard", "busy", "ended")])
    store.set_launched("claimed", None, None, flow_run_id="run-of-claimed")  # a worker took it, said nothing
    store.ingest([], alive=["quiet", "heard", "busy", "ended"])
    store.ingest([JobStatusEvent(job_id="ended", status="succeeded", envelope=None)])
    time.sleep(0.6)
    store.ingest([], alive=["heard"])  # a heartbeat alone
    progress = PipelineProgress(job_id="busy", stages_total=1, stages_completed=0, percent=50)
    store.ingest([progress], alive=["busy"])  # with an event, in the transaction that stores it
    asked = ["quiet", "heard", "busy", "unlaunched", "claimed", "ended"]
    silent = {j["id"] for j in store.silent_jobs(asked, silent_s=0.4)}
    assert silent == {"quiet", "claimed"}  # never launched: nothing to lose; ended: nothing to watch
    assert store.get_job("heard")["heartbeat_at"] is not None  # type: ignore[index]
    assert [e.type for e in store.events_after("busy", 0)] == ["job_status", "job_status", "pipeline_progress"]
    assert store.silent_jobs([], silent_s=0.0) == []


def test_a_run_started_elsewhere_becomes_a_job_with_the_pipeline_it_carries(store: Store) -> None:
    pipeline = {"stages": [{"plugin": "testkit", "tool": "numbers", "config": {}}], "description": ""}
    running = JobStatusEvent(job_id="from-ui", status="running", pipeline=pipeline, input={"count": 3})
    (stored,) = store.ingest([running])
    job = store.get_job("from-ui")
    assert job is not None and job["source"] == "external" and job["status"] == "running"
    assert job["pipeline"] == pipeline and job["input"] == {"count": 3} and job["stages_total"] == 1
    message = json.loads(stored.payload)
    assert message["pipeline"] is None and message["input"] is None  # kept on the job, not the message
    new_job(store, "submitted")
    store.ingest([JobStatusEvent(job_id="submitted", status="running", pipeline=pipeline, input={"x": 1})])
    kept = store.get_job("submitted")
    assert kept is not None and kept["input"] == {"count": 1} and len(kept["pipeline"]["stages"]) == 2


@pytest.mark.parametrize("error_first", [False, True], ids=["end-then-error", "error-then-end"])
def test_a_tool_refusing_its_input_does_not_make_the_plugin_failed(store: Store, error_first: bool):
    """A stage whose tool raised InputError fails, but the plugin is healthy (the caller's mistake);
    the same stage with a RuntimeError marks it FAILED. Either order of the two messages."""

    def failed_stage(job_id: str, error_type: str) -> list[Any]:
        start, *_, end = run_stage(job_id, 0, ok=True, plugin="refusing")
        end = end.model_copy(update={"ok": False})
        error = PipelineError(
            job_id=job_id, stage_index=0, plugin="refusing", tool="t0", error="no players", error_type=error_type
        )
        return [start, error, end] if error_first else [start, end, error]

    new_job(store, "refused", stages=1)
    store.ingest(failed_stage("refused", "InputError"))
    assert [r["status"] for r in store.stage_rows("refused")] == ["failed"]
    observed = store.observed_plugins()["refusing"]
    assert (observed["state"], observed["calls"], observed["failures"]) == ("INITIALIZED", 1, 0)

    new_job(store, "broken", stages=1)
    store.ingest(failed_stage("broken", "RuntimeError"))
    observed = store.observed_plugins()["refusing"]
    assert (observed["state"], observed["last_error_type"], observed["calls"], observed["failures"]) == (
        "FAILED",
        "RuntimeError",
        2,
        1,
    )
