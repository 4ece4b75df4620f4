"""The pure event → state reducer and the store agree: the job, stage and plugin rows the store keeps
after a crash, a cancel and a stage failure are what folding the same events through
:func:`forgeflow.events.reduce.reduce` (and :func:`~forgeflow.events.reduce.observe`) gives, whether
the store took the events one by one or in one batch (SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from forgeflow.api.store import Store, iso
from forgeflow.api.store.rows import JobRow, job_row
from forgeflow.events.models import (
    Event,
    JobStatusEvent,
    PipelineError,
    PipelineProgress,
    StageEnd,
    StageProgress,
    StageStart,
    abnormal_end,
)
from forgeflow.events.reduce import Observation, ObservedRow, StageValues, observe, reduce, replay
from forgeflow.pipeline import outcome

#: Job columns the reducer derives from events (the rest are the submission's or the launcher's).
DERIVED = ("status", "error", "error_type", "stages_total", "stages_completed", "envelope", "flow_run_id", "pipeline")
TIMES = ("started_at", "finished_at")


def new_job(store: Store, job_id: str, plugin: str, stages: int = 3) -> JobRow:
    pipeline = {"stages": [{"plugin": plugin, "tool": f"t{i}", "config": {}} for i in range(stages)]}
    job, _ = store.create_job(
        job_id=job_id, pipeline=pipeline, input_data={}, request_hash="h", source="inline", template_id=None
    )
    return job


def start(job_id: str, plugin: str, index: int) -> StageStart:
    return StageStart(job_id=job_id, stage_index=index, plugin=plugin, tool=f"t{index}")


def end(job_id: str, plugin: str, index: int, *, ok: bool) -> StageEnd:
    return StageEnd(
        job_id=job_id,
        stage_index=index,
        plugin=plugin,
        tool=f"t{index}",
        ok=ok,
        duration_ms=12,
        result_size_bytes=30,
        peak_memory_mb=40.5,
    )


def reports(plugin: str, stages: int = 3) -> list[outcome.StageReport]:
    return outcome.pending_reports([{"plugin": plugin, "tool": f"t{i}"} for i in range(stages)])


def crash(job_id: str, plugin: str) -> list[Event]:
    """Stage 0 completes, stage 1 runs when the job's process dies."""
    ran: list[Event] = [
        JobStatusEvent(job_id=job_id, status="running", flow_run_id="fr-1"),
        start(job_id, plugin, 0),
        StageProgress(job_id=job_id, stage_index=0, plugin=plugin, tool="t0", done=5, total=10, rate=2.5),
        end(job_id, plugin, 0, ok=True),
        PipelineProgress(job_id=job_id, stages_total=3, stages_completed=1, percent=33),
        start(job_id, plugin, 1),
    ]
    stage_events = [e.model_dump(mode="json") for e in ran]
    envelope = outcome.ended_abnormally(
        replay(reports(plugin), stage_events),
        status="crashed",
        error="the engine ended without reporting its result",
        error_type=outcome.EndReason.FLOW_RUN_CRASHED,
        partial_result={"n": [1]},
    )
    return [
        *ran,
        *abnormal_end(job_id, status="crashed", envelope=envelope, stage=envelope.stages[1], flow_run_id="fr-1"),
    ]


def cancel(job_id: str, plugin: str) -> list[Event]:
    """Cancelled on request while stage 0 ran: its call ends not ok, then the job ends cancelled."""
    ran: list[Event] = [start(job_id, plugin, 0), end(job_id, plugin, 0, ok=False)]
    running = replay(reports(plugin), [start(job_id, plugin, 0).model_dump(mode="json")])
    envelope = outcome.ended_abnormally(
        running, status="cancelled", error="cancelled on request", error_type=outcome.EndReason.CANCELLED
    )
    return [
        *ran,
        *abnormal_end(job_id, status="cancelled", envelope=envelope, stage=envelope.stages[0], flow_run_id=None),
    ]


def stage_failure(job_id: str, plugin: str) -> list[Event]:
    """Stage 0 completes; stage 1's call ends before its error says why (counted once); the job fails."""
    ran: list[Event] = [
        start(job_id, plugin, 0),
        end(job_id, plugin, 0, ok=True),
        start(job_id, plugin, 1),
        end(job_id, plugin, 1, ok=False),
        PipelineError(job_id=job_id, stage_index=1, plugin=plugin, tool="t1", error="boom", error_type="ValueError"),
    ]
    settled = replay(reports(plugin), [e.model_dump(mode="json") for e in ran])
    envelope = outcome.failed(settled, error="boom", error_type="ValueError", stage_failed=1).to_dict()
    return [*ran, JobStatusEvent(job_id=job_id, status="failed", envelope=envelope)]


def fold(job: JobRow, events: list[Event]) -> tuple[JobRow, dict[int, StageValues], list[Observation]]:
    """The rows the reducer alone derives from ``events``, starting from the job's submitted row, and
    the plugin observations the events make (in order)."""
    state = job
    stages: dict[int, StageValues] = {}
    seen: list[Observation] = []
    for event in events:
        reduction = reduce(state, stages, event)
        state = job_row({**state, **reduction.job})
        for index, values in reduction.stages.items():
            stages[index] = {**stages.get(index, {}), **values}
        seen.extend(reduction.observations)
    return state, stages, seen


def assert_store_agrees(store: Store, job_id: str, state: JobRow, stages: dict[int, StageValues]) -> None:
    job = store.get_job(job_id)
    assert job is not None
    assert {k: job[k] for k in DERIVED} == {k: state[k] for k in DERIVED}
    assert [iso(job[k]) for k in TIMES] == [iso(state[k]) for k in TIMES]
    rows = {r["stage_index"]: dict(r) for r in store.stage_rows(job_id)}
    assert set(rows) == set(stages)
    for index, row in rows.items():
        expected = {k: stages[index].get(k) for k in row if k not in ("job_id", "stage_index")}
        assert {k: row[k] for k in expected} == expected, f"stage {index}"


@pytest.mark.parametrize("scenario", [crash, cancel, stage_failure], ids=["crash", "cancel", "stage-failure"])
def test_the_stored_rows_are_the_reducers(store: Store, scenario: Callable[[str, str], list[Event]]):
    plugin = f"plugin-{uuid.uuid4().hex[:8]}"
    observations: list[Observation] = []
    for job_id, batched in ((f"one-{plugin}", False), (f"all-{plugin}", True)):
        new_job(store, job_id, plugin)
        if scenario is cancel:
            store.set_cancel_requested(job_id, by="alice")
        submitted = store.get_job(job_id)
        assert submitted is not None
        events = scenario(job_id, plugin)
        state, stages, seen = fold(submitted, events)
        observations += seen
        if batched:
            store.ingest(events)
        else:
            for event in events:
                store.ingest([event])
        assert_store_agrees(store, job_id, state, stages)
        assert state["status"] == scenario.__name__.replace("stage_failure", "failed").replace(
            "crash", "crashed"
        ).replace("cancel", "cancelled")
    # The plugin ran in both jobs: its row is every observation of the two, folded in order.
    row: ObservedRow | None = None
    for one in observations:
        row = observe(row, one)
    assert row is not None
    assert {k: v for k, v in store.observed_plugins()[plugin].items() if k != "plugin"} == row
