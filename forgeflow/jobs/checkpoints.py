"""A running job's checkpoint: the partial result it keeps on disk, read when it dies without a word."""

from __future__ import annotations

import json
from pathlib import Path

from forgeflow.canonical import JsonObject
from forgeflow.settings import Settings


def checkpoint_path(settings: Settings, job_id: str) -> Path:
    """Where a job's partial results are kept while it runs (read after a crash)."""
    return settings.jobs_dir / job_id / "checkpoint.json"


def read_checkpoint(settings: Settings, job_id: str) -> JsonObject:
    """The job's last checkpoint ({} when it wrote none, or it cannot be read)."""
    path = checkpoint_path(settings, job_id)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}
