"""One job while it runs: its state, and the stage transitions that emit its events.

:class:`JobRun` calls a stage's tool through the runner (:meth:`JobRun.call_stage`: checkpoints,
feeds, media sync, frame counts) and emits ``stage_start`` / ``stage_progress`` / ``stage_end`` /
``pipeline_error`` and the one terminal ``job_status``. The loop that drives it is
:mod:`forgeflow.jobs.stages`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import JsonValue, ValidationError

from forgeflow.canonical import JsonObject
from forgeflow.engine.runners.base import CallResult, FramesRead, Progress, ToolCall
from forgeflow.events.models import (
    Event,
    JobStatusEvent,
    PipelineError,
    StageEnd,
    StageProgress,
    StageStart,
    StageWarning,
    progress,
)
from forgeflow.jobs.head_start import HeadStart
from forgeflow.jobs.media_sync import media_refs
from forgeflow.jobs.overlap import prepare_feeds
from forgeflow.jobs.services import Services
from forgeflow.pipeline.definition import PipelineDefinition
from forgeflow.pipeline.outcome import EndReason, JobStatus, ResultEnvelope, StageReport
from forgeflow.pipeline.validation import PipelineValidationError, ResolvedStage, validate_pipeline
from forgeflow.plugins.cache import job_cache_dir
from forgeflow.plugins.checkpoints import Checkpoints, call_key
from forgeflow.plugins.errors import ForgeFlowError, MediaError
from forgeflow.plugins.frames import chunk_refs, is_frames, is_live
from forgeflow.plugins.media import MediaStore

__all__ = ["CANCELLED", "JobRun", "PipelineFailed", "StageFailed"]

log = logging.getLogger("forgeflow.jobs")

#: error_type of a stage (and a job) stopped by a cancel request.
CANCELLED = EndReason.CANCELLED.value


class StageFailed(Exception):
    """A stage's tool call failed; carries the runner's result."""

    def __init__(self, stage: ResolvedStage, result: CallResult) -> None:
        super().__init__(f"stage {stage.index} ({stage.name}) failed: {result.error_type}: {result.error}")
        self.stage = stage
        self.result = result


class PipelineFailed(Exception):
    """The pipeline stopped; ``envelope`` holds the error and the partial result."""

    def __init__(self, envelope: ResultEnvelope) -> None:
        super().__init__(f"{envelope.error_type}: {envelope.error}")
        self.envelope = envelope


@dataclass
class JobRun:
    """The state of one job while it runs, and the stage transitions that emit its events."""

    job_id: str
    services: Services
    reports: list[StageReport]
    flow_run_id: str | None = None
    outcomes: dict[int, CallResult] = field(default_factory=dict)
    completed: int = 0
    terminal_sent: bool = False
    #: Disk the job's per-frame artifacts take so far (its budget: FORGEFLOW_MAX_ARTIFACT_BYTES_PER_JOB).
    artifact_bytes: int = 0
    #: When each stage's call started (monotonic): its progress' rate and ETA count from there.
    call_started: dict[int, float] = field(default_factory=dict)
    #: Resume an earlier attempt (a retry): completed calls are reused, resumable ones continue.
    resume: bool = False
    #: Each stage's call key (:mod:`forgeflow.plugins.checkpoints`), its checkpoints' name.
    call_keys: dict[int, str] = field(default_factory=dict)
    #: The stage that made each context field (a streamed input is keyed by its maker's call).
    field_stage: dict[str, int] = field(default_factory=dict)
    #: Set once a stage's call runs with its feeds ready (:mod:`forgeflow.jobs.overlap`).
    feeding: dict[int, threading.Event] = field(default_factory=dict)
    #: Set when the job stops early: whatever waits for a stage that will not start gives up.
    stopping: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.services.settings.checkpoints_dir)

    def emit(self, event: Event) -> None:
        self.services.sink.emit(event)

    def stage_started(self, stage: ResolvedStage, attempt: int = 1) -> None:
        self.reports[stage.index].status = "running"
        self.emit(
            StageStart(
                job_id=self.job_id,
                stage_index=stage.index,
                plugin=stage.plugin,
                tool=stage.stage.tool,
                attempt=max(1, attempt),
            )
        )

    def call_stage(self, stage: ResolvedStage, inputs: JsonObject) -> JsonObject:
        """The stage's tool call through the runner: its outputs, or :class:`StageFailed`. A job that
        resumes takes the outputs of a call that completed in an earlier attempt instead; a call the
        engine started ahead of the stage's task (:mod:`forgeflow.jobs.head_start`) is taken over."""
        self._sync_media(stage, inputs)
        settings = self.services.settings
        key = self.call_keys[stage.index] = stage_call_key(self.services, stage, self._keyed(inputs))
        if self.resume and (done := self._completed_before(key)) is not None:
            self.outcomes[stage.index] = CallResult(ok=True, outputs=done)
            self.reports[stage.index].from_checkpoint = True
            with self._lock:
                self.artifact_bytes += _frames_bytes(done.values())
            # its readers get its outputs whole when its feeds end (nothing is journalled this time)
            prepare_feeds(self.checkpoints, key, stage, MediaStore(settings.media_root), resume=False)
            self.feeding.setdefault(stage.index, threading.Event()).set()
            return done
        call = stage_call(self.services, self.job_id, stage, inputs, key, self.artifact_bytes, self.resume)
        head = self.services.head_start

        def on_progress(update: Progress) -> None:
            self.stage_progress(stage, update)

        early = head if head is not None and head.adopt(call) else None
        if early is None:  # an adopted call's feeds were readied when it started
            if head is not None and head.call.checkpoint_key == key:
                head.wait()  # a call it could not adopt: its journals are this call's
            prepare_feeds(self.checkpoints, key, stage, MediaStore(settings.media_root), self.resume)
        self.feeding.setdefault(stage.index, threading.Event()).set()
        self.call_started[stage.index] = early.started if early is not None else time.monotonic()
        result = early.result(on_progress) if early is not None else self.services.runner.run(call, on_progress)
        self.outcomes[stage.index] = result
        report = self.reports[stage.index]
        report.duration_ms = result.duration_ms
        report.result_size_bytes = result.result_size_bytes
        report.peak_memory_mb = result.peak_memory_mb
        if result.reused_outputs or result.computed_outputs:
            report.reused_outputs, report.computed_outputs = result.reused_outputs, result.computed_outputs
        if result.frames is not None:
            self._frames_read(stage, result.frames)
        if not result.ok:
            raise StageFailed(stage, result)
        with self._lock:
            self.artifact_bytes += _frames_bytes((result.outputs or {}).values())
        self.checkpoints.mark_done(key, result.outputs or {})
        self._sync_media(stage, result.outputs or {}, made_by=result)
        return result.outputs or {}

    def _keyed(self, inputs: JsonObject) -> JsonObject:
        """The inputs as a call key sees them: a per-frame output of an earlier stage (finished or still
        being written) by the call that makes it, so overlapping or not, the key is the same."""
        return {
            name: {"$frames_of": self.call_keys[self.field_stage[name]], "field": name}
            if (is_frames(value) or is_live(value)) and name in self.field_stage
            else value
            for name, value in inputs.items()
        }

    def _completed_before(self, key: str) -> JsonObject | None:
        """A completed call's outputs, when every media ref and artifact chunk they name is still here."""
        done = self.checkpoints.done(key)
        if done is None:
            return None
        store = MediaStore(self.services.settings.media_root)
        try:
            refs = media_refs(done) + [r for v in done.values() if is_frames(v) for r in chunk_refs(store, v)]
            if all(store.has(ref) for ref in refs):
                return done
        except ForgeFlowError:
            pass
        return None

    def _frames_read(self, stage: ResolvedStage, frames: FramesRead) -> None:
        """The stage's frame counts on its report; a cut by the host's cap goes out as a warning too."""
        report = self.reports[stage.index]
        report.media_frames, report.frames_read, report.truncated = (
            frames.media_frames,
            frames.frames_read,
            frames.truncated,
        )
        if frames.truncated:
            self.emit(
                StageWarning(
                    job_id=self.job_id,
                    stage_index=stage.index,
                    plugin=stage.stage.plugin,
                    tool=stage.stage.tool,
                    reason="truncated",
                    warning=f"read {frames.frames_read} of {frames.media_frames} frames: the host's "
                    f"FORGEFLOW_MAX_FRAMES={frames.max_frames} stopped the stage before the media's end",
                    media_frames=frames.media_frames,
                    frames_read=frames.frames_read,
                )
            )

    def _sync_media(self, stage: ResolvedStage, values: JsonObject, made_by: CallResult | None = None) -> None:
        """On a host apart from the API (:class:`~forgeflow.jobs.media_sync.MediaSync`): fetch the media
        refs of a stage's inputs before its call, upload those of its outputs (``made_by``) after it.
        A transfer that fails fails the stage with the error naming the ref and the API."""
        sync = self.services.media_sync
        if sync is None:
            return
        try:
            if made_by is None:
                sync.fetch(values)
            else:
                sync.upload(values)
        except MediaError as exc:
            spent = made_by.duration_ms if made_by is not None else 0.0
            self.outcomes[stage.index] = CallResult.failure(exc.error_type, exc.message, spent)
            raise StageFailed(stage, self.outcomes[stage.index]) from None

    def stage_progress(self, stage: ResolvedStage, update: Progress) -> None:
        elapsed = time.monotonic() - self.call_started.get(stage.index, time.monotonic())
        rate = update.done / elapsed if elapsed > 0 and update.done > 0 else None
        eta = (update.total - update.done) / rate if rate and update.total is not None else None
        self.emit(
            StageProgress(
                job_id=self.job_id,
                stage_index=stage.index,
                plugin=stage.plugin,
                tool=stage.stage.tool,
                done=update.done,
                total=update.total,
                fraction=update.fraction,
                message=update.message,
                rate=round(rate, 2) if rate is not None else None,
                eta_s=round(max(eta, 0.0), 1) if eta is not None else None,
            )
        )

    def stage_completed(self, stage: ResolvedStage) -> None:
        with self._lock:  # stages that overlap end from their own threads
            self.reports[stage.index].status = "completed"
            self.completed += 1
            self.emit(_stage_end(self.job_id, stage, self.outcomes[stage.index], ok=True))
            self.emit(progress(self.job_id, self.completed, len(self.reports)))

    def stage_failed(self, stage: ResolvedStage, message: str | None = None) -> None:
        result = self.outcomes.get(stage.index) or CallResult.failure("TaskFailed", message or "the stage task failed")
        report = self.reports[stage.index]
        report.status = "cancelled" if result.error_type == CANCELLED else "failed"
        report.error, report.error_type = result.error, result.error_type
        self.emit(_stage_end(self.job_id, stage, result, ok=False))
        self.emit(
            PipelineError(
                job_id=self.job_id,
                stage_index=stage.index,
                plugin=stage.plugin,
                tool=stage.stage.tool,
                error=result.error or "stage failed",
                error_type=result.error_type or "Error",
            )
        )

    def finish(self, status: JobStatus, envelope: ResultEnvelope | None) -> None:
        """Send the one terminal job message (later calls do nothing)."""
        if self.terminal_sent:
            return
        self.terminal_sent = True
        self.emit(
            JobStatusEvent(
                job_id=self.job_id,
                status=status,
                flow_run_id=self.flow_run_id,
                envelope=envelope.to_dict() if envelope else None,
            )
        )
        self.services.sink.flush(timeout=5.0)
        shutil.rmtree(job_cache_dir(self.services.settings.cache_dir, self.job_id), ignore_errors=True)
        if status == "succeeded":  # nothing left to resume
            for key in self.call_keys.values():
                self.checkpoints.forget(key)


def stage_call_key(services: Services, stage: ResolvedStage, keyed_inputs: JsonObject) -> str:
    """The stage's call key (:func:`~forgeflow.plugins.checkpoints.call_key`): its checkpoints' name."""
    entry = services.registry.resolve(stage.plugin)
    return call_key(stage.plugin, entry.version or "", stage.tool.name, stage.config, keyed_inputs)


def stage_call(
    services: Services,
    job_id: str,
    stage: ResolvedStage,
    inputs: JsonObject,
    key: str,
    artifact_bytes: int = 0,
    resume: bool = False,
) -> ToolCall:
    """The runner's call of a stage of ``job_id`` (``artifact_bytes``: what the job's artifacts take so far)."""
    settings = services.settings
    return ToolCall(
        plugin=stage.plugin,
        tool=stage.tool.name,
        config=stage.config,
        inputs=inputs,
        timeout_s=stage.timeout_s,
        memory_limit_mb=stage.stage.memory_limit_mb or settings.stage_memory_limit_mb,
        job_id=job_id,
        stage_index=stage.index,
        runner=stage.stage.effective_runner,
        artifact_budget_bytes=max(0, settings.max_artifact_bytes_per_job - artifact_bytes),
        checkpoint_key=key,
        resume=resume,
    )


def start_first_stage(services: Services, job_id: str, pipeline: JsonValue, input_data: JsonValue) -> HeadStart | None:
    """Start a new job's first stage call ahead of its flow run (:mod:`forgeflow.jobs.head_start`): the
    call its task will make, its feeds readied. None where it could differ from the task's own call:
    a pipeline that does not validate (the flow says why), a job that resumes, media of another host."""
    if services.media_sync is not None or not isinstance(pipeline, dict | list) or not isinstance(input_data, dict):
        return None
    try:
        definition = PipelineDefinition.model_validate(pipeline)
        stages = validate_pipeline(definition, input_data, services.registry, services.settings).stages
    except (ValidationError, PipelineValidationError):
        return None
    except Exception:  # whatever it is, the flow's own validation meets it and says so
        log.debug("job %s: no head start", job_id, exc_info=True)
        return None
    if definition.resume or not stages:
        return None
    stage = stages[0]
    inputs = {name: input_data[name] for name in stage.input_fields if name in input_data}
    key = stage_call_key(services, stage, inputs)  # a first stage reads no earlier stage's frames
    settings = services.settings
    prepare_feeds(Checkpoints(settings.checkpoints_dir), key, stage, MediaStore(settings.media_root), resume=False)
    return HeadStart(stage_call(services, job_id, stage, inputs, key), stage, services.runner.run)


def _frames_bytes(values: Iterable[JsonValue]) -> int:
    """The bytes of the per-frame artifacts among a call's outputs (their descriptors' ``size_bytes``)."""
    return sum(
        v["size_bytes"] for v in values if is_frames(v) and isinstance(v, dict) and isinstance(v["size_bytes"], int)
    )


def _stage_end(job_id: str, stage: ResolvedStage, result: CallResult, ok: bool) -> StageEnd:
    return StageEnd(
        job_id=job_id,
        stage_index=stage.index,
        plugin=stage.plugin,
        tool=stage.stage.tool,
        duration_ms=round(result.duration_ms),
        ok=ok,
        result_size_bytes=result.result_size_bytes,
        peak_memory_mb=result.peak_memory_mb,
    )
