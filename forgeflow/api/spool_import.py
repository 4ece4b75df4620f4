"""Spooled events into the store: what a job host could not deliver to the API (it was down) and
wrote to the spool folder instead, imported once its writer is gone (at start-up and before a crash
is reconciled, so a job's last messages are not taken for lost)."""

from __future__ import annotations

import logging
from pathlib import Path

from forgeflow.api.deps import ApiState
from forgeflow.events import spool
from forgeflow.events.models import Event, parse_event

log = logging.getLogger("forgeflow.api.launcher")

__all__ = ["import_spool"]


def import_spool(state: ApiState, *, skip_live_writers: bool = True) -> int:
    """Store the events of spool files whose writer is gone, deleting each file once stored."""
    stored = 0
    for file in spool.spool_files(state.settings.spool_dir):
        claimed = spool.claim(file, skip_live_writers=skip_live_writers)
        if claimed is not None:
            stored += _import_file(state, claimed)
    return stored


def _import_file(state: ApiState, path: Path) -> int:
    good: list[Event] = []
    bad: list[str] = []
    for data in spool.read_events(path):
        try:
            good.append(parse_event(data))
        except Exception as exc:
            bad.append(f"{exc}: {data!r}"[:2000])
    stored = 0
    for i in range(0, len(good), 200):
        stored += len(state.store.ingest(good[i : i + 200], publish=state.publish, resolve_plugin=state.resolve_plugin))
    if bad:
        log.error("spool file %s had %d unreadable events; kept in %s.bad", path.name, len(bad), path.name)
        path.with_name(path.name + ".bad").write_text("\n".join(bad), encoding="utf-8")
    path.unlink(missing_ok=True)
    return stored
