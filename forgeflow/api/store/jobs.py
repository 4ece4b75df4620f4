"""Jobs in the store: submitting one (or taking an earlier job's result for it), reading jobs and
their stage rows, and a request to cancel. What a job's events change is the ingestor's
(:mod:`forgeflow.api.store.ingest`); what the launcher records is :mod:`forgeflow.api.store.launches`."""

from __future__ import annotations

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from forgeflow.api.store.audit import record_audit
from forgeflow.api.store.db import Conflict, Database
from forgeflow.api.store.ingest import Ingestor, Publish
from forgeflow.api.store.rows import JobRow, StageRow, job_row, pipeline_stages, stage_row
from forgeflow.api.store.tables import jobs, stage_runs
from forgeflow.api.store.times import utcnow
from forgeflow.canonical import JsonObject
from forgeflow.events.models import JobStatusEvent
from forgeflow.pipeline.outcome import TERMINAL_STATUSES


class JobRepo:
    """Submitted jobs: create, read, list, and the cancel request."""

    def __init__(self, db: Database, ingestor: Ingestor) -> None:
        self.db = db
        self.ingestor = ingestor

    def create(
        self,
        *,
        job_id: str,
        pipeline: JsonObject,
        input_data: JsonObject,
        request_hash: str,
        source: str,
        template_id: str | None,
        created_by: str | None = None,
        retry_of: str | None = None,
        batch_id: str | None = None,
        work_key: str | None = None,
        reuse: bool = False,
        publish: Publish | None = None,
    ) -> tuple[JobRow, bool]:
        """Insert a queued job and its first message; an existing id with the same body is returned as is.

        With ``reuse`` and a ``work_key`` that an earlier job computed successfully, the job takes
        that job's result instead: it is stored ``succeeded`` at once with ``reused_from`` naming the
        job that did the work (its outputs and artifacts are that job's), and nothing is launched.

        Raises :class:`Conflict` when the id exists with a different body.
        """
        with self.db.write_lock:
            now = utcnow()
            done = self.done_work(work_key) if reuse and work_key else None
            try:
                with self.db.writing() as conn:
                    # No read first: the insert itself finds an id in use (IntegrityError, below).
                    # A new job's row comes back from the insert (RETURNING) where the database can;
                    # reused work changes the row after it, so that one is read again.
                    returning = done is None and conn.dialect.insert_returning
                    row = None
                    statement = insert(jobs).values(
                        id=job_id,
                        status="queued",
                        source=source,
                        template_id=template_id,
                        pipeline=pipeline,
                        input=input_data,
                        request_hash=request_hash,
                        created_at=now,
                        updated_at=now,
                        cancel_requested=False,
                        last_seq=1,
                        stages_total=len(pipeline_stages(pipeline)),
                        stages_completed=0,
                        created_by=created_by,
                        retry_of=retry_of,
                        batch_id=batch_id,
                        work_key=work_key,
                        reused_from=(done["reused_from"] or done["id"]) if done else None,
                    )
                    if returning:
                        row = conn.execute(statement.returning(*jobs.c)).mappings().first()
                    else:
                        conn.execute(statement)
                    if done is None:
                        stored = [self.ingestor.first_event(conn, job_id, now)]
                    else:  # reused work: queued, then succeeded with the earlier job's envelope
                        reused = JobStatusEvent(job_id=job_id, status="succeeded", envelope=done["envelope"])
                        stored = self.ingestor.write(conn, [JobStatusEvent(job_id=job_id, status="queued"), reused])
                    if row is None:
                        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
            except IntegrityError:
                # The id is taken (a repeated submission, or another API process created it first).
                existing = self.get(job_id)
                if existing is None:
                    raise
                if existing["request_hash"] != request_hash:
                    raise Conflict(f"job {job_id!r} already exists with a different request") from None
                return existing, False
            if publish:
                publish(stored)
        assert row is not None
        return job_row(row), True

    def done_work(self, work_key: str) -> JobRow | None:
        """The first job that computed ``work_key`` and succeeded (None: this work was never done)."""
        query = (
            select(jobs)
            .where(jobs.c.work_key == work_key, jobs.c.status == "succeeded")
            .order_by(jobs.c.finished_at, jobs.c.id)
            .limit(1)
        )
        with self.db.reading() as conn:
            row = conn.execute(query).mappings().first()
        return job_row(row) if row else None

    def get(self, job_id: str) -> JobRow | None:
        with self.db.reading() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return job_row(row) if row else None

    def page(
        self, statuses: list[str] | None, limit: int, offset: int, template_id: str | None = None
    ) -> tuple[list[JobRow], int]:
        query = select(jobs)
        count = select(func.count()).select_from(jobs)
        if statuses:
            query = query.where(jobs.c.status.in_(statuses))
            count = count.where(jobs.c.status.in_(statuses))
        if template_id:
            query = query.where(jobs.c.template_id == template_id)
            count = count.where(jobs.c.template_id == template_id)
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit).offset(offset)
        with self.db.reading() as conn:
            rows = [job_row(r) for r in conn.execute(query).mappings()]
            total = conn.execute(count).scalar() or 0
        return rows, total

    def stage_rows(self, job_id: str) -> list[StageRow]:
        with self.db.reading() as conn:
            rows = conn.execute(
                select(stage_runs).where(stage_runs.c.job_id == job_id).order_by(stage_runs.c.stage_index)
            ).mappings()
            return [stage_row(r) for r in rows]

    def has_terminal(self, job_id: str) -> bool:
        job = self.get(job_id)
        return bool(job and job["status"] in TERMINAL_STATUSES)

    def set_cancel_requested(self, job_id: str, by: str | None = None) -> None:
        """Mark the job cancelled on request, and by whom (the first request counts)."""
        with self.db.writing() as conn:
            first = conn.execute(select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar() is False
            values: dict[str, object] = {"cancel_requested": True, "updated_at": utcnow()}
            if first:
                values["cancelled_by"] = by
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(values))
            if first:
                record_audit(conn, by, "job.cancel", job_id)
