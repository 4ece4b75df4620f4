"""How a job ends: the one status vocabulary, the one result envelope, and the pure functions that
settle a run's stages and build its envelope for every way a job can end.

A job ends in one of four ways, each built here and nowhere else:

* **succeeded** — :func:`succeeded`: every stage completed; ``{ok: true, result, stages_executed}``.
* **failed** — :func:`failed`: a stage (or validation) failed; the stages before it completed, the
  failed one says why, later ones are skipped; ``partial_result`` holds what completed stages made.
* **crashed / cancelled while running** — :func:`ended_abnormally`: the run was killed or cancelled
  mid-stage; the stage that was running is ``failed`` (crash) or ``cancelled`` (cancel).
* **never started** — :func:`not_started`: every stage skipped (cancelled while queued, or the job
  could not be handed to anything that runs it).

Every function here is pure: reports in, new reports and an envelope out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field, JsonValue, model_validator

from forgeflow.canonical import MAX_AMOUNT, MAX_COUNT, MAX_STAGES, JsonObject, JsonObjectField, canonical_bytes

#: Longest plugin, tool or error type name a report holds (what the stores' columns hold).
NAME_MAX = 200

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "crashed"]
TerminalStatus = Literal["succeeded", "failed", "cancelled", "crashed"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "crashed"})

StageStatus = Literal["pending", "running", "completed", "failed", "skipped", "cancelled"]


class EndReason(StrEnum):
    """The ``error_type`` of endings that no plugin raised (a plugin's own errors keep their class name)."""

    CANCELLED = "Cancelled"
    FLOW_RUN_CRASHED = "FlowRunCrashed"
    FLOW_RUN_CANCELLED = "FlowRunCancelled"
    FLOW_RUN_ERROR = "FlowRunError"
    LAUNCH_ERROR = "LaunchError"
    VALIDATION = "PipelineValidationError"


CANCEL_REASONS: frozenset[str] = frozenset(
    {EndReason.CANCELLED, EndReason.FLOW_RUN_CANCELLED, "CancelledError", "JobCancelled"}
)


#: Errors by which a tool refuses what the caller gave it (``InputError``: inputs well-typed but
#: unusable, say empty; ``ConfigError``: a config combination the model cannot express): they fail the
#: stage and the job, but say nothing about the plugin's health.
CALLERS_MISTAKES: frozenset[str] = frozenset({"InputError", "ConfigError"})

#: Endings that are not the plugin's doing — a cancel, the caller's input or config that the tool
#: refused, or the infrastructure failing (the job's process or engine killed, a flow run that could
#: not start, a job that could not be launched): the plugin is left INITIALIZED (no longer running,
#: nothing failed in it), never FAILED.
NOT_THE_PLUGINS_DOING: frozenset[str] = (
    CANCEL_REASONS
    | CALLERS_MISTAKES
    | {
        EndReason.FLOW_RUN_CRASHED,
        EndReason.FLOW_RUN_ERROR,
        EndReason.LAUNCH_ERROR,
    }
)


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


class StageReport(BaseModel):
    """What happened to one stage of one run."""

    index: int = Field(ge=0, lt=MAX_STAGES)
    plugin: str = Field(max_length=NAME_MAX)
    tool: str = Field(max_length=NAME_MAX)
    status: StageStatus = "pending"
    duration_ms: float | None = Field(None, ge=0, le=MAX_AMOUNT)
    result_size_bytes: int | None = Field(None, ge=0, le=MAX_AMOUNT)
    peak_memory_mb: float | None = Field(None, ge=0, le=MAX_AMOUNT)
    reused_outputs: int | None = Field(None, ge=0, le=MAX_COUNT)
    computed_outputs: int | None = Field(None, ge=0, le=MAX_COUNT)
    error: str | None = None
    error_type: str | None = Field(None, max_length=NAME_MAX)
    media_frames: int | None = Field(
        None, ge=0, le=MAX_AMOUNT, description="Frames in the media the stage read (null: it read no media)."
    )
    frames_read: int | None = Field(None, ge=0, le=MAX_AMOUNT, description="Frames the stage read of it.")
    truncated: bool | None = Field(
        None, description="True when the host's FORGEFLOW_MAX_FRAMES stopped the stage before the media's end."
    )
    from_checkpoint: bool | None = Field(
        None, description="True when a resumed job took this stage's outputs from an earlier attempt's call."
    )


class AnnotatedMedia(BaseModel):
    """The job's result drawn on its input media, in the media store (:mod:`forgeflow.jobs.annotate`)."""

    ref: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="Media ref of the annotated file.")
    media_type: str = Field(max_length=NAME_MAX, description="`video/mp4` (H.264) or `image/jpeg`.")
    kind: Literal["image", "video"]
    size_bytes: int = Field(ge=0, le=MAX_AMOUNT)
    frames: int | None = Field(None, ge=0, le=MAX_COUNT, description="Frames of the video; null for an image.")


#: The envelope's keys about its annotated media, left out of :meth:`ResultEnvelope.to_dict` when null.
ANNOTATION_KEYS = ("annotated_media", "annotated_media_error")
#: Keys about the frames read (an envelope's and its stage reports'), left out when null: a job that read
#: no media has none of them.
FRAME_KEYS = ("media_frames", "frames_read", "truncated")
#: Stage report keys left out when null (a stage that read no media, one that ran rather than resumed).
OPTIONAL_STAGE_KEYS = (*FRAME_KEYS, "from_checkpoint")


class ResultEnvelope(BaseModel):
    """``{ok, result, stages_executed}`` or ``{ok: false, error, error_type, stage_failed, partial_result}``.

    ``stage_failed`` is 0-based. ``stages`` reports every stage (completed, failed, skipped, cancelled).
    A job with input ``media`` whose (partial) result holds something to draw also has
    ``annotated_media`` (the result drawn on it, stored) or ``annotated_media_error`` (why not);
    neither key appears otherwise.
    """

    ok: bool
    result: JsonObjectField | None = None
    stages_executed: int = Field(0, ge=0, le=MAX_STAGES)
    error: str | None = None
    error_type: str | None = Field(None, max_length=NAME_MAX)
    stage_failed: int | None = Field(None, ge=0, lt=MAX_STAGES)
    partial_result: JsonObjectField | None = None
    stages: list[StageReport] = Field(default_factory=list)
    annotated_media: AnnotatedMedia | None = None
    annotated_media_error: str | None = None
    media_frames: int | None = Field(
        None, ge=0, le=MAX_AMOUNT, description="Frames in the job's media (the most any stage found)."
    )
    frames_read: int | None = Field(None, ge=0, le=MAX_AMOUNT, description="The most frames a stage read of it.")
    truncated: bool | None = Field(
        None,
        description="True when a stage stopped at the host's FORGEFLOW_MAX_FRAMES before the media's end: the "
        "result covers frames_read of media_frames frames. Never true without being said.",
    )

    @model_validator(mode="after")
    def _frames_from_stages(self) -> ResultEnvelope:
        """The envelope's frame counts follow from its stages' (set here so every ending has them)."""
        seen = [r for r in self.stages if r.media_frames is not None]
        if seen and self.media_frames is None:
            self.media_frames = max(r.media_frames or 0 for r in seen)
            self.frames_read = max(r.frames_read or 0 for r in seen)
            self.truncated = any(bool(r.truncated) for r in seen)
        return self

    def to_dict(self) -> JsonObject:
        """The envelope with the keys of its kind only (success or failure), and the annotated
        media's and frame counts' keys only when set."""
        data = self.model_dump(mode="json")
        drop = ("error", "error_type", "stage_failed", "partial_result") if self.ok else ("result",)
        for stage in data["stages"]:
            for key in OPTIONAL_STAGE_KEYS:
                if stage.get(key) is None:
                    stage.pop(key, None)
        return {
            k: v for k, v in data.items() if k not in drop and not (k in (*ANNOTATION_KEYS, *FRAME_KEYS) and v is None)
        }


def pending_reports(stages: Iterable[object]) -> list[StageReport]:
    """One ``pending`` report per stage (stages as models or as their JSON; anything else gives blanks)."""
    reports = []
    for index, stage in enumerate(stages):
        if isinstance(stage, Mapping):
            plugin, tool = str(stage.get("plugin") or ""), str(stage.get("tool") or "")
        else:
            plugin, tool = str(getattr(stage, "plugin", "")), str(getattr(stage, "tool", ""))
        reports.append(StageReport(index=index, plugin=plugin, tool=tool))
    return reports


def running_stage(reports: Sequence[StageReport]) -> StageReport | None:
    """The stage that was running (the first one, should several say so)."""
    return next((r for r in reports if r.status == "running"), None)


def settle(
    reports: Sequence[StageReport],
    *,
    stage_failed: int | None,
    ending: Literal["failed", "cancelled"] = "failed",
    error: str | None = None,
    error_type: str | None = None,
) -> list[StageReport]:
    """The final stage statuses of a run that stopped: settled stages keep their status; the stage
    at ``stage_failed`` (or, without one, the running stage) becomes ``ending`` — with ``error`` /
    ``error_type`` where it has none of its own; every other stage is ``skipped``."""
    out = []
    for original in reports:
        report = original.model_copy()
        if report.status in ("completed", "cancelled"):
            pass
        elif report.index == stage_failed or (stage_failed is None and report.status == "running"):
            report.status = ending
            if report.error is None and error is not None:
                report.error, report.error_type = error, error_type
        elif report.status != "failed":
            report.status = "skipped"
        out.append(report)
    return out


def completed_count(reports: Iterable[StageReport]) -> int:
    return sum(1 for r in reports if r.status == "completed")


def succeeded(result: JsonObject, reports: Sequence[StageReport]) -> ResultEnvelope:
    """Every stage completed: the last context is the result."""
    return ResultEnvelope(ok=True, result=result, stages_executed=completed_count(reports), stages=list(reports))


def failed(
    reports: Sequence[StageReport],
    *,
    error: str,
    error_type: str,
    stage_failed: int | None,
    partial_result: JsonObject | None = None,
    ending: Literal["failed", "cancelled"] = "failed",
) -> ResultEnvelope:
    """A run that stopped at ``stage_failed`` (``None``: before or outside any stage)."""
    settled = settle(reports, stage_failed=stage_failed, ending=ending)
    return _stopped(settled, error, error_type, stage_failed, partial_result)


def ended_abnormally(
    reports: Sequence[StageReport],
    *,
    status: Literal["crashed", "cancelled"],
    error: str,
    error_type: str,
    partial_result: JsonObject | None = None,
) -> ResultEnvelope:
    """A run killed (``crashed``) or cancelled while it ran: the running stage is the one that failed
    (crash) or was cancelled; with none running, the first stage that had not run is blamed."""
    running = running_stage(reports)
    stage_failed = running.index if running else next((r.index for r in reports if r.status == "pending"), None)
    ending: Literal["failed", "cancelled"] = "cancelled" if status == "cancelled" else "failed"
    settled = settle(
        reports,
        stage_failed=running.index if running else None,
        ending=ending,
        error=error,
        error_type=error_type,
    )
    return _stopped(settled, error, error_type, stage_failed, partial_result)


def _stopped(
    settled: list[StageReport],
    error: str,
    error_type: str,
    stage_failed: int | None,
    partial_result: JsonObject | None,
) -> ResultEnvelope:
    return ResultEnvelope(
        ok=False,
        error=error,
        error_type=error_type,
        stage_failed=stage_failed,
        partial_result=partial_result if partial_result is not None else {},
        stages_executed=completed_count(settled),
        stages=settled,
    )


def not_started(reports: Sequence[StageReport], *, error: str, error_type: str) -> ResultEnvelope:
    """A job that ended before any stage ran: every stage skipped."""
    return ResultEnvelope(
        ok=False,
        error=error,
        error_type=error_type,
        stage_failed=None,
        partial_result={},
        stages_executed=0,
        stages=[r.model_copy(update={"status": "skipped"}) for r in reports],
    )


def as_cancelled(envelope: Mapping[str, JsonValue], error: str) -> JsonObject:
    """A crash envelope of a job whose cancel was requested: it ended because it was cancelled."""
    listed = envelope.get("stages") or []
    stages: list[JsonValue] = [
        {**s, "status": "cancelled", "error": error, "error_type": EndReason.CANCELLED.value}
        if isinstance(s, dict) and s.get("status") == "failed" and s.get("index") == envelope.get("stage_failed")
        else s
        for s in (listed if isinstance(listed, list) else [])
    ]
    return {**envelope, "ok": False, "error": error, "error_type": EndReason.CANCELLED.value, "stages": stages}


def job_status_of(envelope: Mapping[str, JsonValue]) -> TerminalStatus:
    """The terminal job status an envelope a run returned stands for."""
    if envelope.get("ok"):
        return "succeeded"
    if envelope.get("error_type") in CANCEL_REASONS:
        return "cancelled"
    return "failed"


def shown_stage_status(stage_status: StageStatus, job_status: str) -> StageStatus:
    """A stage's status as a reader should see it: once the job ended, a stage still ``pending`` was
    ``skipped`` and one still ``running`` was ``cancelled`` (job cancelled) or ``failed``."""
    if not is_terminal(job_status):
        return stage_status
    if stage_status == "pending":
        return "skipped"
    if stage_status == "running":
        return "cancelled" if job_status == "cancelled" else "failed"
    return stage_status


#: The envelope's keys that hold a job's data; a message carries their sizes instead.
RESULT_KEYS = ("result", "partial_result")


def envelope_summary(envelope: Mapping[str, JsonValue]) -> JsonObject:
    """The envelope as a realtime message carries it: ``result`` / ``partial_result`` replaced by
    ``result_size_bytes`` / ``partial_result_size_bytes`` (canonical JSON). The whole envelope is
    stored once, with the job (``GET /v1/jobs/{id}``), however many clients watch it."""
    summary: JsonObject = {k: v for k, v in envelope.items() if k not in RESULT_KEYS}
    for key in RESULT_KEYS:
        if key in envelope:
            summary[f"{key}_size_bytes"] = len(canonical_bytes(envelope[key]))
    return summary
