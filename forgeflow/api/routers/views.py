"""JSON views of stored rows (shared by routers)."""

from __future__ import annotations

from typing import Any

from forgeflow.api.store import iso
from forgeflow.api.store.rows import JobRow, StageRow, TemplateRow
from forgeflow.pipeline.outcome import shown_stage_status


def stage_states(job: JobRow, rows: list[StageRow]) -> list[dict[str, Any]]:
    stages = (job.get("pipeline") or {}).get("stages") or []
    by_index = {r["stage_index"]: r for r in rows}
    # What only the envelope reports (the stage rows keep what the stage messages say)
    reported = {r.get("index"): r for r in (job.get("envelope") or {}).get("stages") or [] if isinstance(r, dict)}
    count = max(len(stages), max(by_index, default=-1) + 1)
    out = []
    for index in range(count):
        spec = stages[index] if index < len(stages) else {}
        row = by_index.get(index)
        state: dict[str, Any] = {
            "index": index,
            "plugin": (row and row["plugin"]) or spec.get("plugin", ""),
            "tool": (row and row["tool"]) or spec.get("tool", ""),
            "status": shown_stage_status(row["status"] if row else "pending", job["status"]),
            "attempt": row["attempt"] if row else 1,
        }
        if row:
            for key in (
                "started_at",
                "ended_at",
                "duration_ms",
                "result_size_bytes",
                "peak_memory_mb",
                "error",
                "error_type",
                "progress",
            ):
                state[key] = row[key]
        for key in ("reused_outputs", "computed_outputs"):
            if reported.get(index, {}).get(key) is not None:
                state[key] = reported[index][key]
        out.append(state)
    return out


def current_stage(states: list[dict[str, Any]]) -> int | None:
    running = [s["index"] for s in states if s["status"] == "running"]
    return running[-1] if running else None


def job_summary(job: JobRow) -> dict[str, Any]:
    """One job in a list: status, timing, progress from the job row."""
    stages = (job.get("pipeline") or {}).get("stages") or []
    running = job["status"] == "running" and job["stages_completed"] < len(stages)
    return {
        "job_id": job["id"],
        "status": job["status"],
        "source": job["source"],
        "pipeline_id": job["template_id"],
        "created_at": iso(job["created_at"]),
        "started_at": iso(job["started_at"]),
        "finished_at": iso(job["finished_at"]),
        "stages_total": job["stages_total"],
        "stages_completed": job["stages_completed"],
        "error_type": job["error_type"],
        "stages": [f"{s.get('plugin', '')}.{s.get('tool', '')}" for s in stages if isinstance(s, dict)],
        "current_stage": job["stages_completed"] if running else None,
        "created_by": job["created_by"],
        "retry_of": job["retry_of"],
        "batch_id": job.get("batch_id"),
        "reused_from": job.get("reused_from"),
    }


def job_view(job: JobRow, rows: list[StageRow]) -> dict[str, Any]:
    """One job in full: the summary with progress derived from its stage rows, the envelope, the input."""
    states = stage_states(job, rows)
    return {
        **job_summary(job),
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


def pipeline_view(job: JobRow, rows: list[StageRow]) -> dict[str, Any]:
    states = stage_states(job, rows)
    total = len(states)
    done = sum(1 for s in states if s["status"] == "completed")
    envelope = job["envelope"] or {}
    failed = envelope.get("stage_failed")
    if failed is None:
        failed = next((s["index"] for s in states if s["status"] == "failed"), None)
    return {
        "job_id": job["id"],
        "pipeline": job["pipeline"],
        "pipeline_id": job["template_id"],
        "status": job["status"],
        "stages_total": total,
        "stages_executed": done,
        "current_stage": current_stage(states),
        "percent": round(100 * done / total) if total else (100 if job["status"] == "succeeded" else 0),
        "stage_failed": failed,
        "stages": states,
    }


def template_summary(row: TemplateRow) -> dict[str, Any]:
    definition = row["definition"] or {}
    return {
        "id": row["id"],
        "name": row["name"],
        "stages": definition.get("stages", []),
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
        "timeout_seconds": definition.get("timeout_seconds", 300.0),
        "description": definition.get("description", ""),
        "created_by": row["created_by"],
        "runner": definition.get("runner"),
    }
