"""Request and response schemas of ``/v1/batches`` and the ``batch_progress`` stream message."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from forgeflow.api.models import MEDIA_REF_PATTERN, NO_NUL, RawPipeline, _RequestBody

BatchStatus = Literal["running", "succeeded", "failed", "cancelled"]
#: A file's status: its current job's, or ``failed`` when the file never became a job (not storable).
FileStatus = Literal["queued", "running", "succeeded", "failed", "crashed", "cancelled"]


class BatchMedia(BaseModel):
    """A stored media file of the batch and the name it goes by (its file name)."""

    ref: str = Field(pattern=MEDIA_REF_PATTERN, description="A media ref (`POST /v1/media` answers it).")
    name: str | None = Field(None, min_length=1, max_length=500, pattern=NO_NUL, description="Default: the ref.")


class BatchCreate(_RequestBody):
    """One pipeline (inline `pipeline` or saved template `pipeline_id`) over a set of files: a `folder`
    on the API's host (inside `FORGEFLOW_MEDIA_INPUT_ROOTS`) with a glob `pattern`, or stored `media`."""

    name: str | None = Field(None, min_length=1, max_length=200, pattern=NO_NUL, description="Default: the batch id.")
    pipeline: RawPipeline = None
    pipeline_id: str | None = Field(None, min_length=1, max_length=200, description="Id of a saved template.")
    folder: str | None = Field(None, min_length=1, max_length=4096, pattern=NO_NUL)
    pattern: str = Field("*", min_length=1, max_length=200, pattern=NO_NUL, description="Glob of file names.")
    media: list[str | BatchMedia] | None = Field(
        None, max_length=100_000, description="Media refs, or {ref, name} objects, instead of a folder."
    )
    input: dict[str, Any] = Field(
        default_factory=dict, description="More job input fields, the same for every file (`media` is the file's)."
    )
    max_concurrency: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Jobs of this batch that run at once (default FORGEFLOW_BATCH_MAX_CONCURRENCY).",
    )
    force: bool = Field(
        False,
        description="Compute every file again, even one whose work an earlier job did (same media content, "
        "pipeline and plugin versions). Default: such a file takes that job's result (`reused_from`).",
    )
    flow_run_id: str | None = Field(
        None,
        max_length=64,
        pattern=NO_NUL,
        description="The batch flow run that registers this batch (set by `forgeflow-batch`): registering again "
        "from the same flow run answers the batch it registered.",
    )


class BatchCounts(BaseModel):
    """Files per status (of the job that stands for each now), with ``reused``: succeeded files whose job
    took an earlier job's result."""

    total: int
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    crashed: int = 0
    cancelled: int = 0
    reused: int = 0
    done: int = Field(0, description="Files whose job ended (any terminal status).")


class BatchFile(BaseModel):
    position: int
    name: str
    media: str | None
    job_id: str | None
    status: FileStatus
    reused_from: str | None
    attempts: int = Field(description="Jobs the file took (a crashed job is retried, a batch retry adds one).")
    error: str | None
    error_type: str | None


class BatchSummaryItem(BaseModel):
    """A batch in a list."""

    batch_id: str
    name: str
    status: BatchStatus
    pipeline_id: str | None
    source: dict[str, Any]
    max_concurrency: int
    force: bool
    created_by: str | None
    flow_run_id: str | None
    cancel_requested: bool
    created_at: str
    updated_at: str
    finished_at: str | None
    files_total: int
    counts: BatchCounts
    links: dict[str, str]


class BatchView(BatchSummaryItem):
    """A batch in full: progress, rate, each file and its job."""

    pipeline: dict[str, Any]
    files_per_s: float | None = Field(description="Files ended per second since the batch started.")
    eta_s: float | None = Field(description="Seconds until every file ended, at that rate (null: unknown yet).")
    files: list[BatchFile]


class BatchList(BaseModel):
    items: list[BatchSummaryItem]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class BatchProgress(BaseModel):
    """The ``batch_progress`` message of ``WS /v1/ws/jobs`` (live only: no cursor, not replayed)."""

    type: Literal["batch_progress"] = "batch_progress"
    batch_id: str
    status: BatchStatus
    counts: BatchCounts
    files_per_s: float | None
    eta_s: float | None
    timestamp: str


class BatchRetried(BaseModel):
    batch_id: str
    status: BatchStatus
    retried: list[str] = Field(description="The names of the files that got a new job.")
