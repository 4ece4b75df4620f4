"""The ingestor: the one way events enter the store.

Every write goes through the store's one process-wide lock and one transaction, so a batch is
stored whole or not at all. :meth:`Ingestor.ingest` dedupes the events by ``event_id``, gives each
the job's next ``seq`` (1, 2, 3 … no gaps; the job's row is locked ``FOR UPDATE`` on PostgreSQL, so
API processes sharing a database never hand out a seq twice), stores it, derives the job's row, its
stage rows and the plugins' observed health from it with the pure reducer
(:func:`forgeflow.events.reduce.reduce`) in the same transaction, and only after the commit hands
the stored events to ``publish`` (still under the lock, so the hub sees them in commit order).

Hot path: the statements are built once and each execution binds its values (built per event, their
construction — SQLAlchemy's coercions and cache keys — was half of what storing an event cost); a
job's row and stage rows are read once a batch and written once at its end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from sqlalchemy import Connection, bindparam, insert, select, update

from forgeflow.api.store.db import Database
from forgeflow.api.store.event_log import StoredEvent, event_text
from forgeflow.api.store.plugins import ObservedPlugins
from forgeflow.api.store.rows import JobRow, job_row
from forgeflow.api.store.tables import events, jobs, stage_runs
from forgeflow.api.store.times import utcnow
from forgeflow.events.models import Event, JobStatusEvent, is_terminal_event
from forgeflow.events.reduce import StageValues, reduce

Publish = Callable[[list[StoredEvent]], None]
ResolvePlugin = Callable[[str], str]

_STAGE_WHERE = (stage_runs.c.job_id == bindparam("w_job_id")) & (stage_runs.c.stage_index == bindparam("w_index"))
_STAGES_OF_JOB = select(stage_runs).where(stage_runs.c.job_id == bindparam("w_job_id"))
_STAGE_UPDATE = update(stage_runs).where(_STAGE_WHERE)
_STAGE_INSERT = insert(stage_runs)
_JOB_FOR_UPDATE = select(jobs).where(jobs.c.id == bindparam("w_job_id")).with_for_update()
_JOB_UPDATE = update(jobs).where(jobs.c.id == bindparam("w_job_id"))
_EVENT_INSERT = insert(events).returning(events.c.id)
_EVENT_ID_STORED = select(events.c.event_id).where(events.c.event_id == bindparam("w_event_id"))
# Several rows in one statement; the ids come back in the order of the rows (SQLAlchemy's
# insertmanyvalues, on SQLite and PostgreSQL).
_EVENTS_INSERT_IN_ORDER = insert(events).returning(events.c.id, sort_by_parameter_order=True)
_STAGE_KEYS = ("job_id", "stage_index")


class _JobInBatch:
    """One job while a batch is stored: its row and stage rows as the batch leaves them, and what to write."""

    def __init__(self, row: JobRow, stages: dict[int, StageValues]) -> None:
        self.row = row
        self.stages = stages
        self.stored_stages = set(stages)
        self.changes: dict[str, object] = {}
        self.stage_changes: dict[int, StageValues] = {}

    def apply(self, event: Event, plugins: ObservedPlugins) -> None:
        reduction = reduce(self.row, self.stages, event)
        if reduction.job:
            self.changes.update(reduction.job)
            self.row = job_row({**self.row, **reduction.job})
        for index, values in reduction.stages.items():
            self.stages[index] = {**self.stages.get(index, {}), **values}
            self.stage_changes.setdefault(index, {}).update(values)
        for seen in reduction.observations:
            plugins.add(seen)

    def flush(self, conn: Connection, now: datetime) -> None:
        job_id = self.row["id"]
        for index, values in self.stage_changes.items():
            if index in self.stored_stages:
                conn.execute(_STAGE_UPDATE, {"w_job_id": job_id, "w_index": index, **values})
            else:
                conn.execute(_STAGE_INSERT, {"job_id": job_id, "stage_index": index, **self.stages[index]})
        if self.changes:
            conn.execute(_JOB_UPDATE, {"w_job_id": job_id, **self.changes, "updated_at": now})


class Ingestor:
    """Stores events and keeps the state derived from them (the one writer of events and stage rows)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def ingest(
        self,
        batch: Iterable[Event],
        *,
        publish: Publish | None = None,
        resolve_plugin: ResolvePlugin | None = None,
        alive: Iterable[str] = (),
    ) -> list[StoredEvent]:
        """Store new events (duplicates by ``event_id`` are skipped), then publish them in order.

        ``alive`` names jobs whose hosts said they still run them: their heartbeat is written in the
        same transaction (on the row the batch updates anyway, for a job with new events)."""
        batch = list(batch)
        heard = set(alive)
        if not batch and not heard:
            return []
        with self.db.write_lock:
            with self.db.writing() as conn:
                stored = self.write(conn, batch, resolve_plugin, heard=heard)
            if publish and stored:
                publish(stored)
        return stored

    def write(
        self,
        conn: Connection,
        batch: list[Event],
        resolve_plugin: ResolvePlugin | None = None,
        *,
        heard: set[str] | None = None,
    ) -> list[StoredEvent]:
        """Store ``batch`` in the caller's transaction (under the write lock) and return what was new;
        the jobs in ``heard`` get their heartbeat."""
        existing = _stored_ids(conn, {e.event_id for e in batch}) if batch else set()
        in_batch: dict[str, _JobInBatch] = {}
        plugins = ObservedPlugins(conn, resolve_plugin)
        stored: list[StoredEvent] = []
        now = utcnow()
        for event in batch:
            if event.event_id in existing:
                continue
            existing.add(event.event_id)
            job = in_batch.get(event.job_id)
            if job is None:
                job = in_batch[event.job_id] = _job_in_batch(conn, event.job_id, now)
            seq = job.row["last_seq"] + 1
            job.row["last_seq"] = job.changes["last_seq"] = seq
            # Stored and sent as a summary: the whole envelope is stored once, in the job's row.
            shown = event.summarized() if isinstance(event, JobStatusEvent) else event
            data = shown.model_dump(mode="json")
            data["seq"] = seq
            text = event_text(data)
            row = {"job_id": event.job_id, "seq": seq, "event_id": event.event_id, "type": event.type}
            cursor = conn.execute(_EVENT_INSERT, {**row, "payload": text, "received_at": now}).scalar_one()
            job.apply(event, plugins)
            stored.append(StoredEvent(cursor, event.job_id, seq, event.type, text, is_terminal_event(event)))
        heard = set(heard or ())
        for job_id, job in in_batch.items():
            if job_id in heard:  # its row is written below anyway (a new event changes its last seq)
                job.changes["heartbeat_at"] = now
                heard.discard(job_id)
            job.flush(conn, now)
        plugins.flush()
        ids = sorted(heard)
        for i in range(0, len(ids), 500):
            conn.execute(update(jobs).where(jobs.c.id.in_(ids[i : i + 500])).values(heartbeat_at=now))
        return stored

    @staticmethod
    def first_events(conn: Connection, new_jobs: list[tuple[str, datetime]]) -> list[StoredEvent]:
        """New jobs' first messages (``job_status`` queued, seq 1), one per ``(job_id, received_at)``
        and in that order, written as :meth:`write` would write them, without the reads that an event
        of an existing job needs: one statement for them all."""
        rows: list[dict[str, object]] = []
        texts: list[str] = []
        for job_id, now in new_jobs:
            event = JobStatusEvent(job_id=job_id, status="queued")
            data = event.summarized().model_dump(mode="json")
            data["seq"] = 1
            texts.append(event_text(data))
            row = {"job_id": job_id, "seq": 1, "event_id": event.event_id, "type": event.type}
            rows.append({**row, "payload": texts[-1], "received_at": now})
        if len(rows) == 1:
            cursors = [conn.execute(_EVENT_INSERT, rows[0]).scalar_one()]
        else:
            cursors = list(conn.execute(_EVENTS_INSERT_IN_ORDER, rows).scalars())
        return [
            StoredEvent(cursor, job_id, 1, "job_status", text, False)
            for cursor, (job_id, _), text in zip(cursors, new_jobs, texts, strict=True)
        ]


def _stored_ids(conn: Connection, event_ids: set[str]) -> set[str]:
    """Which of these event ids are stored already."""
    ids = list(event_ids)
    if len(ids) == 1:  # most batches: a statement built once (an IN list is rendered per execution)
        return set(conn.execute(_EVENT_ID_STORED, {"w_event_id": ids[0]}).scalars())
    existing: set[str] = set()
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        existing.update(conn.execute(select(events.c.event_id).where(events.c.event_id.in_(chunk))).scalars())
    return existing


def _job_in_batch(conn: Connection, job_id: str, now: datetime) -> _JobInBatch:
    """The job's row (locked), created for events of a job this service did not submit, and its stage rows."""
    row = conn.execute(_JOB_FOR_UPDATE, {"w_job_id": job_id}).mappings().first()
    if row is None:
        # Events of a job this service did not submit (a flow run started elsewhere).
        conn.execute(
            insert(jobs),
            {
                "id": job_id,
                "status": "queued",
                "source": "external",
                "pipeline": {"stages": []},
                "input": {},
                "request_hash": "",
                "created_at": now,
                "updated_at": now,
                "cancel_requested": False,
                "last_seq": 0,
                "stages_total": 0,
                "stages_completed": 0,
            },
        )
        row = conn.execute(_JOB_FOR_UPDATE, {"w_job_id": job_id}).mappings().first()
    assert row is not None
    stages = {
        r["stage_index"]: {k: v for k, v in r.items() if k not in _STAGE_KEYS}
        for r in conn.execute(_STAGES_OF_JOB, {"w_job_id": job_id}).mappings()
    }
    return _JobInBatch(job_row(row), stages)
