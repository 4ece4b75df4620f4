"""The API's persistent store: SQLAlchemy 2 tables, Alembic migrations, repository functions."""

from forgeflow.api.store.repo import Conflict, Store, StoredEvent, iso, utcnow

__all__ = ["Conflict", "Store", "StoredEvent", "iso", "utcnow"]
