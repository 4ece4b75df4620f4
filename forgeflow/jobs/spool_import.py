"""Spooled events into the store: what a job host could not deliver to the API (it was down) and
wrote to the spool folder instead, imported once its writer is gone (at start-up and before a crash
is reconciled, so a job's last messages are not taken for lost)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from forgeflow.events import spool
from forgeflow.events.models import Event, parse_event

log = logging.getLogger("forgeflow.jobs.launcher")

__all__ = ["import_spool"]


def import_spool(spool_dir: Path, record: Callable[[list[Event]], int], *, skip_live_writers: bool = True) -> int:
    """Store (``record``) the events of the spool files in ``spool_dir`` whose writer is gone,
    deleting each file once stored; how many events were new."""
    stored = 0
    for file in spool.spool_files(spool_dir):
        claimed = spool.claim(file, skip_live_writers=skip_live_writers)
        if claimed is not None:
            stored += _import_file(record, claimed)
    return stored


def _import_file(record: Callable[[list[Event]], int], path: Path) -> int:
    good: list[Event] = []
    bad: list[str] = []
    for data in spool.read_events(path):
        try:
            good.append(parse_event(data))
        except Exception as exc:
            bad.append(f"{exc}: {data!r}"[:2000])
    stored = 0
    for i in range(0, len(good), 200):
        stored += record(good[i : i + 200])
    if bad:
        log.error("spool file %s had %d unreadable events; kept in %s.bad", path.name, len(bad), path.name)
        path.with_name(path.name + ".bad").write_text("\n".join(bad), encoding="utf-8")
    path.unlink(missing_ok=True)
    return stored
