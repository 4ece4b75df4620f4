"""Checkpoints of calls, so a retried job resumes instead of starting over.

A call is named by its **key**: the SHA-256 of what it depends on (plugin and version, tool, config,
inputs — media by ref, earlier stages' outputs by their artifacts' refs; a local media file by its
path, size and modification time). Under ``<home>/checkpoints/<key>/``:

* ``done.json`` — the outputs of a call that completed (written by the stage loop). A job run with
  ``resume`` reuses them instead of calling the tool again: a job that failed at stage k, retried,
  re-runs from stage k with the earlier stages' outputs (artifacts included, by ref).
* ``<field>.jsonl`` — a journal of the chunks a call has written so far of its per-frame output
  ``field`` (written by :class:`forgeflow.plugins.frames.FrameWriter` as each chunk is stored). A
  *resumable* tool run with ``resume`` starts with those chunks and continues after the last one:
  a stage killed at 60% (engine or host lost) redoes at most one chunk. Chunks are content-addressed
  and cut at the same frames as in an uninterrupted run, so the result is byte-identical.

Checkpoints are only read when a job asks to resume (``"resume": true`` on the pipeline,
``POST /v1/jobs/{id}/retry``, ``forgeflow run --resume``, or a Prefect retry of the flow run); a job
that succeeds removes its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from pydantic import JsonValue

from forgeflow.canonical import JsonObject, canonical_json

__all__ = ["CHECKPOINTS_DIR", "Checkpoints", "call_key"]

CHECKPOINTS_DIR = "checkpoints"
#: A completed call's outputs larger than this (as JSON) are not kept: they are recomputed on a retry
#: (per-frame data is in artifacts, so a large inline output is a short video's: cheap to redo).
MAX_DONE_BYTES = 1024**2


def _local_file_stamp(value: JsonValue) -> JsonValue:
    """A local media path as (path, size, mtime): the same path with other bytes is another call."""
    if isinstance(value, str) and value.startswith("/") and len(value) < 4096:
        try:
            stat = os.stat(value)
        except OSError:
            return value
        return [value, stat.st_size, stat.st_mtime_ns]
    return value


def call_key(
    plugin: str, version: str, tool: str, config: Mapping[str, JsonValue], inputs: Mapping[str, JsonValue]
) -> str:
    """The key of a call: equal for calls that must give the same outputs."""
    stamped = {name: _local_file_stamp(value) for name, value in sorted(inputs.items())}
    text = canonical_json(["forgeflow.call/1", plugin, version, tool, config, stamped], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class Checkpoints:
    """The checkpoints folder of a host (``root`` None: none are kept)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root

    def _dir(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / key

    def journal(self, key: str | None, field: str) -> Path | None:
        """Where the chunks of ``field`` of call ``key`` are journalled (None: nowhere)."""
        if self.root is None or not key:
            return None
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in field)[:100]
        return self._dir(key) / f"{safe}.jsonl"

    def done(self, key: str) -> JsonObject | None:
        """The outputs of call ``key`` when it completed before (None otherwise)."""
        if self.root is None:
            return None
        try:
            data = json.loads((self._dir(key) / "done.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def mark_done(self, key: str, outputs: Mapping[str, JsonValue]) -> None:
        """Keep a completed call's outputs; never fails the job. Its journals stay: a stage that overlapped
        it may still be reading them (they go with the job's checkpoints when it succeeds)."""
        if self.root is None:
            return
        text = canonical_json(outputs)
        if len(text) > MAX_DONE_BYTES:
            return
        folder = self._dir(key)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".done-")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, folder / "done.json")
        except OSError:
            pass

    def forget(self, key: str) -> None:
        if self.root is not None:
            shutil.rmtree(self._dir(key), ignore_errors=True)
