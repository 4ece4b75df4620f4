"""Repository functions of the API store: jobs, events, templates, plugin observations.

Every write goes through one process-wide lock and one transaction, so a request either stores
everything it means to or nothing. Events are the source of truth of a job: :meth:`Store.ingest`
dedupes them by ``event_id``, gives each the job's next ``seq`` (1, 2, 3 … no gaps), stores it,
derives the job's status, stage table and plugin observations from it in the same transaction, and
only after the commit hands the stored events to ``publish`` (still under the lock, so the hub sees
them in commit order).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from forgeflow.api.store.db import make_engine, migrate
from forgeflow.api.store.rows import (
    AuditRow,
    JobRow,
    PluginObservedRow,
    StageRow,
    TemplateRow,
    audit_row,
    job_row,
    plugin_observed_row,
    stage_row,
    template_row,
)
from forgeflow.api.store.tables import audit, batches, events, jobs, meta, pipelines, plugin_observed, stage_runs
from forgeflow.canonical import MAX_COUNT
from forgeflow.events.models import (
    Event,
    JobStatusEvent,
    PipelineError,
    PipelineProgress,
    StageEnd,
    StageProgress,
    StageStart,
    is_terminal_event,
)
from forgeflow.pipeline.outcome import NOT_THE_PLUGINS_DOING, TERMINAL_STATUSES, StageReport, is_terminal

#: Queued jobs looked at beyond the free slots, so a batch at its concurrency bound does not hold
#: back the jobs queued after it.
LAUNCH_LOOKAHEAD = 1000

# The ingest path's statements, built once: each execution binds its values. Built per event, their
# construction (SQLAlchemy's coercions and cache keys) was half of what storing an event cost.
_STAGE_WHERE = (stage_runs.c.job_id == bindparam("w_job_id")) & (stage_runs.c.stage_index == bindparam("w_index"))
_STAGE_EXISTS = select(stage_runs.c.stage_index).where(_STAGE_WHERE)
_STAGE_UPDATE = update(stage_runs).where(_STAGE_WHERE)
_OBSERVED_ROW = select(plugin_observed).where(plugin_observed.c.plugin == bindparam("w_plugin"))
_OBSERVED_UPDATE = update(plugin_observed).where(plugin_observed.c.plugin == bindparam("w_plugin"))
_JOB_FOR_UPDATE = select(jobs).where(jobs.c.id == bindparam("w_job_id")).with_for_update()
_JOB_UPDATE = update(jobs).where(jobs.c.id == bindparam("w_job_id"))
_EVENT_INSERT = insert(events).returning(events.c.id)


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ts(text: str | None) -> datetime:
    if text:
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        except ValueError:
            pass
    return utcnow()


def event_text(data: dict[str, Any], cursor: int | None = None) -> str:
    """The one JSON text of a stored event: ``type``, ``job_id``, ``seq`` (and on the all-jobs
    stream ``cursor``) first, no spaces."""
    head = {"type": data["type"], "job_id": data["job_id"], "seq": data["seq"]}
    if cursor is not None:
        head["cursor"] = cursor
    rest = {k: v for k, v in data.items() if k not in head}
    return json.dumps({**head, **rest}, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class StoredEvent:
    cursor: int
    job_id: str
    seq: int
    type: str
    payload: str
    terminal: bool

    def with_cursor(self) -> str:
        """The event's text with its global ``cursor`` (the all-jobs stream's position)."""
        return event_text(json.loads(self.payload), self.cursor)


class Conflict(Exception):
    """A write that contradicts what is stored (duplicate template, job id reused with another body)."""


class Store:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self._write_lock = threading.RLock()
        from forgeflow.api.store.batches import BatchRepo

        self.batches = BatchRepo(self)

    def migrate(self) -> None:
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    # --- meta ----------------------------------------------------------------------------------
    def meta_value(self, key: str, factory: Callable[[], str]) -> str:
        """The stored value of ``key``, created by ``factory`` the first time."""
        with self._write_lock, self.engine.begin() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()
            if value is None:
                value = factory()
                conn.execute(insert(meta).values(key=key, value=value))
            return value

    # --- jobs ----------------------------------------------------------------------------------
    def create_job(
        self,
        *,
        job_id: str,
        pipeline: dict[str, Any],
        input_data: dict[str, Any],
        request_hash: str,
        source: str,
        template_id: str | None,
        created_by: str | None = None,
        retry_of: str | None = None,
        batch_id: str | None = None,
        work_key: str | None = None,
        reuse: bool = False,
        publish: Callable[[list[StoredEvent]], None] | None = None,
    ) -> tuple[JobRow, bool]:
        """Insert a queued job and its first message; an existing id with the same body is returned as is.

        With ``reuse`` and a ``work_key`` that an earlier job computed successfully, the job takes
        that job's result instead: it is stored ``succeeded`` at once with ``reused_from`` naming the
        job that did the work (its outputs and artifacts are that job's), and nothing is launched.

        Raises :class:`Conflict` when the id exists with a different body.
        """
        with self._write_lock:
            now = utcnow()
            done = self.done_work(work_key) if reuse and work_key else None
            try:
                with self.engine.begin() as conn:
                    # No read first: the insert itself finds an id in use (IntegrityError, below).
                    conn.execute(
                        insert(jobs).values(
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
                            stages_total=len(pipeline.get("stages", [])),
                            stages_completed=0,
                            created_by=created_by,
                            retry_of=retry_of,
                            batch_id=batch_id,
                            work_key=work_key,
                            reused_from=(done["reused_from"] or done["id"]) if done else None,
                        )
                    )
                    if done is None:
                        stored = [self._insert_first_event(conn, job_id, now)]
                    else:  # reused work: queued, then succeeded with the earlier job's envelope
                        reused = JobStatusEvent(job_id=job_id, status="succeeded", envelope=done["envelope"])
                        stored = self._ingest(conn, [JobStatusEvent(job_id=job_id, status="queued"), reused])
                    row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
            except IntegrityError:
                # The id is taken (a repeated submission, or another API process created it first).
                existing = self.get_job(job_id)
                if existing is None:
                    raise
                if existing["request_hash"] != request_hash:
                    raise Conflict(f"job {job_id!r} already exists with a different request") from None
                return existing, False
            if publish:
                publish(stored)
        assert row is not None
        return job_row(row), True

    @staticmethod
    def _insert_first_event(conn: Connection, job_id: str, now: datetime) -> StoredEvent:
        """A new job's first message (``job_status`` queued, seq 1), written as :meth:`_ingest` would
        write it, without the reads that an event of an existing job needs."""
        event = JobStatusEvent(job_id=job_id, status="queued")
        data = event.summarized().model_dump(mode="json")
        data["seq"] = 1
        text = event_text(data)
        cursor = conn.execute(
            insert(events)
            .values(job_id=job_id, seq=1, event_id=event.event_id, type=event.type, payload=text, received_at=now)
            .returning(events.c.id)
        ).scalar_one()
        return StoredEvent(cursor, job_id, 1, event.type, text, False)

    def done_work(self, work_key: str) -> JobRow | None:
        """The first job that computed ``work_key`` and succeeded (None: this work was never done)."""
        query = (
            select(jobs)
            .where(jobs.c.work_key == work_key, jobs.c.status == "succeeded")
            .order_by(jobs.c.finished_at, jobs.c.id)
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return job_row(row) if row else None

    def get_job(self, job_id: str) -> JobRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        return job_row(row) if row else None

    def list_jobs(
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
        with self.engine.connect() as conn:
            rows = [job_row(r) for r in conn.execute(query).mappings()]
            total = conn.execute(count).scalar() or 0
        return rows, total

    def stage_rows(self, job_id: str) -> list[StageRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(stage_runs).where(stage_runs.c.job_id == job_id).order_by(stage_runs.c.stage_index)
            ).mappings()
            return [stage_row(r) for r in rows]

    def events_after(self, job_id: str, after_seq: int, limit: int = 1000) -> list[StoredEvent]:
        after_seq = min(after_seq, MAX_COUNT)  # a seq is a 32-bit column: nothing follows a larger one
        query = (
            select(events.c.id, events.c.job_id, events.c.seq, events.c.type, events.c.payload)
            .where(events.c.job_id == job_id, events.c.seq > after_seq)
            .order_by(events.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_stored(r) for r in conn.execute(query)]

    def events_after_cursor(self, after_cursor: int, limit: int = 1000) -> list[StoredEvent]:
        query = (
            select(events.c.id, events.c.job_id, events.c.seq, events.c.type, events.c.payload)
            .where(events.c.id > after_cursor)
            .order_by(events.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_stored(r) for r in conn.execute(query)]

    def max_cursor(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(events.c.id))).scalar() or 0

    def event_dicts(self, job_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(events.c.payload).where(events.c.job_id == job_id).order_by(events.c.seq))
            return [json.loads(r[0]) for r in rows]

    def has_terminal(self, job_id: str) -> bool:
        job = self.get_job(job_id)
        return bool(job and job["status"] in TERMINAL_STATUSES)

    # --- launcher bookkeeping --------------------------------------------------------------------
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
        with self.engine.connect() as conn:
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
                        .where(
                            jobs.c.batch_id.in_(batch_ids),
                            jobs.c.launched_at.is_not(None),
                            jobs.c.status.not_in(list(TERMINAL_STATUSES)),
                        )
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
        query = select(jobs).where(jobs.c.launched_at.is_not(None), jobs.c.status.not_in(list(TERMINAL_STATUSES)))
        with self.engine.connect() as conn:
            return [job_row(r) for r in conn.execute(query).mappings()]

    def set_launched(
        self, job_id: str, pid: int | None, create_time: float | None, *, flow_run_id: str | None = None
    ) -> None:
        """The job runs: as process ``pid`` on this host, or (deployment mode) as flow run ``flow_run_id``."""
        now = utcnow()
        values: dict[str, Any] = {"pid": pid, "pid_create_time": create_time, "launched_at": now, "updated_at": now}
        if flow_run_id is not None:
            values["flow_run_id"] = flow_run_id
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))

    def heard_from(self, job_ids: Iterable[str]) -> None:
        """The hosts of these jobs said they still run them (a heartbeat)."""
        ids = sorted(set(job_ids))
        now = utcnow()
        with self._write_lock, self.engine.begin() as conn:
            for i in range(0, len(ids), 500):
                conn.execute(update(jobs).where(jobs.c.id.in_(ids[i : i + 500])).values(heartbeat_at=now))

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
        with self.engine.connect() as conn:
            return [job_row(r) for r in conn.execute(query).mappings()]

    def claim_launch(self, job_id: str) -> bool:
        """Mark a queued job as being launched; False when another launcher (or a cancel) got there first."""
        now = utcnow()
        with self._write_lock, self.engine.begin() as conn:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.launched_at.is_(None), jobs.c.status == "queued")
                .values(launched_at=now, updated_at=now)
            )
            return result.rowcount == 1

    def set_exit_code(self, job_id: str, code: int | None) -> None:
        with self._write_lock, self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(exit_code=code, updated_at=utcnow()))

    def set_cancel_requested(self, job_id: str, by: str | None = None) -> None:
        """Mark the job cancelled on request, and by whom (the first request counts)."""
        with self._write_lock, self.engine.begin() as conn:
            first = conn.execute(select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar() is False
            values: dict[str, Any] = {"cancel_requested": True, "updated_at": utcnow()}
            if first:
                values["cancelled_by"] = by
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
            if first:
                self._audit(conn, by, "job.cancel", job_id)

    # --- audit -----------------------------------------------------------------------------------
    @staticmethod
    def _audit(conn: Connection, actor: str | None, action: str, target: str) -> None:
        conn.execute(insert(audit).values(at=utcnow(), actor=actor, action=action, target=target))

    def audit_entries(self, limit: int, offset: int = 0) -> tuple[list[AuditRow], int]:
        """Cancels and deletes, newest first, with the total count."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(audit).order_by(audit.c.id.desc()).limit(limit).offset(offset)).mappings()
            items = [audit_row(r) for r in rows]
            total = conn.execute(select(func.count()).select_from(audit)).scalar() or 0
        return items, int(total)

    # --- ingest --------------------------------------------------------------------------------
    def ingest(
        self,
        batch: Iterable[Event],
        *,
        publish: Callable[[list[StoredEvent]], None] | None = None,
        resolve_plugin: Callable[[str], str] | None = None,
    ) -> list[StoredEvent]:
        """Store new events (duplicates by ``event_id`` are skipped), then publish them in order."""
        batch = list(batch)
        if not batch:
            return []
        with self._write_lock:
            with self.engine.begin() as conn:
                stored = self._ingest(conn, batch, resolve_plugin)
            if publish and stored:
                publish(stored)
        return stored

    def _ingest(
        self, conn: Connection, batch: list[Event], resolve_plugin: Callable[[str], str] | None = None
    ) -> list[StoredEvent]:
        ids = list({e.event_id for e in batch})
        existing: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            existing.update(conn.execute(select(events.c.event_id).where(events.c.event_id.in_(chunk))).scalars())
        job_rows: dict[str, dict[str, Any]] = {}
        job_changes: dict[str, dict[str, Any]] = {}
        stored: list[StoredEvent] = []
        now = utcnow()
        for event in batch:
            if event.event_id in existing:
                continue
            existing.add(event.event_id)
            job = job_rows.get(event.job_id)
            if job is None:
                row = conn.execute(_JOB_FOR_UPDATE, {"w_job_id": event.job_id}).mappings().first()
                if row is None:
                    # Events of a job this service did not submit (a flow run started elsewhere).
                    conn.execute(
                        insert(jobs),
                        {
                            "id": event.job_id,
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
                    row = conn.execute(_JOB_FOR_UPDATE, {"w_job_id": event.job_id}).mappings().first()
                assert row is not None
                job = dict(row)
                job_rows[event.job_id] = job
                job_changes[event.job_id] = {}
            seq = job["last_seq"] + 1
            job["last_seq"] = seq
            # Stored and sent as a summary: the whole envelope is stored once, in the job's row.
            shown = event.summarized() if isinstance(event, JobStatusEvent) else event
            data = shown.model_dump(mode="json")
            data["seq"] = seq
            text = event_text(data)
            cursor = conn.execute(
                _EVENT_INSERT,
                {
                    "job_id": event.job_id,
                    "seq": seq,
                    "event_id": event.event_id,
                    "type": event.type,
                    "payload": text,
                    "received_at": now,
                },
            ).scalar_one()
            changes = job_changes[event.job_id]
            changes["last_seq"] = seq
            self._apply(conn, job, changes, event, resolve_plugin)
            terminal = is_terminal_event(event)
            stored.append(StoredEvent(cursor, event.job_id, seq, event.type, text, terminal))
        for job_id, changes in job_changes.items():
            if changes:
                changes["updated_at"] = now
                conn.execute(_JOB_UPDATE, {"w_job_id": job_id, **changes})
        return stored

    def _apply(
        self,
        conn: Connection,
        job: dict[str, Any],
        changes: dict[str, Any],
        event: Event,
        resolve_plugin: Callable[[str], str] | None,
    ) -> None:
        """Derive the job row, its stage rows and plugin observations from one new event."""
        ended = is_terminal(job["status"])
        match event:
            case JobStatusEvent():
                self._apply_status(conn, job, changes, event, ended)
            case PipelineProgress():
                changes["stages_total"] = job["stages_total"] = max(event.stages_total, 0)
                changes["stages_completed"] = job["stages_completed"] = event.stages_completed
            case StageStart():
                if job["status"] == "queued":
                    job["status"] = changes["status"] = "running"
                    job["started_at"] = changes["started_at"] = parse_ts(event.timestamp)
                self._upsert_stage(
                    conn,
                    job["id"],
                    event.stage_index,
                    plugin=event.plugin,
                    tool=event.tool,
                    status="running",
                    attempt=event.attempt,
                    started_at=event.timestamp,
                    ended_at=None,
                    duration_ms=None,
                    error=None,
                    error_type=None,
                    progress=None,
                )
                self._observe(conn, event.plugin, resolve_plugin, "RUNNING", ts=event.timestamp)
            case StageEnd():
                self._upsert_stage(
                    conn,
                    job["id"],
                    event.stage_index,
                    plugin=event.plugin,
                    tool=event.tool,
                    status="completed" if event.ok else "failed",
                    ended_at=event.timestamp,
                    duration_ms=event.duration_ms,
                    result_size_bytes=event.result_size_bytes,
                    peak_memory_mb=event.peak_memory_mb,
                )
                if event.ok:
                    self._observe(
                        conn,
                        event.plugin,
                        resolve_plugin,
                        "INITIALIZED",
                        ts=event.timestamp,
                        calls=1,
                        duration_ms=event.duration_ms,
                    )
                elif not job.get("cancel_requested"):
                    # Whether the plugin failed is the stage's pipeline_error's to say (a tool refusing
                    # its input does not make the plugin FAILED): when it came first, say it now; else
                    # count the call and leave the state to it.
                    error, error_type = self._stage_error(conn, job["id"], event.stage_index)
                    faulty = error_type is not None and error_type not in NOT_THE_PLUGINS_DOING
                    self._observe(
                        conn,
                        event.plugin,
                        resolve_plugin,
                        None if error_type is None else "FAILED" if faulty else "INITIALIZED",
                        ts=event.timestamp,
                        calls=1,
                        failures=1 if faulty else 0,
                        duration_ms=event.duration_ms,
                        error=error,
                        error_type=error_type,
                    )
            case StageProgress():
                if not ended:
                    progress = event.model_dump(mode="json", include={"done", "total", "fraction", "message"})
                    progress.update(event.model_dump(mode="json", include={"rate", "eta_s"}, exclude_none=True))
                    self._upsert_stage(conn, job["id"], event.stage_index, plugin=event.plugin, progress=progress)
            case PipelineError():
                if not ended:
                    changes["error"], changes["error_type"] = event.error, event.error_type
                self._upsert_stage(
                    conn,
                    job["id"],
                    event.stage_index,
                    plugin=event.plugin or "",
                    tool=event.tool or "",
                    status="failed",
                    error=event.error,
                    error_type=event.error_type,
                )
                if event.plugin and (event.error_type in NOT_THE_PLUGINS_DOING or job.get("cancel_requested")):
                    # Not the plugin's doing: it is no longer running, and nothing failed in it.
                    self._observe(conn, event.plugin, resolve_plugin, "INITIALIZED", ts=event.timestamp)
                elif event.plugin:
                    self._observe(
                        conn,
                        event.plugin,
                        resolve_plugin,
                        "FAILED",
                        ts=event.timestamp,
                        # the failed call counts once: here when its stage end came first (not a crash)
                        failures=1 if self._stage_ended(conn, job["id"], event.stage_index) else 0,
                        error=event.error,
                        error_type=event.error_type,
                    )

    def _apply_status(
        self, conn: Connection, job: dict[str, Any], changes: dict[str, Any], event: JobStatusEvent, ended: bool
    ) -> None:
        """A ``job_status``: running starts the job; a terminal one stores the envelope and the stage reports.
        Nothing changes a job that has ended."""
        if event.flow_run_id and not job.get("flow_run_id"):
            job["flow_run_id"] = changes["flow_run_id"] = event.flow_run_id
        status = event.status
        if ended or status == "queued":
            return
        if status == "running":
            if job["source"] == "external" and event.pipeline is not None and not job["pipeline"].get("stages"):
                # A flow run this service did not start (the Prefect UI, a schedule): its job gets
                # the pipeline and input the run carries, as if it had been submitted here.
                job["pipeline"] = changes["pipeline"] = event.pipeline
                changes["input"] = event.input or {}
                changes["stages_total"] = job["stages_total"] = len(event.pipeline.get("stages") or [])
            job["status"] = changes["status"] = "running"
            if job.get("started_at") is None:
                job["started_at"] = changes["started_at"] = parse_ts(event.timestamp)
            return
        envelope = event.envelope or {}
        job["status"] = changes["status"] = status
        changes["finished_at"] = parse_ts(event.timestamp)
        changes["envelope"] = envelope
        if job.get("started_at") is None and status != "cancelled":
            changes["started_at"] = job.get("created_at")
        if not envelope.get("ok", status == "succeeded"):
            changes["error"] = envelope.get("error") or job.get("error") or status
            changes["error_type"] = envelope.get("error_type") or job.get("error_type")
        if "stages_executed" in envelope:
            changes["stages_completed"] = max(int(envelope["stages_executed"] or 0), job["stages_completed"])
        for report in envelope.get("stages") or []:
            self._stage_report(conn, job["id"], report)

    def _stage_report(self, conn: Connection, job_id: str, data: dict[str, Any]) -> None:
        report = StageReport.model_validate(data)  # the event's validation already checked its shape
        index = report.index
        values: dict[str, Any] = {"plugin": report.plugin, "tool": report.tool, "status": report.status}
        for key in ("duration_ms", "result_size_bytes", "peak_memory_mb", "error", "error_type"):
            if getattr(report, key) is not None:
                values[key] = getattr(report, key)
        current = conn.execute(
            select(stage_runs.c.status).where(stage_runs.c.job_id == job_id, stage_runs.c.stage_index == index)
        ).scalar()
        if current == "completed":
            values.pop("status", None)  # what a stage_end said stands
        self._upsert_stage(conn, job_id, index, **values)

    def _upsert_stage(self, conn: Connection, job_id: str, index: int | None, **values: Any) -> None:
        if index is None:
            return
        where = {"w_job_id": job_id, "w_index": index}
        exists = conn.execute(_STAGE_EXISTS, where).first() is not None
        if exists:
            values = {k: v for k, v in values.items() if not (k in ("plugin", "tool") and not v)}
            if values:
                conn.execute(_STAGE_UPDATE, {**where, **values})
        else:
            row = {"plugin": "", "tool": "", "status": "pending", "attempt": 1, **values}
            conn.execute(insert(stage_runs), {"job_id": job_id, "stage_index": index, **row})

    def _stage_error(self, conn: Connection, job_id: str, index: int | None) -> tuple[str | None, str | None]:
        if index is None:
            return None, None
        row = conn.execute(
            select(stage_runs.c.error, stage_runs.c.error_type).where(
                stage_runs.c.job_id == job_id, stage_runs.c.stage_index == index
            )
        ).first()
        return (row[0], row[1]) if row else (None, None)

    def _stage_ended(self, conn: Connection, job_id: str, index: int | None) -> bool:
        """Whether the stage's call ended (a ``pipeline_stage_end`` came for it)."""
        if index is None:
            return False
        ended_at = conn.execute(
            select(stage_runs.c.ended_at).where(stage_runs.c.job_id == job_id, stage_runs.c.stage_index == index)
        ).scalar()
        return ended_at is not None

    def _observe(
        self,
        conn: Connection,
        plugin: str | None,
        resolve_plugin: Callable[[str], str] | None,
        state: str | None,
        *,
        ts: str,
        calls: int = 0,
        failures: int = 0,
        duration_ms: float | None = None,
        error: str | None = None,
        error_type: str | None = None,
    ) -> None:
        if not plugin:
            return
        name = resolve_plugin(plugin) if resolve_plugin else plugin
        when = parse_ts(ts).timestamp()
        row = conn.execute(_OBSERVED_ROW, {"w_plugin": name}).mappings().first()
        if row is None:
            conn.execute(
                insert(plugin_observed),
                {
                    "plugin": name,
                    "state": state or "INITIALIZED",
                    "last_error": error,
                    "last_error_type": error_type,
                    "calls": calls,
                    "failures": failures,
                    "last_duration_ms": duration_ms,
                    "updated_at": when,
                },
            )
            return
        values: dict[str, Any] = {
            "calls": row["calls"] + calls,
            "failures": row["failures"] + failures,
        }
        if duration_ms is not None:
            values["last_duration_ms"] = duration_ms
        if state is not None and (when >= row["updated_at"] or state == "FAILED"):
            values["state"] = state
            values["updated_at"] = max(when, row["updated_at"])
            if state == "FAILED" and (error is not None or row["state"] != "FAILED"):
                values["last_error"] = error or row["last_error"]
                values["last_error_type"] = error_type or row["last_error_type"]
        conn.execute(_OBSERVED_UPDATE, {"w_plugin": name, **values})

    # --- templates -------------------------------------------------------------------------------
    def create_template(
        self, template_id: str, name: str, definition: dict[str, Any], created_by: str | None = None
    ) -> TemplateRow:
        now = utcnow()
        with self._write_lock:
            if self.get_template(template_id) is not None:
                raise Conflict(f"a pipeline with the id {template_id!r} already exists")
            try:
                with self.engine.begin() as conn:
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
        template = self.get_template(template_id)
        assert template is not None
        return template

    def update_template(self, template_id: str, name: str, definition: dict[str, Any]) -> TemplateRow | None:
        """Replace a template's name and definition (its id and runs stay); None when there is none."""
        with self._write_lock, self.engine.begin() as conn:
            changed = conn.execute(
                update(pipelines)
                .where(pipelines.c.id == template_id)
                .values(name=name, definition=definition, updated_at=utcnow())
            ).rowcount
        return self.get_template(template_id) if changed else None

    def get_template(self, template_id: str) -> TemplateRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(pipelines).where(pipelines.c.id == template_id)).mappings().first()
        return template_row(row) if row else None

    def list_templates(self) -> list[TemplateRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(pipelines).order_by(pipelines.c.created_at, pipelines.c.id)).mappings()
            return [template_row(r) for r in rows]

    def delete_template(self, template_id: str, by: str | None = None) -> bool:
        with self._write_lock, self.engine.begin() as conn:
            deleted = conn.execute(delete(pipelines).where(pipelines.c.id == template_id)).rowcount > 0
            if deleted:
                self._audit(conn, by, "template.delete", template_id)
            return deleted

    def template_stats(self, template_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
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
            per_stage = conn.execute(
                select(
                    stage_runs.c.stage_index,
                    func.count(),
                    func.sum(case((stage_runs.c.status == "completed", 1), else_=0)),
                    func.sum(case((stage_runs.c.status == "failed", 1), else_=0)),
                    func.avg(case((stage_runs.c.status == "completed", stage_runs.c.duration_ms), else_=None)),
                    func.min(case((stage_runs.c.status == "completed", stage_runs.c.duration_ms), else_=None)),
                    func.max(case((stage_runs.c.status == "completed", stage_runs.c.duration_ms), else_=None)),
                )
                .select_from(stage_runs.join(jobs, jobs.c.id == stage_runs.c.job_id))
                .where(jobs.c.template_id == template_id)
                .group_by(stage_runs.c.stage_index)
                .order_by(stage_runs.c.stage_index)
            ).all()
        finished = sum(counts.get(s, 0) for s in TERMINAL_STATUSES)
        durations = [
            (_aware(f) - _aware(s)).total_seconds() * 1000 for s, f in spans if s is not None and f is not None
        ]
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

    # --- plugins -------------------------------------------------------------------------------
    def observed_plugins(self) -> dict[str, PluginObservedRow]:
        with self.engine.connect() as conn:
            return {r["plugin"]: plugin_observed_row(r) for r in conn.execute(select(plugin_observed)).mappings()}


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _stored(row: Any) -> StoredEvent:
    cursor, job_id, seq, kind, payload = row
    terminal = kind == "job_status" and _is_terminal_payload(payload)
    return StoredEvent(cursor, job_id, seq, kind, payload, terminal)


def _is_terminal_payload(payload: str) -> bool:
    try:
        return json.loads(payload).get("status") in TERMINAL_STATUSES
    except ValueError:
        return False


def monotonic_ms() -> float:
    return time.monotonic() * 1000
