"""Jobs in the store: submitting one (or taking an earlier job's result for it), reading jobs and
their stage rows, and a request to cancel. What a job's events change is the ingestor's
(:mod:`forgeflow.api.store.ingest`); what the launcher records is :mod:`forgeflow.api.store.launches`."""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from forgeflow.api.store.audit import record_audit
from forgeflow.api.store.db import Conflict, Database
from forgeflow.api.store.group_commit import GroupCommit
from forgeflow.api.store.ingest import Ingestor, Publish
from forgeflow.api.store.rows import JobRow, StageRow, job_row, pipeline_stages, stage_row
from forgeflow.api.store.tables import jobs, stage_runs
from forgeflow.api.store.times import utcnow
from forgeflow.canonical import JsonObject
from forgeflow.events.models import JobStatusEvent
from forgeflow.pipeline.outcome import TERMINAL_STATUSES

# Several new jobs in one statement, their rows back in the order of the parameters.
_JOBS_INSERT_IN_ORDER = insert(jobs).returning(*jobs.c, sort_by_parameter_order=True)


class _NewJob(NamedTuple):
    """A submission on its way into the store: the job's row (but its times) and who to tell."""

    values: dict[str, object]
    request_hash: str
    publish: Publish | None


class JobRepo:
    """Submitted jobs: create, read, list, and the cancel request."""

    def __init__(self, db: Database, ingestor: Ingestor) -> None:
        self.db = db
        self.ingestor = ingestor
        dialect = db.engine.dialect
        # Jobs submitted together are stored in one transaction (see group_commit), where the
        # database returns the rows of a multi-row insert in order; elsewhere one by one.
        self._rows_back_in_order = bool(
            dialect.insert_executemany_returning and dialect.insert_executemany_returning_sort_by_parameter_order
        )
        self._commits: GroupCommit[_NewJob, tuple[JobRow, bool]] = GroupCommit(db.write_lock, self._write_group)

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

        Jobs submitted at the same moment share one transaction (:class:`GroupCommit`); each caller
        still gets its own answer, and ``publish`` is called after the commit, under the write lock.

        Raises :class:`Conflict` when the id exists with a different body.
        """
        values: dict[str, object] = {
            "id": job_id,
            "status": "queued",
            "source": source,
            "template_id": template_id,
            "pipeline": pipeline,
            "input": input_data,
            "request_hash": request_hash,
            "cancel_requested": False,
            "last_seq": 1,
            "stages_total": len(pipeline_stages(pipeline)),
            "stages_completed": 0,
            "created_by": created_by,
            "retry_of": retry_of,
            "batch_id": batch_id,
            "work_key": work_key,
            "reused_from": None,
        }
        job = _NewJob(values, request_hash, publish)
        if reuse and work_key:
            with self.db.write_lock:  # the earlier work looked up and taken in one hold of the lock
                done = self.done_work(work_key)
                if done is not None:
                    return self._store_alone(job, done)
        return self._commits.submit(job)

    def _write_group(self, group: list[_NewJob]) -> list[tuple[JobRow, bool] | BaseException]:
        """Store jobs submitted together in one transaction (under the write lock), then publish
        their first messages. Any failure (an id in use, say) stores each alone instead, so that each
        gets its own answer."""
        if len(group) == 1 or not self._rows_back_in_order:
            return [self._outcome_alone(job) for job in group]
        try:
            with self.db.writing() as conn:
                times = [utcnow() for _ in group]  # in the order of arrival, as one by one would give
                params = [{**job.values, "created_at": t, "updated_at": t} for job, t in zip(group, times, strict=True)]
                rows = conn.execute(_JOBS_INSERT_IN_ORDER, params).mappings().all()
                stored = self.ingestor.first_events(
                    conn, [(str(job.values["id"]), t) for job, t in zip(group, times, strict=True)]
                )
        except Exception:  # each alone: an id in use is a 200 or a 409 for its one caller
            return [self._outcome_alone(job) for job in group]
        for job, event in zip(group, stored, strict=True):
            if job.publish:
                job.publish([event])
        return [(job_row(row), True) for row in rows]

    def _outcome_alone(self, job: _NewJob) -> tuple[JobRow, bool] | BaseException:
        try:
            return self._store_alone(job)
        except Exception as exc:  # the caller's own outcome, raised in its thread
            return exc

    def _store_alone(self, job: _NewJob, done: JobRow | None = None) -> tuple[JobRow, bool]:
        """Store one job in its own transaction (under the write lock): new, taking ``done``'s result,
        or found stored already with the same request."""
        job_id = str(job.values["id"])
        with self.db.write_lock:
            now = utcnow()
            try:
                with self.db.writing() as conn:
                    # No read first: the insert itself finds an id in use (IntegrityError, below).
                    # A new job's row comes back from the insert (RETURNING) where the database can;
                    # reused work changes the row after it, so that one is read again.
                    returning = done is None and conn.dialect.insert_returning
                    row = None
                    values = {**job.values, "created_at": now, "updated_at": now}
                    if done is not None:
                        values["reused_from"] = done["reused_from"] or done["id"]
                    statement = insert(jobs).values(values)
                    if returning:
                        row = conn.execute(statement.returning(*jobs.c)).mappings().first()
                    else:
                        conn.execute(statement)
                    if done is None:
                        stored = self.ingestor.first_events(conn, [(job_id, now)])
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
                if existing["request_hash"] != job.request_hash:
                    raise Conflict(f"job {job_id!r} already exists with a different request") from None
                return existing, False
            if job.publish:
                job.publish(stored)
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
