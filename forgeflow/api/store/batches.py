"""Repository functions of batches: the ``batches`` and ``batch_files`` tables, and a batch's jobs.

A batch row says what the batch is (pipeline, source, concurrency bound) and how far it got
(``status``, ``counts``); a file row names the job that stands for the file now (the last attempt:
a crash retry or a retry of the batch makes a new job and points the file at it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, insert, null, select, update

from forgeflow.api.store.db import Database
from forgeflow.api.store.rows import BatchFileRow, BatchRow, batch_file_row, batch_row
from forgeflow.api.store.tables import batch_files, batches, jobs
from forgeflow.api.store.times import utcnow
from forgeflow.canonical import JsonObject


@dataclass(frozen=True)
class NewFile:
    """A file of a new batch: its name, its media ref (None when it could not be stored, and why)."""

    name: str
    media: str | None
    error: str | None = None
    error_type: str | None = None


@dataclass(frozen=True)
class FileState:
    """A file of a batch with the job that stands for it now (job fields None while it has none)."""

    file: BatchFileRow
    status: str | None
    reused_from: str | None
    error: str | None
    error_type: str | None
    envelope: JsonObject | None
    started_at: datetime | None
    finished_at: datetime | None


class BatchRepo:
    """Batches in the API store (one per :class:`~forgeflow.api.store.repo.Store`, as ``store.batches``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        *,
        batch_id: str,
        name: str,
        pipeline: JsonObject,
        template_id: str | None,
        source: JsonObject,
        max_concurrency: int,
        force: bool,
        created_by: str | None,
        flow_run_id: str | None,
        files: list[NewFile],
    ) -> BatchRow:
        now = utcnow()
        with self.db.writing() as conn:
            conn.execute(
                insert(batches).values(
                    id=batch_id,
                    name=name,
                    status="running",
                    pipeline=pipeline,
                    template_id=template_id,
                    source=source,
                    max_concurrency=max_concurrency,
                    force=force,
                    created_by=created_by,
                    flow_run_id=flow_run_id,
                    cancel_requested=False,
                    created_at=now,
                    updated_at=now,
                    files_total=len(files),
                    counts={},
                )
            )
            if files:
                conn.execute(
                    insert(batch_files),
                    [
                        {
                            "batch_id": batch_id,
                            "position": i,
                            "name": f.name,
                            "media": f.media,
                            "job_id": None,
                            "attempts": 0,
                            "error": f.error,
                            "error_type": f.error_type,
                        }
                        for i, f in enumerate(files)
                    ],
                )
        batch = self.get(batch_id)
        assert batch is not None
        return batch

    def get(self, batch_id: str) -> BatchRow | None:
        with self.db.reading() as conn:
            row = conn.execute(select(batches).where(batches.c.id == batch_id)).mappings().first()
        return batch_row(row) if row else None

    def by_flow_run(self, flow_run_id: str) -> BatchRow | None:
        """The batch a flow run registered (a retried flow run registers it once)."""
        with self.db.reading() as conn:
            row = conn.execute(select(batches).where(batches.c.flow_run_id == flow_run_id)).mappings().first()
        return batch_row(row) if row else None

    def page(self, limit: int, offset: int) -> tuple[list[BatchRow], int]:
        """Newest first, with the total count."""
        query = select(batches).order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit).offset(offset)
        with self.db.reading() as conn:
            rows = [batch_row(r) for r in conn.execute(query).mappings()]
            total = conn.execute(select(func.count()).select_from(batches)).scalar() or 0
        return rows, int(total)

    def active_ids(self) -> list[str]:
        with self.db.reading() as conn:
            return list(conn.execute(select(batches.c.id).where(batches.c.status == "running")).scalars())

    def files(self, batch_id: str, *, envelopes: bool = False) -> list[FileState]:
        """Every file of the batch, in order, with its current job's status (and its result envelope
        with ``envelopes``: the summary needs it, the batch's progress does not)."""
        query = (
            select(
                batch_files,
                jobs.c.status.label("job_status"),
                jobs.c.reused_from,
                jobs.c.error.label("job_error"),
                jobs.c.error_type.label("job_error_type"),
                (jobs.c.envelope if envelopes else null()).label("envelope"),
                jobs.c.started_at,
                jobs.c.finished_at,
            )
            .select_from(batch_files.outerjoin(jobs, jobs.c.id == batch_files.c.job_id))
            .where(batch_files.c.batch_id == batch_id)
            .order_by(batch_files.c.position)
        )
        with self.db.reading() as conn:
            rows = conn.execute(query).mappings().all()
        file_keys = set(batch_files.c.keys())
        return [
            FileState(
                file=batch_file_row({k: r[k] for k in file_keys}),
                status=r["job_status"],
                reused_from=r["reused_from"],
                error=r["job_error"] if r["job_status"] else r["error"],
                error_type=r["job_error_type"] if r["job_status"] else r["error_type"],
                envelope=r["envelope"],
                started_at=r["started_at"],
                finished_at=r["finished_at"],
            )
            for r in rows
        ]

    def point_file(self, batch_id: str, position: int, job_id: str, attempts: int) -> None:
        """The file's work is now job ``job_id`` (its ``attempts``-th)."""
        with self.db.writing() as conn:
            conn.execute(
                update(batch_files)
                .where(batch_files.c.batch_id == batch_id, batch_files.c.position == position)
                .values(job_id=job_id, attempts=attempts)
            )

    def update(self, batch_id: str, **values: object) -> None:
        with self.db.writing() as conn:
            conn.execute(update(batches).where(batches.c.id == batch_id).values(updated_at=utcnow(), **values))
