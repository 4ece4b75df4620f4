"""JSON views of stored rows (shared by routers)."""

from __future__ import annotations

from typing import TypedDict

from pydantic import JsonValue

from forgeflow.api.models import JobPipelineView, JobSummary, JobView, TemplateSummary
from forgeflow.api.store import iso
from forgeflow.api.store.rows import JobRow, StageRow, TemplateRow, pipeline_stages
from forgeflow.canonical import JsonObject
from forgeflow.pipeline.outcome import StageStatus, shown_stage_status


class _StageStateBase(TypedDict):
    index: int
    plugin: str
    tool: str
    status: StageStatus
    attempt: int


class StageStateDict(_StageStateBase, total=False):
    """A stage of a stored job (:class:`~forgeflow.api.models.StageState`): what its row and the
    job's envelope say; the row's fields only once it has a row."""

    started_at: str | None
    ended_at: str | None
    duration_ms: float | None
    result_size_bytes: int | None
    peak_memory_mb: float | None
    error: str | None
    error_type: str | None
    progress: JsonObject | None
    reused_outputs: JsonValue
    computed_outputs: JsonValue


def _name(spec: JsonObject, key: str) -> str:
    value = spec.get(key, "")
    return value if isinstance(value, str) else ""


def stage_states(job: JobRow, rows: list[StageRow]) -> list[StageStateDict]:
    stages = pipeline_stages(job.get("pipeline"))
    by_index = {r["stage_index"]: r for r in rows}
    # What only the envelope reports (the stage rows keep what the stage messages say)
    reported_stages = (job.get("envelope") or {}).get("stages") or []
    reported = (
        {r.get("index"): r for r in reported_stages if isinstance(r, dict)} if isinstance(reported_stages, list) else {}
    )
    count = max(len(stages), max(by_index, default=-1) + 1)
    out = []
    for index in range(count):
        spec = stages[index] if index < len(stages) else {}
        row = by_index.get(index)
        state: StageStateDict = {
            "index": index,
            "plugin": (row and row["plugin"]) or _name(spec, "plugin"),
            "tool": (row and row["tool"]) or _name(spec, "tool"),
            "status": shown_stage_status(row["status"] if row else "pending", job["status"]),
            "attempt": row["attempt"] if row else 1,
        }
        if row:
            state.update(
                {
                    "started_at": row["started_at"],
                    "ended_at": row["ended_at"],
                    "duration_ms": row["duration_ms"],
                    "result_size_bytes": row["result_size_bytes"],
                    "peak_memory_mb": row["peak_memory_mb"],
                    "error": row["error"],
                    "error_type": row["error_type"],
                    "progress": row["progress"],
                }
            )
        report = reported.get(index, {})
        if report.get("reused_outputs") is not None:
            state["reused_outputs"] = report["reused_outputs"]
        if report.get("computed_outputs") is not None:
            state["computed_outputs"] = report["computed_outputs"]
        out.append(state)
    return out


def current_stage(states: list[StageStateDict]) -> int | None:
    running = [s["index"] for s in states if s["status"] == "running"]
    return running[-1] if running else None


def job_summary(job: JobRow) -> JobSummary:
    """One job in a list: status, timing, progress from the job row."""
    stages = pipeline_stages(job.get("pipeline"))
    running = job["status"] == "running" and job["stages_completed"] < len(stages)
    return JobSummary(
        job_id=job["id"],
        status=job["status"],
        source=job["source"],
        pipeline_id=job["template_id"],
        created_at=iso(job["created_at"]),
        started_at=iso(job["started_at"]),
        finished_at=iso(job["finished_at"]),
        stages_total=job["stages_total"],
        stages_completed=job["stages_completed"],
        error_type=job["error_type"],
        stages=[f"{s.get('plugin', '')}.{s.get('tool', '')}" for s in stages],
        current_stage=job["stages_completed"] if running else None,
        created_by=job["created_by"],
        retry_of=job["retry_of"],
        batch_id=job.get("batch_id"),
        reused_from=job.get("reused_from"),
    )


def job_view(job: JobRow, rows: list[StageRow]) -> JobView:
    """One job in full: the summary with progress derived from its stage rows, the envelope, the input."""
    states = stage_states(job, rows)
    return JobView.model_validate(
        {
            **job_summary(job).model_dump(),
            "updated_at": iso(job["updated_at"]),
            "flow_run_id": job["flow_run_id"],
            "cancel_requested": bool(job["cancel_requested"]),
            "cancelled_by": job["cancelled_by"],
            "stages_total": len(states) or job["stages_total"],
            "stages_completed": sum(1 for s in states if s["status"] == "completed"),
            "current_stage": current_stage(states),
            "last_seq": job["last_seq"],
            "error": job["error"],
            "envelope": job["envelope"],
            "pipeline": job["pipeline"],
            "input": job["input"],
        }
    )


def pipeline_view(job: JobRow, rows: list[StageRow]) -> JobPipelineView:
    states = stage_states(job, rows)
    total = len(states)
    done = sum(1 for s in states if s["status"] == "completed")
    envelope = job["envelope"] or {}
    failed = envelope.get("stage_failed")
    if failed is None:
        failed = next((s["index"] for s in states if s["status"] == "failed"), None)
    return JobPipelineView(
        job_id=job["id"],
        pipeline=job["pipeline"],
        pipeline_id=job["template_id"],
        status=job["status"],
        stages_total=total,
        stages_executed=done,
        current_stage=current_stage(states),
        percent=round(100 * done / total) if total else (100 if job["status"] == "succeeded" else 0),
        stage_failed=failed,
        stages=states,
    )


def template_summary(row: TemplateRow) -> TemplateSummary:
    definition = row["definition"] or {}
    return TemplateSummary(
        id=row["id"],
        name=row["name"],
        stages=definition.get("stages", []),
        created_at=iso(row["created_at"]),
        updated_at=iso(row["updated_at"]),
        timeout_seconds=definition.get("timeout_seconds", 300.0),
        description=definition.get("description", ""),
        created_by=row["created_by"],
        runner=definition.get("runner"),
    )
