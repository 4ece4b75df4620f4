"""The audit log (who cancelled or deleted what, when) and the service's stored settings (``meta``)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, func, insert, select

from forgeflow.api.store.db import Database
from forgeflow.api.store.rows import AuditRow, audit_row
from forgeflow.api.store.tables import audit, meta
from forgeflow.api.store.times import utcnow


def record_audit(conn: Connection, actor: str | None, action: str, target: str) -> None:
    """Log ``action`` on ``target`` by ``actor``, in the transaction of the write it records."""
    conn.execute(insert(audit).values(at=utcnow(), actor=actor, action=action, target=target))


class AuditLog:
    """Reading the audit log, and the ``meta`` key/values (the ingest token, say)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def entries(self, limit: int, offset: int = 0) -> tuple[list[AuditRow], int]:
        """Cancels and deletes, newest first, with the total count."""
        with self.db.reading() as conn:
            rows = conn.execute(select(audit).order_by(audit.c.id.desc()).limit(limit).offset(offset)).mappings()
            items = [audit_row(r) for r in rows]
            total = conn.execute(select(func.count()).select_from(audit)).scalar() or 0
        return items, int(total)

    def meta_value(self, key: str, factory: Callable[[], str]) -> str:
        """The stored value of ``key``, created by ``factory`` the first time."""
        with self.db.writing() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()
            if value is None:
                value = factory()
                conn.execute(insert(meta).values(key=key, value=value))
            return value
