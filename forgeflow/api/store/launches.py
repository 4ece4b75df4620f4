"""The launcher's bookkeeping in the jobs table: which queued jobs to start next, claiming and
recording a launch, hosts' heartbeats, exit codes, and undoing a launch that did not happen."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import func, select, update

from forgeflow.api.store.db import Database
from forgeflow.api.store.rows import JobRow, job_row
from forgeflow.api.store.tables import batches, jobs
from forgeflow.api.store.times import utcnow
from forgeflow.pipeline.outcome import TERMINAL_STATUSES

#: Queued jobs looked at beyond the free slots, so a batch at its concurrency bound does not hold
#: back the jobs queued after it.
LAUNCH_LOOKAHEAD = 1000

_NOT_ENDED = jobs.c.status.not_in(list(TERMINAL_STATUSES))


class LaunchBook:
    """What the launcher reads and writes about the jobs it starts."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def jobs_to_launch(self, limit: int) -> list[JobRow]:
        """Up to ``limit`` queued jobs to start, oldest first; a job of a batch only while fewer than
        the batch's ``max_concurrency`` of its jobs run (the others wait their turn, not the batch's),
        and never one of a batch being cancelled. Only ids are read until the jobs are picked."""
        query = (
            select(jobs.c.id, jobs.c.batch_id)
            .where(
                jobs.c.status == "queued",
                jobs.c.pid.is_(None),
                jobs.c.launched_at.is_(None),
                jobs.c.source != "external",
            )
            .order_by(jobs.c.created_at, jobs.c.id)
            .limit(limit + LAUNCH_LOOKAHEAD)
        )
        picked: list[str] = []
        with self.db.reading() as conn:
            candidates = conn.execute(query).all()
            batch_ids = {batch_id for _, batch_id in candidates if batch_id}
            room: dict[str, int] = {}
            if batch_ids:
                caps = conn.execute(
                    select(batches.c.id, batches.c.max_concurrency, batches.c.cancel_requested).where(
                        batches.c.id.in_(batch_ids)
                    )
                ).all()
                running: dict[str, int] = dict(
                    conn.execute(
                        select(jobs.c.batch_id, func.count())
                        .where(jobs.c.batch_id.in_(batch_ids), jobs.c.launched_at.is_not(None), _NOT_ENDED)
                        .group_by(jobs.c.batch_id)
                    ).all()
                )
                # A cancelled batch starts nothing more (its queued jobs are being cancelled).
                room = {
                    batch_id: 0 if cancelled else cap - running.get(batch_id, 0) for batch_id, cap, cancelled in caps
                }
            for job_id, batch_id in candidates:
                if len(picked) == limit:
                    break
                if batch_id is not None:
                    if room.get(batch_id, 1) <= 0:
                        continue
                    room[batch_id] = room.get(batch_id, 1) - 1
                picked.append(job_id)
            if not picked:
                return []
            rows = {r["id"]: job_row(r) for r in conn.execute(select(jobs).where(jobs.c.id.in_(picked))).mappings()}
        return [rows[job_id] for job_id in picked if job_id in rows]

    def launched_active_jobs(self) -> list[JobRow]:
        """Jobs a launcher started that have no terminal status yet."""
        query = select(jobs).where(jobs.c.launched_at.is_not(None), _NOT_ENDED)
        with self.db.reading() as conn:
            return [job_row(r) for r in conn.execute(query).mappings()]

    def claim_launch(self, job_id: str) -> bool:
        """Mark a queued job as being launched; False when another launcher (or a cancel) got there first."""
        now = utcnow()
        with self.db.writing() as conn:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.launched_at.is_(None), jobs.c.status == "queued")
                .values(launched_at=now, updated_at=now)
            )
            return result.rowcount == 1

    def set_launched(
        self, job_id: str, pid: int | None, create_time: float | None, *, flow_run_id: str | None = None
    ) -> None:
        """The job runs: as process ``pid`` on this host, or (deployment mode) as flow run ``flow_run_id``."""
        now = utcnow()
        values: dict[str, object] = {"pid": pid, "pid_create_time": create_time, "launched_at": now, "updated_at": now}
        if flow_run_id is not None:
            values["flow_run_id"] = flow_run_id
        with self.db.writing() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(values))

    def reset_launch(self, job_id: str) -> None:
        """The job was claimed but not started (no engine took it): queued again, for the next tick."""
        with self.db.writing() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(launched_at=None, pid=None))

    def silent_jobs(self, job_ids: Iterable[str], silent_s: float) -> list[JobRow]:
        """Of these jobs, those not ended whose host has said nothing for ``silent_s`` seconds."""
        ids = list(job_ids)
        if not ids:
            return []
        since = utcnow() - timedelta(seconds=silent_s)
        query = select(jobs).where(
            jobs.c.id.in_(ids),
            jobs.c.status.in_(["queued", "running"]),
            func.coalesce(jobs.c.heartbeat_at, jobs.c.started_at, jobs.c.launched_at) < since,
        )
        with self.db.reading() as conn:
            return [job_row(r) for r in conn.execute(query).mappings()]
