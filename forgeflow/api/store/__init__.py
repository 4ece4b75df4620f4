"""The API's persistent store: SQLAlchemy 2 tables, Alembic migrations, repositories behind :class:`Store`."""

from forgeflow.api.store.db import Conflict
from forgeflow.api.store.event_log import StoredEvent
from forgeflow.api.store.repo import Store
from forgeflow.api.store.times import iso, utcnow

__all__ = ["Conflict", "Store", "StoredEvent", "iso", "utcnow"]
