"""The store's clock and its one text form of a time (UTC, milliseconds, ``Z``)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """A stored time as UTC (SQLite gives them back without a zone)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return aware(value).astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
