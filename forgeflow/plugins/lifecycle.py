"""Plugin lifecycle states, persisted so that every process sees the same picture.

``LOADED → INITIALIZED → RUNNING → INITIALIZED``; a failed call gives ``FAILED`` with the error
(the next successful call recovers it); a plugin that cannot load is ``UNAVAILABLE`` with the
reason. The state lives in a small SQLite file (WAL mode) in ``FORGEFLOW_HOME``: the runner in a
flow-run process writes it, the API and ``forgeflow plugins list`` read it. On machines that share
no disk with the API (Prefect workers elsewhere), the API also derives failures and recoveries
from the stage events it ingests, so its view stays right.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import asdict, replace
from enum import StrEnum
from pathlib import Path
from typing import TypedDict

from pydantic.dataclasses import dataclass


class LifecycleState(StrEnum):
    LOADED = "LOADED"
    INITIALIZED = "INITIALIZED"
    RUNNING = "RUNNING"
    FAILED = "FAILED"
    UNAVAILABLE = "UNAVAILABLE"


class SeenStatus(TypedDict):
    """A plugin's lifecycle as another source saw it (the API's observations from stage events:
    :data:`forgeflow.events.reduce.ObservedRow` is this type)."""

    state: str
    last_error: str | None
    last_error_type: str | None
    calls: int
    failures: int
    last_duration_ms: float | None
    updated_at: float


@dataclass
class PluginStatus:
    """A plugin's lifecycle as every process sees it (also the API's ``lifecycle`` schema)."""

    plugin: str
    state: LifecycleState
    last_error: str | None = None
    last_error_type: str | None = None
    calls: int = 0
    failures: int = 0
    last_duration_ms: float | None = None
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    def merged_with(self, seen: SeenStatus | None) -> PluginStatus:
        """This host's view merged with what another source saw (the API's observations from the stage
        events it ingests, workers on other machines): the newer state wins, counts take the larger.
        An UNAVAILABLE plugin stays so: it cannot load here, whatever ran elsewhere."""
        if seen is None or self.state == LifecycleState.UNAVAILABLE:
            return self
        merged = replace(
            self,
            calls=max(self.calls, int(seen["calls"] or 0)),
            failures=max(self.failures, int(seen["failures"] or 0)),
        )
        if (seen["updated_at"] or 0) > self.updated_at:
            merged = replace(
                merged,
                state=LifecycleState(seen["state"]),
                last_error=seen["last_error"],
                last_error_type=seen["last_error_type"],
                updated_at=float(seen["updated_at"]),
                last_duration_ms=seen["last_duration_ms"]
                if seen["last_duration_ms"] is not None
                else self.last_duration_ms,
            )
        return merged


_SCHEMA = """
CREATE TABLE IF NOT EXISTS plugin_state (
    plugin TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    last_error TEXT,
    last_error_type TEXT,
    calls INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    last_duration_ms REAL,
    updated_at REAL NOT NULL
)
"""


class LifecycleStore:
    """Reads and writes plugin states in one SQLite file, safe across processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA synchronous=NORMAL")  # crash-safe in WAL mode, and no fsync per transition
        return conn

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        with self._lock, self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, params)
            conn.execute("COMMIT")

    def get(self, plugin: str) -> PluginStatus | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT plugin, state, last_error, last_error_type, calls, failures, last_duration_ms, updated_at"
                " FROM plugin_state WHERE plugin = ?",
                (plugin,),
            ).fetchone()
        if row is None:
            return None
        return PluginStatus(row[0], LifecycleState(row[1]), *row[2:])

    def all(self) -> dict[str, PluginStatus]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT plugin, state, last_error, last_error_type, calls, failures, last_duration_ms, updated_at"
                " FROM plugin_state"
            ).fetchall()
        return {r[0]: PluginStatus(r[0], LifecycleState(r[1]), *r[2:]) for r in rows}

    def loaded(self, plugin: str, unavailable_reason: str | None = None) -> None:
        """Record discovery: UNAVAILABLE with the reason, or LOADED unless it already has a state."""
        now = time.time()
        if unavailable_reason:
            self._write(
                "INSERT INTO plugin_state (plugin, state, last_error, last_error_type, updated_at)"
                " VALUES (?, 'UNAVAILABLE', ?, 'PluginUnavailable', ?)"
                " ON CONFLICT(plugin) DO UPDATE SET state='UNAVAILABLE', last_error=excluded.last_error,"
                " last_error_type='PluginUnavailable', updated_at=excluded.updated_at",
                (plugin, unavailable_reason, now),
            )
        else:
            self._write(
                "INSERT INTO plugin_state (plugin, state, updated_at) VALUES (?, 'LOADED', ?)"
                " ON CONFLICT(plugin) DO UPDATE SET state='LOADED', last_error=NULL, last_error_type=NULL,"
                " updated_at=excluded.updated_at WHERE plugin_state.state = 'UNAVAILABLE'",
                (plugin, now),
            )

    def initialized(self, plugin: str) -> None:
        """A worker imported the plugin and is ready; a FAILED plugin keeps its state until a call succeeds."""
        self._write(
            "INSERT INTO plugin_state (plugin, state, updated_at) VALUES (?, 'INITIALIZED', ?)"
            " ON CONFLICT(plugin) DO UPDATE SET state='INITIALIZED', updated_at=excluded.updated_at"
            " WHERE plugin_state.state IN ('LOADED', 'UNAVAILABLE')",
            (plugin, time.time()),
        )

    def running(self, plugin: str) -> None:
        self._write(
            "INSERT INTO plugin_state (plugin, state, updated_at) VALUES (?, 'RUNNING', ?)"
            " ON CONFLICT(plugin) DO UPDATE SET state='RUNNING', updated_at=excluded.updated_at",
            (plugin, time.time()),
        )

    def succeeded(self, plugin: str, duration_ms: float) -> None:
        self._write(
            "INSERT INTO plugin_state (plugin, state, calls, last_duration_ms, updated_at)"
            " VALUES (?, 'INITIALIZED', 1, ?, ?)"
            " ON CONFLICT(plugin) DO UPDATE SET state='INITIALIZED', calls=calls+1,"
            " last_duration_ms=excluded.last_duration_ms, updated_at=excluded.updated_at",
            (plugin, duration_ms, time.time()),
        )

    def ended_without_fault(self, plugin: str, duration_ms: float) -> None:
        """A call ended in a way that says nothing about the plugin's health (cancelled, or the tool
        refused the caller's input): INITIALIZED again, the call counted, no failure, the last error
        kept — what a success records."""
        self.succeeded(plugin, duration_ms)

    def failed(self, plugin: str, error: str, error_type: str, duration_ms: float | None) -> None:
        self._write(
            "INSERT INTO plugin_state (plugin, state, last_error, last_error_type, calls, failures,"
            " last_duration_ms, updated_at) VALUES (?, 'FAILED', ?, ?, 1, 1, ?, ?)"
            " ON CONFLICT(plugin) DO UPDATE SET state='FAILED', last_error=excluded.last_error,"
            " last_error_type=excluded.last_error_type, calls=calls+1, failures=failures+1,"
            " last_duration_ms=excluded.last_duration_ms, updated_at=excluded.updated_at",
            (plugin, error, error_type, duration_ms, time.time()),
        )
