"""Request and response schemas of the REST API (they are also its OpenAPI documentation)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from forgeflow.canonical import MAX_AMOUNT, storable_issue
from forgeflow.engine.runners.base import Progress
from forgeflow.events.models import Event, Id
from forgeflow.pipeline.definition import RUNNER_DESCRIPTION, PipelineStage, RunnerKind
from forgeflow.pipeline.outcome import JobStatus, StageReport
from forgeflow.plugins.lifecycle import PluginStatus

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
#: The largest offset, seq or cursor a request may give (2^53 - 1: exact in every JSON client, and in
#: range of a 64-bit database integer).
MAX_POSITION = MAX_AMOUNT
MEDIA_REF_PATTERN = r"^sha256:[0-9a-f]{64}$"
#: An id in a path or query: no U+0000 (no stored id has one; PostgreSQL is never asked).
NO_NUL = r"^[^\x00]*$"


class _RequestBody(BaseModel):
    """A request body whose every field every store can hold (:func:`~forgeflow.canonical.storable_issue`:
    finite numbers, at most 100 levels deep, no U+0000), else a 422 naming the field."""

    @field_validator("*")
    @classmethod
    def _storable_field(cls, value: Any) -> Any:
        found = storable_issue(value)
        if found is not None:
            # ``path`` (inside the field) lets the error name ``pipeline.0.config.confidence``, not ``pipeline``
            path, problem = found
            raise PydanticCustomError("storable", problem, {"path": path} if path else None)
        return value


_STAGE_SCHEMA = PipelineStage.model_json_schema()
_STAGES_SCHEMA = {"type": "array", "items": _STAGE_SCHEMA, "minItems": 1}
_PIPELINE_SCHEMA = {
    "anyOf": [
        {**_STAGES_SCHEMA, "title": "Stages (the seed's form)"},
        {
            "type": "object",
            "title": "Pipeline definition",
            "properties": {
                "stages": _STAGES_SCHEMA,
                "timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "default": 300.0},
                "description": {"type": "string", "maxLength": 10_000, "default": ""},
            },
            "required": ["stages"],
            "additionalProperties": False,
        },
        {"type": "null"},
    ],
    "description": "The stages in order: a list (the seed's form) or a definition object with `stages`.",
}

RawPipeline = Annotated[list[Any] | dict[str, Any] | None, WithJsonSchema(_PIPELINE_SCHEMA)]
RawStages = Annotated[
    list[Any] | None,
    WithJsonSchema({"anyOf": [_STAGES_SCHEMA, {"type": "null"}], "description": "The stages, in order."}),
]


def _absent(*names: str) -> dict[str, Any]:
    """JSON Schema ``properties`` saying each of ``names`` is absent or null."""
    return {name: {"type": "null"} for name in names}


#: The forms of a job submission (``JobCreate``): exactly one of them.
_JOB_FORMS: list[Any] = [
    {
        "title": "Inline stages (a list)",
        "required": ["pipeline"],
        "properties": {"pipeline": {"type": "array"}, **_absent("pipeline_id", "plugin_id", "tool_name", "config")},
    },
    {
        "title": "Inline pipeline definition (an object: its own timeout_seconds and description)",
        "required": ["pipeline"],
        "properties": {
            "pipeline": {"type": "object"},
            **_absent("pipeline_id", "plugin_id", "tool_name", "config", "timeout_seconds", "description"),
        },
    },
    {
        "title": "Saved template (its own timeout)",
        "required": ["pipeline_id"],
        "properties": {
            "pipeline_id": {"type": "string"},
            **_absent("pipeline", "plugin_id", "tool_name", "config", "timeout_seconds", "description"),
        },
    },
    {
        "title": "Legacy single plugin",
        "required": ["plugin_id", "tool_name"],
        "properties": {
            "plugin_id": {"type": "string"},
            "tool_name": {"type": "string"},
            **_absent("pipeline", "pipeline_id"),
        },
    },
]

#: A template's stages: in ``stages`` or (the seed's name) in ``pipeline``, not both.
_TEMPLATE_FORMS: list[Any] = [
    {
        "title": "Stages in 'stages'",
        "required": ["stages"],
        "properties": {"stages": {"type": "array"}, **_absent("pipeline")},
    },
    {
        "title": "Stages in 'pipeline' (the seed's name)",
        "required": ["pipeline"],
        "properties": {"pipeline": {"type": "array"}, **_absent("stages")},
    },
]

SEED_JOB_EXAMPLE: dict[str, Any] = {
    "job_id": "job-123",
    "pipeline": [
        {
            "plugin": "forgesyte-yolo-tracker",
            "tool": "detect_players",
            "config": {"device": "cuda", "confidence": 0.25},
        },
        {"plugin": "pose-estimator", "tool": "estimate_poses", "config": {"model": "light"}},
        {"plugin": "classifier", "tool": "classify_actions", "config": {}},
    ],
    "input": {"media": "sha256:<hex of an uploaded clip>"},
}


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, in words.")
    error_type: str = Field(description="A stable name of the kind of error.")
    field: str | None = Field(None, description="The request field at fault, dotted (e.g. `pipeline.1.tool`).")
    issues: list[dict[str, Any]] | None = Field(None, description="Every problem found (validation errors).")
    missing_scope: str | None = Field(None, description="A 403's scope the token lacks (`read`, `run`, `admin`).")
    line: int | None = Field(None, description="A body that is not JSON: the line of the first error (1-based).")
    column: int | None = Field(None, description="A body that is not JSON: the column of the first error (1-based).")


class JobCreate(_RequestBody):
    """One of three forms: an inline `pipeline`, a saved template's `pipeline_id`, or the legacy
    single-plugin `plugin_id` + `tool_name` (+ `config`), which runs as a one-stage pipeline."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": _JOB_FORMS,
            "examples": [
                SEED_JOB_EXAMPLE,
                {"pipeline_id": "soccer-analysis", "input": {"media": "sha256:<hex>"}},
                {
                    "plugin_id": "videotracker",
                    "tool_name": "detect_players",
                    "config": {},
                    "input": {"media": "sha256:<hex>"},
                },
            ],
        },
    )

    job_id: str | None = Field(
        None,
        pattern=JOB_ID_PATTERN,
        description="Client-chosen id; resubmitting the same body with it returns the same job (idempotent).",
    )
    pipeline: RawPipeline = None
    pipeline_id: str | None = Field(None, min_length=1, max_length=200, description="Id of a saved template.")
    plugin_id: str | None = Field(None, min_length=1, max_length=200, description="Legacy form: plugin name or alias.")
    tool_name: str | None = Field(None, min_length=1, max_length=200, description="Legacy form: tool name.")
    config: dict[str, Any] | None = Field(None, description="Legacy form: the tool's config.")
    input: dict[str, Any] = Field(default_factory=dict, description="Job input; its fields start the context.")
    timeout_seconds: float | None = Field(None, gt=0, description="Per-stage timeout (with the list form).")
    description: str | None = Field(None, max_length=10_000)
    reuse: bool = Field(
        False,
        description="Take the result of an earlier job that did the same work (same media content, stages, "
        "configs and plugin versions) and succeeded, instead of computing it: the job ends `succeeded` at once "
        "with `reused_from` naming that job. Off by default: a job computes.",
    )


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatus
    created: bool = Field(description="False when an earlier identical submission with this job_id exists.")
    pipeline_id: str | None = None
    created_by: str | None = Field(None, description="The name of the token that submitted it (null: no token).")
    retry_of: str | None = Field(None, description="The job this one retries (POST /v1/jobs/{id}/retry), if any.")
    reused_from: str | None = Field(None, description="With `reuse`: the earlier job whose result this job took.")
    links: dict[str, str]


class StageState(StageReport):
    """A stage of a stored job: its report, with when it ran and which attempt it is on."""

    attempt: int = 1
    started_at: str | None = None
    ended_at: str | None = None
    progress: Progress | None = Field(None, description="The stage's last in-stage progress report, if any.")


class JobView(BaseModel):
    job_id: str
    status: JobStatus
    source: Literal["inline", "template", "legacy", "external", "retry", "batch"]
    pipeline_id: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    updated_at: str
    flow_run_id: str | None
    cancel_requested: bool
    cancelled_by: str | None = Field(None, description="The name of the token that asked to cancel it.")
    created_by: str | None = Field(None, description="The name of the token that submitted it (null: no token).")
    retry_of: str | None = Field(None, description="The job this one retries (POST /v1/jobs/{id}/retry), if any.")
    batch_id: str | None = Field(None, description="The batch this job is a file of (GET /v1/batches/{id}), if any.")
    reused_from: str | None = Field(
        None, description="The earlier job whose result this job took instead of computing it (same work), if any."
    )
    stages_total: int
    stages_completed: int
    current_stage: int | None
    last_seq: int
    error: str | None
    error_type: str | None
    envelope: dict[str, Any] | None = Field(
        description="The result envelope once the job ended: `{ok, result, stages_executed}` or "
        "`{ok: false, error, error_type, stage_failed, partial_result, stages_executed}`."
    )
    pipeline: dict[str, Any]
    input: dict[str, Any]


class JobSummary(BaseModel):
    job_id: str
    status: JobStatus
    source: str
    pipeline_id: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    stages_total: int
    stages_completed: int
    error_type: str | None
    stages: list[str] = Field(default_factory=list, description="The stages as `plugin.tool`, in order.")
    current_stage: int | None = Field(
        None, description="The stage a running job is on (the first one not completed); null otherwise."
    )
    created_by: str | None = Field(None, description="The name of the token that submitted it (null: no token).")
    retry_of: str | None = Field(None, description="The job this one retries (POST /v1/jobs/{id}/retry), if any.")
    batch_id: str | None = Field(None, description="The batch this job is a file of (GET /v1/batches/{id}), if any.")
    reused_from: str | None = Field(
        None, description="The earlier job whose result this job took instead of computing it (same work), if any."
    )


class JobList(BaseModel):
    items: list[JobSummary]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class JobPipelineView(BaseModel):
    job_id: str
    pipeline: dict[str, Any]
    pipeline_id: str | None
    status: JobStatus
    stages_total: int
    stages_executed: int
    current_stage: int | None
    percent: int
    stage_failed: int | None
    stages: list[StageState]


class CancelResult(BaseModel):
    job_id: str
    status: JobStatus
    cancel_requested: bool
    cancelled_by: str | None = Field(None, description="The name of the token that asked first.")


class EventList(BaseModel):
    job_id: str
    events: list[dict[str, Any]]
    last_seq: int = Field(description="The job's latest seq; pass it as `after_seq` to continue.")
    next_after_seq: int | None = Field(description="Set when more events follow (page limit reached).")


class IngestBatch(BaseModel):
    events: list[Event] = Field(
        max_length=1_000,
        description="At most 1,000 (a host's sender posts up to 200): one batch is stored in one transaction, "
        "which holds the store's write lock while it runs.",
    )
    alive: list[Id] = Field(
        default_factory=list,
        max_length=10_000,
        description="Jobs still running on the sender's host (a heartbeat; the events' jobs count too).",
    )


class IngestResult(BaseModel):
    received: int
    stored: int
    duplicates: int


class PipelineCreate(_RequestBody):
    """A template: `name` and `stages` (or the seed's `pipeline` list)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": _TEMPLATE_FORMS,
            "examples": [{"name": "soccer-analysis", "stages": SEED_JOB_EXAMPLE["pipeline"]}],
        },
    )

    name: str = Field(min_length=1, max_length=200)
    stages: RawStages = None
    pipeline: RawStages = None
    timeout_seconds: float | None = Field(None, gt=0)
    description: str | None = Field(None, max_length=10_000)
    runner: RunnerKind | None = Field(None, description=RUNNER_DESCRIPTION + " Applies to every stage without its own.")


class PipelineCheck(_RequestBody):
    """A pipeline to check as `POST /v1/jobs` would, with the job input when there is one yet."""

    model_config = ConfigDict(extra="forbid")

    pipeline: RawPipeline
    input: dict[str, Any] | None = Field(
        None, description="The job input; without it only what the stages need from it is listed."
    )


class PipelineCheckResult(BaseModel):
    """A pipeline `POST /v1/jobs` would accept (with this job input, when one was given)."""

    stages: list[str] = Field(description="The stages as `plugin.tool` (resolved names), in order.")
    job_input_fields: list[str] = Field(description="What the job input must provide.")
    warnings: list[dict[str, Any]] = Field(
        default_factory=list,
        description="What is likely a mistake though a job may still run, each like an issue (`stage_index`, "
        "`plugin`, `tool`, `field`, `error_type`, `message`): `StageOrder`, a field a stage needs from the job "
        "input that a later stage produces (saving it as a template is refused).",
    )


class TemplateSummary(BaseModel):
    id: str
    name: str
    stages: list[dict[str, Any]]
    created_at: str
    updated_at: str
    timeout_seconds: float
    description: str
    created_by: str | None = Field(None, description="The name of the token that saved it (null: no token).")
    runner: RunnerKind | None = None


class StageStats(BaseModel):
    stage_index: int
    plugin: str
    tool: str
    runs: int
    completed: int
    failed: int
    mean_duration_ms: float | None
    min_duration_ms: float | None
    max_duration_ms: float | None


class TemplateDetail(TemplateSummary):
    last_used: str | None
    success_rate: float | None = Field(description="Succeeded / finished runs (null before any finished).")
    runs: dict[str, int]
    mean_duration_ms: float | None = Field(description="Mean wall time of succeeded runs.")
    stage_stats: list[StageStats]
    job_input_fields: list[str] = Field(description="Fields a job input must provide for this template.")


class PluginSummary(BaseModel):
    name: str
    version: str | None
    aliases: list[str]
    description: str
    available: bool
    unavailable_reason: str | None
    tools: list[dict[str, Any]]
    lifecycle: PluginStatus


class PluginDetail(PluginSummary):
    entry_point: str


class PluginHealth(BaseModel):
    plugin: str
    healthy: bool
    state: str
    available: bool
    reason: str | None
    last_error: str | None
    last_error_type: str | None
    calls: int
    failures: int
    last_duration_ms: float | None
    updated_at: float


class JobOutput(BaseModel):
    """One per-frame output of a job's (partial) result."""

    name: str
    stored: Literal["artifact", "inline"] = Field(
        description="`artifact`: a chunked Parquet artifact in the media store (`ref`); `inline`: JSON in the envelope."
    )
    ref: str | None = Field(None, description="The artifact's media ref (its manifest of chunks).")
    frames: int = Field(description="Records (one per processed frame).")
    first_frame: int | None = None
    last_frame: int | None = None
    chunks: int | None = None
    size_bytes: int | None = Field(None, description="Bytes of the artifact's chunks.")
    counts: dict[str, int] | None = Field(None, description="Items per list column, summed (`players`: 15816).")
    record: str | None = Field(None, description="The record model's name.")
    format: str | None = None
    columns: dict[str, str] | None = Field(None, description="The artifact's schema: column name → Arrow type.")
    download_url: str = Field(description="GET it for the whole output as one Parquet file.")
    frames_url: str = Field(description="GET it (`?start=&limit=`) for a page of records as JSON.")


class JobOutputs(BaseModel):
    job_id: str
    outputs: list[JobOutput]


class FramePage(BaseModel):
    job_id: str
    output: str
    start: int
    limit: int
    frames: list[dict[str, Any]] = Field(description="Records with frame_index >= start, in frame order.")
    next_start: int | None = Field(description="First frame index of the next page; null after the last.")


class MediaView(BaseModel):
    ref: str = Field(description='Use it as job input: `{"input": {"media": ref}}`.')
    sha256: str
    size_bytes: int
    kind: Literal["image", "video", "data"]
    media_type: str
    filename: str | None = None


class Caller(BaseModel):
    """The token a call was made with, and what it may do."""

    name: str | None = Field(description="The token's name; null on an open service (loopback, no tokens).")
    scopes: list[Literal["read", "run", "admin"]] = Field(description="What it may do: read, run, admin.")
    auth_required: bool = Field(description="Whether the service asks for a token at all.")


class AuditEntry(BaseModel):
    at: str
    actor: str | None = Field(description="The name of the token that did it (null: no token).")
    action: Literal["job.cancel", "template.delete"]
    target: str = Field(description="The job or template id.")


class AuditList(BaseModel):
    items: list[AuditEntry]
    total: int
    limit: int
    offset: int


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    database: str
    jobs_running: int
    jobs_queued: int
    websocket_clients: int
