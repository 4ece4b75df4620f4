"""A job's stage loop, free of Prefect: services, the run's state, and the loop itself.

:func:`execute` validates the pipeline, then runs its stages in order, stage N's outputs feeding
stage N+1, and ends the job through :mod:`forgeflow.pipeline.outcome` (with the result drawn on the
job's input media, :mod:`forgeflow.jobs.annotate`, when it holds something to draw). How one stage
runs is given to it: :mod:`forgeflow.jobs.flow` runs each stage as a Prefect task whose state hooks call
:meth:`JobRun.stage_started` / :meth:`~JobRun.stage_completed` / :meth:`~JobRun.stage_failed`;
:func:`run_stage_directly` does the same in-process (the fast tests use it). Either way the same
events are emitted in the same order.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any

from forgeflow.canonical import canonical_json
from forgeflow.engine.runners.base import CallResult, FramesRead, Progress, Runner, ToolCall
from forgeflow.events.models import (
    JobStatusEvent,
    PipelineError,
    StageEnd,
    StageProgress,
    StageStart,
    StageWarning,
    progress,
)
from forgeflow.events.sinks import EventSink, sink_from_settings
from forgeflow.jobs.media_sync import MediaSync, media_refs
from forgeflow.jobs.overlap import end_feeds, prepare_feeds, streamed_fields, wait_for_feeds
from forgeflow.jobs.supervise import checkpoint_path
from forgeflow.pipeline import outcome as job_end
from forgeflow.pipeline.definition import PipelineDefinition
from forgeflow.pipeline.outcome import AnnotatedMedia, EndReason, JobStatus, ResultEnvelope, StageReport
from forgeflow.pipeline.validation import PipelineValidationError, ResolvedStage, validate_pipeline
from forgeflow.plugins.cache import job_cache_dir
from forgeflow.plugins.checkpoints import Checkpoints, call_key
from forgeflow.plugins.errors import ForgeFlowError, MediaError
from forgeflow.plugins.frames import chunk_refs, frame_fields, is_frames, is_live, live_feed
from forgeflow.plugins.lifecycle import LifecycleStore
from forgeflow.plugins.media import MediaStore
from forgeflow.plugins.registry import PluginRegistry
from forgeflow.settings import Settings, get_settings

#: error_type of a stage (and a job) stopped by a cancel request.
CANCELLED = EndReason.CANCELLED.value
#: Set in the engine's own process: its flow runs use its pools directly.
ENGINE_PROCESS_ENV = "FORGEFLOW_ENGINE_PROCESS"


# --- services: what a job run uses, built once per process ------------------------------------


@dataclass
class Services:
    settings: Settings
    registry: PluginRegistry
    runner: Runner
    sink: EventSink
    #: Fetches the media a stage reads from the API and uploads what it made (a host apart from the
    #: API: ``FORGEFLOW_API_URL`` set); None: this host's media store is the one (embedded mode).
    media_sync: MediaSync | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None, sink: EventSink | None = None) -> Services:
        """Services for a job run in this process. Stage calls go to this host's engine when one is
        running (its warm workers), else to a runner of this process's own."""
        from forgeflow.engine.runners import get_runner

        settings = settings or get_settings()
        registry = PluginRegistry.discover(LifecycleStore(settings.lifecycle_db))
        runner = _engine_runner(settings) or get_runner(settings, registry)
        sink = sink or sink_from_settings(settings)
        return cls(settings, registry, runner, sink, MediaSync.from_settings(settings))

    def is_cancelled(self, job_id: str) -> bool:
        """Whether the job was cancelled (runners that support cancelling know)."""
        check = getattr(self.runner, "is_cancelled", None)
        return bool(check and check(job_id))

    def close(self) -> None:
        self.runner.close()
        self.sink.close()
        if self.media_sync is not None:
            self.media_sync.close()


def _engine_runner(settings: Settings) -> Runner | None:
    if not settings.use_engine or settings.runner != "process" or os.environ.get(ENGINE_PROCESS_ENV):
        return None
    from forgeflow.engine.client import EngineClient, EngineRunner

    client = EngineClient(settings.engine_socket_path)
    return EngineRunner(client) if client.alive() else None


_services_var: contextvars.ContextVar[Services | None] = contextvars.ContextVar("forgeflow_services", default=None)
_default_services: Services | None = None
_default_lock = threading.Lock()


def current_services() -> Services:
    """The services of this context (see :func:`use_services`), else the process-wide default."""
    services = _services_var.get()
    if services is not None:
        return services
    global _default_services
    with _default_lock:
        if _default_services is None:
            _default_services = Services.from_settings()
        return _default_services


@contextlib.contextmanager
def use_services(services: Services) -> Iterator[Services]:
    token = _services_var.set(services)
    try:
        yield services
    finally:
        _services_var.reset(token)


# --- one job run ------------------------------------------------------------------------------


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

    def emit(self, event: Any) -> None:
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

    def call_stage(self, stage: ResolvedStage, inputs: dict[str, Any]) -> dict[str, Any]:
        """The stage's tool call through the runner: its outputs, or :class:`StageFailed`. A job that
        resumes takes the outputs of a call that completed in an earlier attempt instead."""
        self._sync_media(stage, inputs)
        settings = self.services.settings
        entry = self.services.registry.resolve(stage.plugin)
        key = self.call_keys[stage.index] = call_key(
            stage.plugin, entry.version or "", stage.tool.name, stage.config, self._keyed(inputs)
        )
        if self.resume and (done := self._completed_before(key)) is not None:
            self.outcomes[stage.index] = CallResult(ok=True, outputs=done)
            self.reports[stage.index].from_checkpoint = True
            with self._lock:
                self.artifact_bytes += sum(v["size_bytes"] for v in done.values() if is_frames(v))
            # its readers get its outputs whole when its feeds end (nothing is journalled this time)
            prepare_feeds(self.checkpoints, key, stage, MediaStore(settings.media_root), resume=False)
            self.feeding.setdefault(stage.index, threading.Event()).set()
            return done
        prepare_feeds(self.checkpoints, key, stage, MediaStore(settings.media_root), self.resume)
        self.feeding.setdefault(stage.index, threading.Event()).set()
        call = ToolCall(
            plugin=stage.plugin,
            tool=stage.tool.name,
            config=stage.config,
            inputs=inputs,
            timeout_s=stage.timeout_s,
            memory_limit_mb=stage.stage.memory_limit_mb or settings.stage_memory_limit_mb,
            job_id=self.job_id,
            stage_index=stage.index,
            runner=stage.stage.effective_runner,
            artifact_budget_bytes=max(0, settings.max_artifact_bytes_per_job - self.artifact_bytes),
            checkpoint_key=key,
            resume=self.resume,
        )
        self.call_started[stage.index] = time.monotonic()
        result = self.services.runner.run(call, lambda update: self.stage_progress(stage, update))
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
            self.artifact_bytes += sum(v["size_bytes"] for v in (result.outputs or {}).values() if is_frames(v))
        self.checkpoints.mark_done(key, result.outputs or {})
        self._sync_media(stage, result.outputs or {}, made_by=result)
        return result.outputs or {}

    def _keyed(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The inputs as a call key sees them: a per-frame output of an earlier stage (finished or still
        being written) by the call that makes it, so overlapping or not, the key is the same."""
        return {
            name: {"$frames_of": self.call_keys[self.field_stage[name]], "field": name}
            if (is_frames(value) or is_live(value)) and name in self.field_stage
            else value
            for name, value in inputs.items()
        }

    def _completed_before(self, key: str) -> dict[str, Any] | None:
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

    def _sync_media(self, stage: ResolvedStage, values: dict[str, Any], made_by: CallResult | None = None) -> None:
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


def _write_checkpoint(settings: Settings, job_id: str, result: dict[str, Any], reports: list[StageReport]) -> None:
    """Partial results on disk, so a job killed without hooks still reports what it had."""
    path = checkpoint_path(settings, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    data = {"partial_result": result, "stages": [r.model_dump() for r in reports]}
    tmp.write_text(canonical_json(data), encoding="utf-8")
    tmp.replace(path)


#: Runs one stage of a run with its inputs and returns its outputs (raises when it fails).
StageDriver = Callable[[JobRun, ResolvedStage, dict[str, Any]], dict[str, Any]]


def run_stage_directly(run: JobRun, stage: ResolvedStage, inputs: dict[str, Any]) -> dict[str, Any]:
    """A stage in this thread, without Prefect: the same transitions a Prefect task's hooks make."""
    run.stage_started(stage)
    try:
        outputs = run.call_stage(stage, inputs)
    except Exception as exc:
        run.stage_failed(stage, str(exc))
        raise
    run.stage_completed(stage)
    return outputs


def _feeding(run: JobRun, stage: ResolvedStage, inputs: dict[str, Any], run_stage: StageDriver) -> dict[str, Any]:
    """A stage that a next one reads as it goes: when its call ends, so do its feeds."""
    try:
        outputs = run_stage(run, stage, inputs)
    except BaseException as exc:
        call = run.outcomes.get(stage.index)
        end_feeds(run.checkpoints, run.call_keys.get(stage.index), stage, (call.error if call else None) or str(exc))
        raise
    end_feeds(run.checkpoints, run.call_keys.get(stage.index), stage, None, outputs)
    return outputs


def execute(
    run: JobRun,
    definition: PipelineDefinition | None,
    parse_error: PipelineValidationError | None,
    input_data: dict[str, Any],
    run_stage: StageDriver = run_stage_directly,
) -> ResultEnvelope:
    """Validate, run every stage with ``run_stage``, and end the job: the success envelope, or
    :class:`PipelineFailed` carrying the failure envelope (the terminal message is sent either way)."""
    services = run.services
    try:
        if definition is None:
            raise parse_error or PipelineValidationError([])
        validated = validate_pipeline(definition, input_data, services.registry, services.settings)
        run.resume = run.resume or definition.resume
    except PipelineValidationError as exc:
        for issue in reversed(exc.issues):
            if issue.stage_index is not None and issue.stage_index < len(run.reports):
                report = run.reports[issue.stage_index]
                report.error, report.error_type = issue.message, issue.error_type
        envelope = job_end.failed(
            run.reports, error=exc.message, error_type=exc.error_type, stage_failed=exc.first_stage
        )
        first = exc.issues[0]
        run.emit(
            PipelineError(
                job_id=run.job_id,
                stage_index=first.stage_index,
                plugin=first.plugin,
                tool=first.tool,
                error=exc.message,
                error_type=exc.error_type,
            )
        )
        run.finish("failed", envelope)
        raise PipelineFailed(envelope) from None

    for stage in validated.stages:  # reported under the plugin's canonical name, whatever alias it was given
        if stage.index < len(run.reports):
            run.reports[stage.index].plugin = stage.plugin
    context = dict(input_data)
    result: dict[str, Any] = {}
    stages = validated.stages
    # A stage that a next one may read while it writes (overlap.streamed_fields) runs in a thread of
    # its own; every other stage runs here, as it always did.
    pool = ThreadPoolExecutor(max_workers=len(stages), thread_name_prefix="forgeflow-stage")
    started: list[tuple[ResolvedStage, Future[dict[str, Any]] | None]] = []
    collected = 0  # started stages whose outputs joined the context

    def collect(upto: int) -> None:
        """Wait for the started stages before ``upto`` and take their outputs (the first failure raises)."""
        nonlocal collected
        while collected < min(upto, len(started)):
            stage, future = started[collected]
            current[0] = stage
            outputs = future.result() if future is not None else pending_outputs.pop(stage.index)
            context.update(outputs)
            result.update(outputs)
            _write_checkpoint(services.settings, run.job_id, result, run.reports)
            collected += 1

    current: list[ResolvedStage] = [stages[0]]
    pending_outputs: dict[int, dict[str, Any]] = {}
    annotation: Future[tuple[AnnotatedMedia | None, str | None]] | None = None  # drawn as the stages go
    try:
        for position, stage in enumerate(stages):
            current[0] = stage
            feeds = None
            if collected < len(started):  # the previous stage still runs: may this one read it as it goes?
                producer, future = started[-1]
                fields = streamed_fields(producer, stage)
                if fields and future is not None:
                    event = run.feeding.setdefault(producer.index, threading.Event())
                    feeds = wait_for_feeds(run.checkpoints, producer, run.call_keys, event, future, fields)
                if feeds is None:
                    collect(len(started))
                else:  # what it takes from stages before its producer must be there
                    needs = set(stage.input_fields) - set(feeds)
                    makers = [i for i, (s, _) in enumerate(started[:-1]) if needs & set(s.output_fields)]
                    collect(max(makers, default=-1) + 1)
            current[0] = stage
            if services.is_cancelled(run.job_id):  # cancelled between two stages: start no other
                run.outcomes[stage.index] = CallResult.failure(CANCELLED, "cancelled by request")
                run.reports[stage.index].status = "cancelled"
                raise StageFailed(stage, run.outcomes[stage.index])
            inputs = {name: context[name] for name in stage.input_fields if name in context} | (feeds or {})
            for name in stage.output_fields:
                run.field_stage[name] = stage.index
            follower = stages[position + 1] if position + 1 < len(stages) else None
            if follower is None and (live := _drawn_live(run, stages, input_data)):
                annotation = pool.submit(contextvars.copy_context().run, _annotate_live, run, live, input_data)
            if follower is not None and streamed_fields(stage, follower):
                task = contextvars.copy_context().run
                started.append((stage, pool.submit(task, _feeding, run, stage, inputs, run_stage)))
            else:
                pending_outputs[stage.index] = _feeding(run, stage, inputs, run_stage)
                started.append((stage, None))
                collect(len(started))
        collect(len(started))
    except BaseException as exc:
        stage = current[0]
        run.stopping.set()
        running: list[Future[Any]] = [f for _, f in started if f is not None]
        futures_wait(running + ([annotation] if annotation is not None else []))
        for earlier, future in started[collected:]:  # what stages before the failed one made is kept
            if earlier.index >= stage.index or future is None:
                break
            if future.exception() is not None:  # a stage it overlapped failed first: the job failed there
                stage, exc = earlier, future.exception() or exc
                break
            result.update(future.result())
        call = run.outcomes.get(stage.index)
        error = call.error if call and not call.ok else str(exc) or type(exc).__name__
        error_type = call.error_type if call and not call.ok else type(exc).__name__
        cancelled = not isinstance(exc, Exception) or error_type == CANCELLED
        envelope = job_end.failed(
            run.reports,
            error=error or "stage failed",
            error_type=error_type or "Error",
            stage_failed=stage.index,
            partial_result=result,
            ending="cancelled" if cancelled else "failed",
        )
        run.reports = envelope.stages
        _write_checkpoint(services.settings, run.job_id, result, run.reports)
        if isinstance(exc, Exception):  # not while the process is being stopped
            envelope = _annotated(run, input_data, result, envelope)
        run.finish("cancelled" if cancelled else "failed", envelope)
        if cancelled and not isinstance(exc, Exception):
            raise
        raise PipelineFailed(envelope) from None
    finally:
        pool.shutdown(wait=False)

    made = annotation.result() if annotation is not None else (None, None)
    envelope = _annotated(run, input_data, result, job_end.succeeded(result, run.reports), made)
    run.finish("succeeded", envelope)
    return envelope


def _drawn_live(run: JobRun, stages: tuple[ResolvedStage, ...], input_data: dict[str, Any]) -> dict[str, int]:
    """The drawable outputs (``players``, ``poses``, ``actions``) and the stages that make them, when the
    job's media can be annotated while its last stage runs: each is a ``FrameStream`` its stage writes
    as a feed. Empty otherwise (the job is annotated after its stages, as before)."""
    from forgeflow.jobs.annotate import DRAWABLE_KEYS

    settings = run.services.settings
    if not settings.annotate_media or not isinstance(input_data.get("media"), str):
        return {}
    drawn = {key: run.field_stage[key] for key in DRAWABLE_KEYS if key in run.field_stage}
    streamed = all(key in frame_fields(stages[index].tool.output_model) for key, index in drawn.items())
    return drawn if streamed else {}


def _annotate_live(
    run: JobRun, drawn: dict[str, int], input_data: dict[str, Any]
) -> tuple[AnnotatedMedia | None, str | None]:
    """The job's annotated media drawn from its stages' feeds while they still write (the video is read
    and encoded alongside the last stage, not after it); (None, None) when the job stopped first."""
    from forgeflow.jobs.annotate import annotate_job

    feeds: dict[str, Any] = {}
    for key, index in drawn.items():
        ready = run.feeding.setdefault(index, threading.Event())
        while not ready.wait(0.1):
            if run.stopping.is_set():
                return None, None
        journal = run.checkpoints.journal(run.call_keys[index], key)
        if journal is None:
            return None, None
        feeds[key] = live_feed(journal)
    services = run.services
    return annotate_job(services.settings, run.job_id, input_data, feeds, services.media_sync)


def _annotated(
    run: JobRun,
    input_data: dict[str, Any],
    result: dict[str, Any],
    envelope: ResultEnvelope,
    drawn: tuple[AnnotatedMedia | None, str | None] = (None, None),
) -> ResultEnvelope:
    """The envelope with the job's annotated media (:func:`forgeflow.jobs.annotate.annotate_job`: the
    result drawn on ``input.media``, stored; ``drawn`` when it was made while the stages ran) or the
    reason it could not be made; unchanged when there is nothing to draw. Never fails the job."""
    from forgeflow.jobs.annotate import annotate_job, has_drawable

    if not has_drawable(result):
        return envelope
    services = run.services
    annotated, error = drawn
    if annotated is None:
        annotated, error = annotate_job(services.settings, run.job_id, input_data, result, services.media_sync)
    if annotated is None and error is None:
        return envelope
    return envelope.model_copy(update={"annotated_media": annotated, "annotated_media_error": error})
