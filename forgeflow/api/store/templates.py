"""Pipeline templates (the ``pipelines`` table): stored definitions jobs are submitted against, and
what their runs say about them."""

from __future__ import annotations

from typing import TypedDict

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from forgeflow.api.store.audit import record_audit
from forgeflow.api.store.db import Conflict, Database
from forgeflow.api.store.rows import TemplateRow, template_row
from forgeflow.api.store.tables import jobs, pipelines, stage_runs
from forgeflow.api.store.times import aware, iso, utcnow
from forgeflow.canonical import JsonObject
from forgeflow.pipeline.outcome import TERMINAL_STATUSES


class StageFigures(TypedDict):
    """One stage's runs of a template's jobs."""

    stage_index: int
    runs: int
    completed: int
    failed: int
    mean_duration_ms: float | None
    min_duration_ms: float | None
    max_duration_ms: float | None


class TemplateStats(TypedDict):
    """What a template's runs say about it (:meth:`TemplateRepo.stats`)."""

    last_used: str | None
    runs: dict[str, int]
    success_rate: float | None
    mean_duration_ms: float | None
    stage_stats: list[StageFigures]


class TemplateRepo:
    """Templates in the store: create, replace, read, delete, and their run statistics."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, template_id: str, name: str, definition: JsonObject, created_by: str | None = None) -> TemplateRow:
        """Store a new template; :class:`Conflict` when its id or name is taken."""
        now = utcnow()
        with self.db.write_lock:
            if self.get(template_id) is not None:
                raise Conflict(f"a pipeline with the id {template_id!r} already exists")
            try:
                with self.db.writing() as conn:
                    conn.execute(
                        insert(pipelines).values(
                            id=template_id,
                            name=name,
                            definition=definition,
                            created_at=now,
                            updated_at=now,
                            created_by=created_by,
                        )
                    )
            except IntegrityError:
                raise Conflict(f"a pipeline named {name!r} (id {template_id!r}) already exists") from None
        template = self.get(template_id)
        assert template is not None
        return template

    def update(self, template_id: str, name: str, definition: JsonObject) -> TemplateRow | None:
        """Replace a template's name and definition (its id and runs stay); None when there is none."""
        with self.db.writing() as conn:
            changed = conn.execute(
                update(pipelines)
                .where(pipelines.c.id == template_id)
                .values(name=name, definition=definition, updated_at=utcnow())
            ).rowcount
        return self.get(template_id) if changed else None

    def get(self, template_id: str) -> TemplateRow | None:
        with self.db.reading() as conn:
            row = conn.execute(select(pipelines).where(pipelines.c.id == template_id)).mappings().first()
        return template_row(row) if row else None

    def all(self) -> list[TemplateRow]:
        with self.db.reading() as conn:
            rows = conn.execute(select(pipelines).order_by(pipelines.c.created_at, pipelines.c.id)).mappings()
            return [template_row(r) for r in rows]

    def delete(self, template_id: str, by: str | None = None) -> bool:
        with self.db.writing() as conn:
            deleted = conn.execute(delete(pipelines).where(pipelines.c.id == template_id)).rowcount > 0
            if deleted:
                record_audit(conn, by, "template.delete", template_id)
            return deleted

    def stats(self, template_id: str) -> TemplateStats:
        """The template's runs by status, success rate, mean duration and per-stage figures."""
        with self.db.reading() as conn:
            counts: dict[str, int] = dict(
                conn.execute(
                    select(jobs.c.status, func.count()).where(jobs.c.template_id == template_id).group_by(jobs.c.status)
                ).all()
            )
            last_used = conn.execute(
                select(func.max(jobs.c.created_at)).where(jobs.c.template_id == template_id)
            ).scalar()
            spans = conn.execute(
                select(jobs.c.started_at, jobs.c.finished_at).where(
                    jobs.c.template_id == template_id,
                    jobs.c.status == "succeeded",
                    jobs.c.started_at.is_not(None),
                    jobs.c.finished_at.is_not(None),
                )
            ).all()
            completed = stage_runs.c.status == "completed"
            per_stage = conn.execute(
                select(
                    stage_runs.c.stage_index,
                    func.count(),
                    func.sum(case((completed, 1), else_=0)),
                    func.sum(case((stage_runs.c.status == "failed", 1), else_=0)),
                    func.avg(case((completed, stage_runs.c.duration_ms), else_=None)),
                    func.min(case((completed, stage_runs.c.duration_ms), else_=None)),
                    func.max(case((completed, stage_runs.c.duration_ms), else_=None)),
                )
                .select_from(stage_runs.join(jobs, jobs.c.id == stage_runs.c.job_id))
                .where(jobs.c.template_id == template_id)
                .group_by(stage_runs.c.stage_index)
                .order_by(stage_runs.c.stage_index)
            ).all()
        finished = sum(counts.get(s, 0) for s in TERMINAL_STATUSES)
        durations = [(aware(f) - aware(s)).total_seconds() * 1000 for s, f in spans if s is not None and f is not None]
        return {
            "last_used": iso(last_used),
            "runs": {
                "total": sum(counts.values()),
                "queued": counts.get("queued", 0),
                "running": counts.get("running", 0),
                "succeeded": counts.get("succeeded", 0),
                "failed": counts.get("failed", 0),
                "cancelled": counts.get("cancelled", 0),
                "crashed": counts.get("crashed", 0),
                "finished": finished,
            },
            "success_rate": round(counts.get("succeeded", 0) / finished, 4) if finished else None,
            "mean_duration_ms": round(sum(durations) / len(durations), 1) if durations else None,
            "stage_stats": [
                {
                    "stage_index": row[0],
                    "runs": row[1],
                    "completed": int(row[2] or 0),
                    "failed": int(row[3] or 0),
                    "mean_duration_ms": round(float(row[4]), 1) if row[4] is not None else None,
                    "min_duration_ms": float(row[5]) if row[5] is not None else None,
                    "max_duration_ms": float(row[6]) if row[6] is not None else None,
                }
                for row in per_stage
            ],
        }
