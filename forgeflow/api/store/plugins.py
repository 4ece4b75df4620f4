"""Plugins' health as the ingested stage events show it (``plugin_observed``): read by the plugin
routes, kept up to date by the ingestor through :class:`ObservedPlugins`."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, bindparam, insert, select, update

from forgeflow.api.store.db import Database
from forgeflow.api.store.rows import PluginObservedRow, plugin_observed_row
from forgeflow.api.store.tables import plugin_observed
from forgeflow.events.reduce import Observation, ObservedRow, observe

# Built once: each execution binds its values (see forgeflow.api.store.ingest).
_OBSERVED_ROW = select(plugin_observed).where(plugin_observed.c.plugin == bindparam("w_plugin"))
_OBSERVED_UPDATE = update(plugin_observed).where(plugin_observed.c.plugin == bindparam("w_plugin"))
_OBSERVED_INSERT = insert(plugin_observed)


class PluginObservations:
    """Reading the plugins' observed health."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def observed(self) -> dict[str, PluginObservedRow]:
        with self.db.reading() as conn:
            return {r["plugin"]: plugin_observed_row(r) for r in conn.execute(select(plugin_observed)).mappings()}


class ObservedPlugins:
    """The plugin rows one ingest transaction folds observations into: each read once, written at
    :meth:`flush` (inserted when new, else only the columns that changed)."""

    def __init__(self, conn: Connection, resolve_plugin: Callable[[str], str] | None) -> None:
        self.conn = conn
        self.resolve = resolve_plugin
        self.rows: dict[str, ObservedRow | None] = {}
        self.stored: dict[str, ObservedRow] = {}

    def add(self, seen: Observation) -> None:
        name = self.resolve(seen.plugin) if self.resolve else seen.plugin
        if name not in self.rows:
            found = self.conn.execute(_OBSERVED_ROW, {"w_plugin": name}).mappings().first()
            row: ObservedRow | None = None
            if found is not None:
                row = plugin_observed_row(found)  # an ObservedRow, with its name
                self.stored[name] = row
            self.rows[name] = row
        self.rows[name] = observe(self.rows[name], seen)

    def flush(self) -> None:
        for name, row in self.rows.items():
            if row is None:
                continue
            before = self.stored.get(name)
            if before is None:
                self.conn.execute(_OBSERVED_INSERT, {"plugin": name, **row})
                continue
            changed = {k: v for k, v in row.items() if before.get(k) != v}
            if changed:
                self.conn.execute(_OBSERVED_UPDATE, {"w_plugin": name, **changed})
        self.rows.clear()
        self.stored.clear()
