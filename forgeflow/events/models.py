"""Realtime messages: the seed's four pipeline messages, in-stage progress, and job status messages.

Every message carries ``type``, ``job_id``, ``timestamp`` (ISO-8601 UTC, ``Z``), an ``event_id``
(UUID, so a retried delivery is stored once) and ``seq``, the per-job sequence number (1, 2, 3 …)
that the event store assigns when it stores the message, before anyone sees it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from forgeflow.pipeline.outcome import (
    RESULT_KEYS,
    JobStatus,
    ResultEnvelope,
    StageReport,
    envelope_summary,
    is_terminal,
)


def utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    seq: int | None = None
    timestamp: str = Field(default_factory=utc_timestamp)
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex)


class StageStart(_Event):
    type: Literal["pipeline_stage_start"] = "pipeline_stage_start"
    stage_index: int
    plugin: str
    tool: str
    attempt: int = 1


class StageEnd(_Event):
    type: Literal["pipeline_stage_end"] = "pipeline_stage_end"
    stage_index: int
    plugin: str
    tool: str
    duration_ms: int
    ok: bool
    result_size_bytes: int
    peak_memory_mb: float | None = None


class PipelineError(_Event):
    type: Literal["pipeline_error"] = "pipeline_error"
    stage_index: int | None
    plugin: str | None
    tool: str | None = None
    error: str
    error_type: str


class StageProgress(_Event):
    """How far the running stage is, as its tool reported (``ctx.progress``); rate-limited."""

    type: Literal["pipeline_stage_progress"] = "pipeline_stage_progress"
    stage_index: int
    plugin: str
    tool: str
    done: float = Field(ge=0, description="Units done (frames, say).")
    total: float | None = Field(None, gt=0, description="Units in all; null when the tool does not know.")
    fraction: float | None = Field(None, ge=0, le=1, description="done / total; null when total is.")
    message: str | None = None


class PipelineProgress(_Event):
    type: Literal["pipeline_progress"] = "pipeline_progress"
    stages_total: int
    stages_completed: int
    percent: int


class JobStatusEvent(_Event):
    """The job's status changed. Terminal ones carry the result envelope: whole on its way to the
    store, as a summary (:meth:`summarized`) once stored and sent to clients."""

    type: Literal["job_status"] = "job_status"
    status: JobStatus
    flow_run_id: str | None = None
    envelope: dict[str, Any] | None = None
    waiting_for: str | None = Field(
        None, description="Why a running job is not progressing: it waits for a device slot."
    )

    def summarized(self) -> JobStatusEvent:
        """This message with its envelope's result and partial result replaced by their sizes."""
        if self.envelope is None or not any(k in self.envelope for k in RESULT_KEYS):
            return self
        return self.model_copy(update={"envelope": envelope_summary(self.envelope)})


Event = Annotated[
    StageStart | StageEnd | StageProgress | PipelineError | PipelineProgress | JobStatusEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(data: dict[str, Any]) -> Event:
    return EVENT_ADAPTER.validate_python(data)


def progress(job_id: str, completed: int, total: int) -> PipelineProgress:
    percent = round(100 * completed / total) if total else 100
    return PipelineProgress(job_id=job_id, stages_total=total, stages_completed=completed, percent=percent)


def abnormal_end(
    job_id: str,
    *,
    status: Literal["crashed", "cancelled"],
    envelope: ResultEnvelope,
    stage: StageReport | None,
    flow_run_id: str | None,
) -> list[PipelineError | JobStatusEvent]:
    """The messages that end a job the pipeline could not finish itself (crash, kill, cancel):
    a ``pipeline_error`` naming the stage that was running, then the terminal ``job_status`` with
    the envelope (built by :func:`forgeflow.pipeline.outcome.ended_abnormally`)."""
    return [
        PipelineError(
            job_id=job_id,
            stage_index=stage.index if stage else None,
            plugin=stage.plugin if stage else None,
            tool=stage.tool if stage else None,
            error=envelope.error or status,
            error_type=envelope.error_type or status,
        ),
        JobStatusEvent(job_id=job_id, status=status, flow_run_id=flow_run_id, envelope=envelope.to_dict()),
    ]


def is_terminal_event(event: BaseModel) -> bool:
    return isinstance(event, JobStatusEvent) and is_terminal(event.status)
