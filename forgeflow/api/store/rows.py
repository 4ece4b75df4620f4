"""Typed rows of the store: what the repository returns, one TypedDict per table (see ``tables.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TypedDict, cast

from pydantic import JsonValue
from sqlalchemy import RowMapping

from forgeflow.canonical import JsonObject
from forgeflow.events.reduce import ObservedRow
from forgeflow.pipeline.outcome import JobStatus, StageStatus

#: A row as the database hands it back, or as a mapping of its columns.
StoredRow = RowMapping | Mapping[str, object]


class JobRow(TypedDict):
    id: str
    status: JobStatus
    source: str
    template_id: str | None
    pipeline: JsonObject
    input: JsonObject
    request_hash: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    flow_run_id: str | None
    pid: int | None
    pid_create_time: float | None
    launched_at: datetime | None
    heartbeat_at: datetime | None
    exit_code: int | None
    cancel_requested: bool
    envelope: JsonObject | None
    error: str | None
    error_type: str | None
    last_seq: int
    stages_total: int
    stages_completed: int
    created_by: str | None
    cancelled_by: str | None
    retry_of: str | None
    batch_id: str | None
    work_key: str | None
    reused_from: str | None


class BatchRow(TypedDict):
    id: str
    name: str
    status: str
    pipeline: JsonObject
    template_id: str | None
    source: JsonObject
    max_concurrency: int
    force: bool
    created_by: str | None
    flow_run_id: str | None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    files_total: int
    counts: dict[str, int]


class BatchFileRow(TypedDict):
    batch_id: str
    position: int
    name: str
    media: str | None
    job_id: str | None
    attempts: int
    error: str | None
    error_type: str | None


class StageRow(TypedDict):
    job_id: str
    stage_index: int
    plugin: str
    tool: str
    status: StageStatus
    attempt: int
    started_at: str | None
    ended_at: str | None
    duration_ms: float | None
    result_size_bytes: int | None
    peak_memory_mb: float | None
    error: str | None
    error_type: str | None
    progress: JsonObject | None


class TemplateRow(TypedDict):
    id: str
    name: str
    definition: JsonObject
    created_at: datetime
    updated_at: datetime
    created_by: str | None


class AuditRow(TypedDict):
    id: int
    at: datetime
    actor: str | None
    action: str
    target: str


class PluginObservedRow(ObservedRow):
    """A plugin's observed health (:class:`~forgeflow.events.reduce.ObservedRow`) with its name."""

    plugin: str


def job_row(row: StoredRow) -> JobRow:
    return cast(JobRow, dict(row))


def stage_row(row: StoredRow) -> StageRow:
    return cast(StageRow, dict(row))


def template_row(row: StoredRow) -> TemplateRow:
    return cast(TemplateRow, dict(row))


def plugin_observed_row(row: StoredRow) -> PluginObservedRow:
    return cast(PluginObservedRow, dict(row))


def audit_row(row: StoredRow) -> AuditRow:
    return cast(AuditRow, dict(row))


def batch_row(row: StoredRow) -> BatchRow:
    return cast(BatchRow, dict(row))


def batch_file_row(row: StoredRow) -> BatchFileRow:
    return cast(BatchFileRow, dict(row))


def pipeline_stages(pipeline: Mapping[str, JsonValue] | None) -> list[JsonObject]:
    """The stages of a stored pipeline definition (a job's or a batch's ``pipeline`` column), in order."""
    stages = (pipeline or {}).get("stages") or []
    return [stage for stage in stages if isinstance(stage, dict)] if isinstance(stages, list) else []
