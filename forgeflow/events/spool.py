"""The spool: events that could not be delivered yet, kept on disk in ``FORGEFLOW_HOME/spool``.

One format, one reader. A writer appends JSON lines to ``<pid>-<hex>.jsonl``; whoever delivers a
file first renames it to ``….jsonl.claimed-<pid>`` (a rename is atomic, so a file has one deliverer);
a claim whose process died may be taken over. A torn last line (a crash mid-write) is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import JsonValue

from forgeflow.canonical import JsonObject
from forgeflow.processes import pid_alive

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d+)-[0-9a-f]+\.jsonl(?:\.claimed-(\d+))?$")


def new_spool_path(spool_dir: Path) -> Path:
    """A fresh spool file of this process."""
    return spool_dir / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"


def append_events(path: Path, batch: Iterable[Mapping[str, JsonValue]]) -> None:
    """Append events durably (fsync) to a spool file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(event) + "\n" for event in batch)
        fh.flush()
        os.fsync(fh.fileno())


def read_events(path: Path) -> list[JsonObject]:
    """The events of one spool file; a torn last line is skipped."""
    if not path.exists():
        return []
    events: list[JsonObject] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a torn line in %s", path)
    return events


@dataclass(frozen=True)
class SpoolFile:
    path: Path
    writer: int
    claimer: int | None

    @property
    def unclaimed_path(self) -> Path:
        return self.path.with_name(self.path.name.split(".claimed-")[0])


def spool_files(spool_dir: Path) -> list[SpoolFile]:
    """Every spool file, oldest first."""
    if not spool_dir.is_dir():
        return []
    found = []
    for path in spool_dir.iterdir():
        match = _NAME.match(path.name)
        if match:
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            found.append((mtime, SpoolFile(path, int(match.group(1)), int(match.group(2)) if match.group(2) else None)))
    return [f for _, f in sorted(found, key=lambda item: item[0])]


def claim(file: SpoolFile, *, skip_live_writers: bool = True) -> Path | None:
    """Take ``file`` for delivery by this process: the claimed path, or None when another live process
    delivers it (its claimer, or with ``skip_live_writers`` its writer)."""
    me = os.getpid()
    if file.claimer is not None and file.claimer != me and pid_alive(file.claimer):
        return None
    if file.claimer is None and skip_live_writers and file.writer != me and pid_alive(file.writer):
        return None
    if file.claimer == me:
        return file.path
    claimed = file.unclaimed_path.with_name(file.unclaimed_path.name + f".claimed-{me}")
    try:
        file.path.rename(claimed)
    except OSError:
        return None
    return claimed


def release(claimed: Path) -> None:
    """Give a claimed file back (its delivery failed), for a later attempt."""
    try:
        claimed.rename(claimed.with_name(claimed.name.split(".claimed-")[0]))
    except OSError:
        pass
