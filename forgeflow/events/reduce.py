"""The pure event → state reducer: what one event does to its job's row, stage rows and plugin health.

Events are the source of truth of a job. The API store keeps a job's row, its stage rows and the
plugins' observed health derived from them; :func:`reduce` is that derivation, and the only one: no
SQL, no I/O. Given the job's current state (its row and the stage rows it has) and one event, it
returns a :class:`Reduction` — the job row's changed columns, the stage rows' changed columns
(a stage row not yet stored comes back whole) and the plugin observations the event makes; an
observation folds into a plugin's row with :func:`observe`. The store's ingestor applies them in
one transaction; :func:`replay` folds a job's stored stage events through the same stage rules to
rebuild its stage reports (for an ending written after the job's process died).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypedDict

from pydantic import JsonValue

from forgeflow.canonical import JsonObject
from forgeflow.events.models import (
    Event,
    JobStatusEvent,
    PipelineError,
    PipelineProgress,
    StageEnd,
    StageProgress,
    StageStart,
)
from forgeflow.pipeline.outcome import NOT_THE_PLUGINS_DOING, JobStatus, StageReport, is_terminal
from forgeflow.plugins.lifecycle import SeenStatus

PluginState = Literal["INITIALIZED", "RUNNING", "FAILED"]


class JobState(TypedDict):
    """The columns of a job's row that its events read (the store's ``JobRow`` has them all)."""

    id: str
    status: JobStatus
    source: str
    pipeline: JsonObject
    created_at: datetime
    started_at: datetime | None
    flow_run_id: str | None
    cancel_requested: bool
    error: str | None
    error_type: str | None
    stages_total: int
    stages_completed: int


#: A stage row's columns (``stage_runs``) by name: the whole row of a new stage, the changed ones else.
StageValues = dict[str, object]
#: A job row's changed columns by name.
JobChanges = dict[str, object]


#: A plugin's observed health (the store's ``plugin_observed`` row less its name): the shape the
#: plugin registry's lifecycle merges as another source's view of a plugin.
ObservedRow = SeenStatus


@dataclass(frozen=True)
class Observation:
    """What one event says about a plugin: its state now (None: unchanged), calls and failures to count."""

    plugin: str
    state: PluginState | None
    ts: str
    calls: int = 0
    failures: int = 0
    duration_ms: float | None = None
    error: str | None = None
    error_type: str | None = None


@dataclass
class Reduction:
    """An event's changes: the job row's columns, stage rows by index, plugin observations in order."""

    job: JobChanges = field(default_factory=dict)
    stages: dict[int, StageValues] = field(default_factory=dict)
    observations: list[Observation] = field(default_factory=list)


def parse_ts(text: str | None) -> datetime:
    """An event's ISO timestamp as an aware datetime (now when it has none or an unreadable one)."""
    if text:
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        except ValueError:
            pass
    return datetime.now(UTC)


def stage_started(attempt: int, timestamp: str) -> StageValues:
    """A stage's call started: running, and what an earlier call of it left is cleared."""
    return {
        "status": "running",
        "attempt": attempt,
        "started_at": timestamp,
        "ended_at": None,
        "duration_ms": None,
        "error": None,
        "error_type": None,
        "progress": None,
    }


def stage_ended(
    ok: bool,
    timestamp: str | None,
    duration_ms: float | None,
    result_size_bytes: int | None,
    peak_memory_mb: float | None,
) -> StageValues:
    """A stage's call ended: completed or failed, with what it measured."""
    return {
        "status": "completed" if ok else "failed",
        "ended_at": timestamp,
        "duration_ms": duration_ms,
        "result_size_bytes": result_size_bytes,
        "peak_memory_mb": peak_memory_mb,
    }


#: The measures of a stage's ended call that a stage report carries.
_REPORTED_MEASURES = ("duration_ms", "result_size_bytes", "peak_memory_mb")


def replay(reports: Sequence[StageReport], events: Iterable[Mapping[str, JsonValue]]) -> list[StageReport]:
    """The reports as a job's stored stage events (their JSON) left them: each start makes its stage
    running, each end completed or failed with the measures of that call — the stage rules of
    :func:`reduce`. Events that name no known stage are ignored; the given reports are not changed."""
    out = [r.model_copy() for r in reports]
    for event in events:
        index = event.get("stage_index")
        if not isinstance(index, int) or not 0 <= index < len(out):
            continue
        kind = event.get("type")
        if kind == "pipeline_stage_start":
            # a report keeps the measures of the stage's last ended call while it runs again
            out[index] = out[index].model_copy(update={"status": stage_started(1, "")["status"]})
        elif kind == "pipeline_stage_end":
            ended = stage_ended(
                bool(event.get("ok")),
                None,
                _number(event.get("duration_ms")),
                _count(event.get("result_size_bytes")),
                _number(event.get("peak_memory_mb")),
            )
            out[index] = out[index].model_copy(update={k: ended[k] for k in ("status", *_REPORTED_MEASURES)})
    return out


def _number(value: JsonValue) -> float | None:
    """A stored event's measure (a number; anything else, which a stored event never holds, as none)."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(value: JsonValue) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Reducer:
    """One event's reduction against the job's state (the stage rows seen through what it changed)."""

    def __init__(self, job: JobState, stages: Mapping[int, StageValues]) -> None:
        self.job = job
        self.stored = stages
        self.out = Reduction()

    def stage(self, index: int) -> StageValues | None:
        """The stage row as it is now: stored, with this event's changes over it."""
        stored = self.stored.get(index)
        changed = self.out.stages.get(index)
        if stored is None:
            return changed
        return {**stored, **changed} if changed else stored

    def upsert(self, index: int | None, values: StageValues) -> None:
        """Change a stage row (a new one starts pending, attempt 1, unnamed); an empty plugin or tool
        name never replaces a stored one."""
        if index is None:
            return
        changes = self.out.stages.setdefault(index, {})
        if index in self.stored or changes:
            changes.update({k: v for k, v in values.items() if not (k in ("plugin", "tool") and not v)})
        else:
            changes.update({"plugin": "", "tool": "", "status": "pending", "attempt": 1, **values})
        if not changes:
            del self.out.stages[index]

    def set_job(self, **values: object) -> None:
        self.out.job.update(values)

    def observe(
        self,
        plugin: str | None,
        state: PluginState | None,
        ts: str,
        *,
        calls: int = 0,
        failures: int = 0,
        duration_ms: float | None = None,
        error: str | None = None,
        error_type: str | None = None,
    ) -> None:
        if plugin:
            seen = Observation(plugin, state, ts, calls, failures, duration_ms, error, error_type)
            self.out.observations.append(seen)

    def apply(self, event: Event) -> Reduction:
        ended = is_terminal(self.job["status"])
        match event:
            case JobStatusEvent():
                self.status(event, ended)
            case PipelineProgress():
                self.set_job(stages_total=max(event.stages_total, 0), stages_completed=event.stages_completed)
            case StageStart():
                if self.job["status"] == "queued":
                    self.set_job(status="running", started_at=parse_ts(event.timestamp))
                values = {"plugin": event.plugin, "tool": event.tool, **stage_started(event.attempt, event.timestamp)}
                self.upsert(event.stage_index, values)
                self.observe(event.plugin, "RUNNING", event.timestamp)
            case StageEnd():
                self.stage_end(event)
            case StageProgress():
                if not ended:
                    progress = event.model_dump(mode="json", include={"done", "total", "fraction", "message"})
                    progress.update(event.model_dump(mode="json", include={"rate", "eta_s"}, exclude_none=True))
                    self.upsert(event.stage_index, {"plugin": event.plugin, "progress": progress})
            case PipelineError():
                self.error(event, ended)
        return self.out

    def stage_end(self, event: StageEnd) -> None:
        measures = stage_ended(
            event.ok, event.timestamp, event.duration_ms, event.result_size_bytes, event.peak_memory_mb
        )
        self.upsert(event.stage_index, {"plugin": event.plugin, "tool": event.tool, **measures})
        if event.ok:
            self.observe(event.plugin, "INITIALIZED", event.timestamp, calls=1, duration_ms=event.duration_ms)
        elif not self.job["cancel_requested"]:
            # Whether the plugin failed is the stage's pipeline_error's to say (a tool refusing its
            # input does not make the plugin FAILED): when it came first, say it now; else count the
            # call and leave the state to it.
            row = self.stored.get(event.stage_index)  # as before this event: its own end is no error
            error = row.get("error") if row else None
            error_type = row.get("error_type") if row else None
            faulty = error_type is not None and error_type not in NOT_THE_PLUGINS_DOING
            self.observe(
                event.plugin,
                None if error_type is None else "FAILED" if faulty else "INITIALIZED",
                event.timestamp,
                calls=1,
                failures=1 if faulty else 0,
                duration_ms=event.duration_ms,
                error=error if isinstance(error, str) else None,
                error_type=error_type if isinstance(error_type, str) else None,
            )

    def error(self, event: PipelineError, ended: bool) -> None:
        if not ended:
            self.set_job(error=event.error, error_type=event.error_type)
        # the failed call counts once: here when its stage end came first (not a crash)
        before = self.stage(event.stage_index) if event.stage_index is not None else None
        call_ended = before is not None and before.get("ended_at") is not None
        failed = {"status": "failed", "error": event.error, "error_type": event.error_type}
        self.upsert(event.stage_index, {"plugin": event.plugin or "", "tool": event.tool or "", **failed})
        if event.error_type in NOT_THE_PLUGINS_DOING or self.job["cancel_requested"]:
            # Not the plugin's doing: it is no longer running, and nothing failed in it.
            self.observe(event.plugin, "INITIALIZED", event.timestamp)
        else:
            self.observe(
                event.plugin,
                "FAILED",
                event.timestamp,
                failures=1 if call_ended else 0,
                error=event.error,
                error_type=event.error_type,
            )

    def status(self, event: JobStatusEvent, ended: bool) -> None:
        """A ``job_status``: running starts the job; a terminal one stores the envelope and the stage
        reports. Nothing changes a job that has ended."""
        job = self.job
        if event.flow_run_id and not job["flow_run_id"]:
            self.set_job(flow_run_id=event.flow_run_id)
        status = event.status
        if ended or status == "queued":
            return
        if status == "running":
            if job["source"] == "external" and event.pipeline is not None and not job["pipeline"].get("stages"):
                # A flow run this service did not start (the Prefect UI, a schedule): its job gets
                # the pipeline and input the run carries, as if it had been submitted here.
                listed = event.pipeline.get("stages")
                stages_total = len(listed) if isinstance(listed, list | dict | str) else 0
                self.set_job(pipeline=event.pipeline, input=event.input or {}, stages_total=stages_total)
            self.set_job(status="running")
            if job["started_at"] is None:
                self.set_job(started_at=parse_ts(event.timestamp))
            return
        envelope = event.envelope or {}
        self.set_job(status=status, finished_at=parse_ts(event.timestamp), envelope=envelope)
        if job["started_at"] is None and status != "cancelled":
            self.set_job(started_at=job["created_at"])
        if not envelope.get("ok", status == "succeeded"):
            self.set_job(
                error=envelope.get("error") or job["error"] or status,
                error_type=envelope.get("error_type") or job["error_type"],
            )
        # (the event's validation made stages_executed a number and stages a list)
        if "stages_executed" in envelope and isinstance(executed := envelope["stages_executed"] or 0, int | float):
            self.set_job(stages_completed=max(int(executed), job["stages_completed"]))
        listed = envelope.get("stages") or []
        for data in listed if isinstance(listed, list) else []:
            self.stage_report(StageReport.model_validate(data))  # the event's validation checked its shape

    def stage_report(self, report: StageReport) -> None:
        values: StageValues = {"plugin": report.plugin, "tool": report.tool, "status": report.status}
        for key in ("duration_ms", "result_size_bytes", "peak_memory_mb", "error", "error_type"):
            if getattr(report, key) is not None:
                values[key] = getattr(report, key)
        current = self.stage(report.index)
        if current is not None and current.get("status") == "completed":
            values.pop("status", None)  # what a stage_end said stands
        self.upsert(report.index, values)


def reduce(job: JobState, stages: Mapping[int, StageValues], event: Event) -> Reduction:
    """What ``event`` changes, given the job's row and its stored stage rows (by stage index).

    The job's changes are its columns to set; a stage row not in ``stages`` comes back whole (pending,
    attempt 1, unnamed, then the event's values); plugin observations come in the order made.
    """
    return _Reducer(job, stages).apply(event)


def observe(row: ObservedRow | None, seen: Observation) -> ObservedRow:
    """A plugin's observed row after ``seen``: calls and failures add up; its state follows the newest
    observation (a FAILED one always counts, and keeps the last error named)."""
    when = parse_ts(seen.ts).timestamp()
    if row is None:
        return {
            "state": seen.state or "INITIALIZED",
            "last_error": seen.error,
            "last_error_type": seen.error_type,
            "calls": seen.calls,
            "failures": seen.failures,
            "last_duration_ms": seen.duration_ms,
            "updated_at": when,
        }
    new = row.copy()
    new["calls"] = row["calls"] + seen.calls
    new["failures"] = row["failures"] + seen.failures
    if seen.duration_ms is not None:
        new["last_duration_ms"] = seen.duration_ms
    if seen.state is not None and (when >= row["updated_at"] or seen.state == "FAILED"):
        new["state"] = seen.state
        new["updated_at"] = max(when, row["updated_at"])
        if seen.state == "FAILED" and (seen.error is not None or row["state"] != "FAILED"):
            new["last_error"] = seen.error or row["last_error"]
            new["last_error_type"] = seen.error_type or row["last_error_type"]
    return new
