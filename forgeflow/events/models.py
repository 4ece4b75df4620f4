"""Realtime messages: the seed's four pipeline messages, in-stage progress, and job status messages.

Every message carries ``type``, ``job_id``, ``timestamp`` (ISO-8601 UTC, ``Z``), an ``event_id``
(UUID, so a retried delivery is stored once) and ``seq``, the per-job sequence number (1, 2, 3 …)
that the event store assigns when it stores the message, before anyone sees it.

The models are also the contract of the API's event ingest (their JSON Schema is in its OpenAPI
document): strict types (no ``"5"`` for 5), finite numbers, and bounds that every store can hold.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
)

from forgeflow.canonical import (
    MAX_AMOUNT,
    MAX_COUNT,
    MAX_STAGES,
    JsonObject,
    JsonObjectField,
    storable,
    whole_if_integral,
    without_nul,
)
from forgeflow.pipeline.outcome import (
    NAME_MAX,
    RESULT_KEYS,
    JobStatus,
    ResultEnvelope,
    StageReport,
    envelope_summary,
    is_terminal,
)

#: ``2026-02-15T10:30:00Z`` or with a fraction or an offset, years 1970 to 2999.
TIMESTAMP_PATTERN = (
    r"^(19[7-9][0-9]|2[0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)


def _storable_text(value: str) -> str:
    return value.replace("\x00", "\ufffd")  # PostgreSQL refuses U+0000 in text: kept as U+FFFD


_NUL_SAFE = AfterValidator(_storable_text)
Id = Annotated[str, StringConstraints(min_length=1, max_length=128), _NUL_SAFE]
Name = Annotated[str, StringConstraints(max_length=NAME_MAX), _NUL_SAFE]
Text = Annotated[str, _NUL_SAFE]
FlowRunId = Annotated[str, StringConstraints(max_length=64), _NUL_SAFE]


def _whole_number(value: object) -> object:
    """``3.0`` is the integer 3 (as in JSON Schema); a string never is (strict mode keeps ``"3"`` out)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _whole_numbers(value: JsonValue) -> JsonValue:
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return whole_if_integral(value) if isinstance(value, float) else value  # as _whole_number


WholeNumber = BeforeValidator(_whole_number)
StageIndex = Annotated[int, Field(ge=0, lt=MAX_STAGES), WholeNumber]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT), WholeNumber]
Amount = Annotated[float, Field(ge=0, le=MAX_AMOUNT)]
#: A count of units (frames) that may be fractional: sent as an integer when it is whole.
Units = PlainSerializer(whole_if_integral)


def _envelope_shape(value: JsonObject) -> JsonObject:
    """A result envelope (as :class:`ResultEnvelope` reads it, strictly) that every store can hold
    (U+0000 kept as U+FFFD, as in every text of a message)."""
    ResultEnvelope.model_validate(_whole_numbers(value), strict=True)
    return without_nul(storable(value, allow_nul=True))


def _without_refs(schema: JsonValue, defs: Mapping[str, JsonValue]) -> JsonValue:
    """``schema`` with each ``$ref`` to ``defs`` replaced by what it names (to embed it elsewhere)."""
    if isinstance(schema, list):
        return [_without_refs(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if isinstance(ref := schema.get("$ref"), str):
        return _without_refs(defs[ref.rsplit("/", 1)[-1]], defs)
    return {key: _without_refs(value, defs) for key, value in schema.items() if key != "$defs"}


_ENVELOPE_SCHEMA = ResultEnvelope.model_json_schema()
EnvelopeData = Annotated[
    JsonObjectField,
    AfterValidator(_envelope_shape),
    WithJsonSchema(_without_refs(_ENVELOPE_SCHEMA, _ENVELOPE_SCHEMA.get("$defs", {}))),
]


def _json_object(value: JsonObject) -> JsonObject:
    return without_nul(storable(value, allow_nul=True))


#: A JSON object every store can hold (U+0000 kept as U+FFFD).
StoredJsonObject = Annotated[JsonObjectField, AfterValidator(_json_object)]


def utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _type_required(schema: JsonObject) -> None:
    """``type`` has a default for Python code, but a message on the wire must name its kind."""
    required = schema.get("required", [])
    named = [name for name in required if isinstance(name, str)] if isinstance(required, list) else []
    schema["required"] = [*sorted({*named, "type"})]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra=_type_required)

    job_id: Id
    seq: Annotated[int, Field(ge=1, le=MAX_COUNT), WholeNumber] | None = None
    timestamp: Annotated[str, StringConstraints(pattern=TIMESTAMP_PATTERN)] = Field(default_factory=utc_timestamp)
    event_id: Id = Field(default_factory=lambda: uuid.uuid4().hex)


class StageStart(_Event):
    type: Literal["pipeline_stage_start"] = "pipeline_stage_start"
    stage_index: StageIndex
    plugin: Name
    tool: Name
    attempt: Annotated[int, Field(ge=1, le=MAX_COUNT), WholeNumber] = 1


class StageEnd(_Event):
    type: Literal["pipeline_stage_end"] = "pipeline_stage_end"
    stage_index: StageIndex
    plugin: Name
    tool: Name
    duration_ms: Annotated[int, Field(ge=0, le=MAX_AMOUNT), WholeNumber]
    ok: bool
    result_size_bytes: Annotated[int, Field(ge=0, le=MAX_AMOUNT), WholeNumber]
    peak_memory_mb: Amount | None = None


class PipelineError(_Event):
    type: Literal["pipeline_error"] = "pipeline_error"
    stage_index: StageIndex | None
    plugin: Name | None
    tool: Name | None = None
    error: Text
    error_type: Name


class StageProgress(_Event):
    """How far the running stage is, as its tool reported (``ctx.progress``); rate-limited."""

    type: Literal["pipeline_stage_progress"] = "pipeline_stage_progress"
    stage_index: StageIndex
    plugin: Name
    tool: Name
    done: Annotated[Amount, Units] = Field(description="Units done (frames, say).")
    total: Annotated[float, Field(gt=0, le=MAX_AMOUNT), Units] | None = Field(
        None, description="Units in all; null when the tool does not know."
    )
    fraction: Annotated[float, Field(ge=0, le=1)] | None = Field(None, description="done / total; null when total is.")
    message: Name | None = None
    rate: Amount | None = Field(None, description="Units a second since the stage's call started (frames/s).")
    eta_s: Amount | None = Field(None, description="Seconds left at that rate; null without a total.")


class StageWarning(_Event):
    """Something the job's result should be read with: today, that the host's ``FORGEFLOW_MAX_FRAMES``
    stopped a stage before its media's end (``reason: truncated``), with both counts."""

    type: Literal["pipeline_stage_warning"] = "pipeline_stage_warning"
    stage_index: StageIndex
    plugin: Name
    tool: Name
    reason: Name
    warning: Text
    media_frames: Count | None = None
    frames_read: Count | None = None


class PipelineProgress(_Event):
    type: Literal["pipeline_progress"] = "pipeline_progress"
    stages_total: Count
    stages_completed: Count
    percent: Annotated[int, Field(ge=0, le=100), WholeNumber]


class JobStatusEvent(_Event):
    """The job's status changed. Terminal ones carry the result envelope: whole on its way to the
    store, as a summary (:meth:`summarized`) once stored and sent to clients."""

    type: Literal["job_status"] = "job_status"
    status: JobStatus
    flow_run_id: FlowRunId | None = None
    envelope: EnvelopeData | None = None
    waiting_for: Text | None = Field(
        None, description="Why a running job is not progressing: it waits for a device slot."
    )
    pipeline: StoredJsonObject | None = Field(
        None,
        description="The flow run's pipeline, on its way to the store with the running message (a run "
        "started from the Prefect UI or a schedule becomes a job with it); kept on the job, not the message.",
    )
    input: StoredJsonObject | None = Field(None, description="The flow run's job input, like `pipeline`.")

    def summarized(self) -> JobStatusEvent:
        """This message as stored and sent: the envelope's result and partial result replaced by their
        sizes, the pipeline and input left to the job."""
        update: dict[str, JsonValue] = {}
        if self.envelope is not None and any(k in self.envelope for k in RESULT_KEYS):
            update["envelope"] = envelope_summary(self.envelope)
        if self.pipeline is not None or self.input is not None:
            update["pipeline"] = update["input"] = None
        return self.model_copy(update=update) if update else self


Event = Annotated[
    StageStart | StageEnd | StageProgress | StageWarning | PipelineError | PipelineProgress | JobStatusEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
#: Every message ``type``.
EVENT_TYPES = frozenset(
    model.model_fields["type"].default
    for model in (StageStart, StageEnd, StageProgress, StageWarning, PipelineError, PipelineProgress, JobStatusEvent)
)


def parse_event(data: Mapping[str, object]) -> Event:
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
