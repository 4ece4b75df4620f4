"""A job's stored events: their one JSON text, :class:`StoredEvent`, and reading them back.

Events are written by the ingestor (:mod:`forgeflow.api.store.ingest`) only; here they are read, by
job (``seq`` order) for a job's stream and by ``cursor`` (the events table's id) for the all-jobs one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import func, select

from forgeflow.api.store.db import Database
from forgeflow.api.store.tables import events
from forgeflow.canonical import MAX_COUNT, JsonObject
from forgeflow.pipeline.outcome import TERMINAL_STATUSES


def event_text(data: Mapping[str, object], cursor: int | None = None) -> str:
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


_STORED_COLUMNS = (events.c.id, events.c.job_id, events.c.seq, events.c.type, events.c.payload)


class EventLog:
    """Reading a job's stored events, or every job's after a cursor."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def after_seq(self, job_id: str, after_seq: int, limit: int = 1000) -> list[StoredEvent]:
        after_seq = min(after_seq, MAX_COUNT)  # a seq is a 32-bit column: nothing follows a larger one
        query = (
            select(*_STORED_COLUMNS)
            .where(events.c.job_id == job_id, events.c.seq > after_seq)
            .order_by(events.c.seq)
            .limit(limit)
        )
        with self.db.reading() as conn:
            return [_stored(*r) for r in conn.execute(query)]

    def after_cursor(self, after_cursor: int, limit: int = 1000) -> list[StoredEvent]:
        query = select(*_STORED_COLUMNS).where(events.c.id > after_cursor).order_by(events.c.id).limit(limit)
        with self.db.reading() as conn:
            return [_stored(*r) for r in conn.execute(query)]

    def max_cursor(self) -> int:
        with self.db.reading() as conn:
            return conn.execute(select(func.max(events.c.id))).scalar() or 0

    def dicts(self, job_id: str) -> list[JsonObject]:
        """The job's events as the JSON objects stored, in ``seq`` order."""
        with self.db.reading() as conn:
            rows = conn.execute(select(events.c.payload).where(events.c.job_id == job_id).order_by(events.c.seq))
            return [json.loads(r[0]) for r in rows]


def _stored(cursor: int, job_id: str, seq: int, kind: str, payload: str) -> StoredEvent:
    terminal = kind == "job_status" and _is_terminal_payload(payload)
    return StoredEvent(cursor, job_id, seq, kind, payload, terminal)


def _is_terminal_payload(payload: str) -> bool:
    try:
        return json.loads(payload).get("status") in TERMINAL_STATUSES
    except ValueError:
        return False
