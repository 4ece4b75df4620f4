"""The Prefect side: a pipeline runs as one flow run with one task per stage.

Each stage task asks the sandboxed runner to run its tool (the runner enforces the hard timeout and
the memory limit; Prefect's ``timeout_seconds`` is only a backstop). Realtime messages come from
Prefect state hooks: a task's ``on_running`` gives ``pipeline_stage_start``, ``on_completion``
gives ``pipeline_stage_end`` and ``pipeline_progress``, ``on_failure`` gives ``pipeline_stage_end``
(ok false) and ``pipeline_error``; the flow's ``on_crashed`` and ``on_cancellation`` end the job
with a terminal message when the body could not. A failed stage fails its task and the flow run
(visible in the Prefect UI) while the job's envelope still carries the partial result.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.states import Failed
from pydantic import ValidationError

from forgeflow.engine.lifecycle import LifecycleStore
from forgeflow.engine.registry import PluginRegistry
from forgeflow.engine.runners.base import CallResult, Runner, ToolCall
from forgeflow.events.models import (
    JobStatusEvent,
    PipelineError,
    StageEnd,
    StageStart,
    abnormal_end,
    progress,
)
from forgeflow.events.sinks import EventSink, sink_from_settings
from forgeflow.jobs.supervise import checkpoint_path
from forgeflow.pipeline import outcome as job_end
from forgeflow.pipeline.definition import PipelineDefinition
from forgeflow.pipeline.outcome import EndReason, JobStatus, ResultEnvelope, StageReport
from forgeflow.pipeline.validation import (
    PipelineValidationError,
    ResolvedStage,
    definition_error,
    validate_pipeline,
)
from forgeflow.plugins.cache import job_cache_dir
from forgeflow.settings import Settings, get_settings

FLOW_NAME = "forgeflow-pipeline"
#: error_type of a stage (and a job) stopped by a cancel request.
CANCELLED = EndReason.CANCELLED.value
# Prefect's own timeout only backstops the runner's hard kill.
_BACKSTOP_GRACE_S = 30.0


# --- services: what a flow run uses, built once per process -----------------------------------


@dataclass
class Services:
    settings: Settings
    registry: PluginRegistry
    runner: Runner
    sink: EventSink

    @classmethod
    def from_settings(cls, settings: Settings | None = None, sink: EventSink | None = None) -> Services:
        """Services for a flow run in this process. Stage calls go to this host's engine when one is
        running (its warm workers), else to a runner of this process's own."""
        from forgeflow.engine.runners import get_runner

        settings = settings or get_settings()
        registry = PluginRegistry.discover(LifecycleStore(settings.lifecycle_db))
        runner = _engine_runner(settings) or get_runner(settings, registry)
        return cls(settings, registry, runner, sink or sink_from_settings(settings))

    def is_cancelled(self, job_id: str) -> bool:
        """Whether the job was cancelled (runners that support cancelling know)."""
        check = getattr(self.runner, "is_cancelled", None)
        return bool(check and check(job_id))

    def close(self) -> None:
        self.runner.close()
        self.sink.close()


def _engine_runner(settings: Settings) -> Runner | None:
    if not settings.use_engine or settings.runner != "process" or os.environ.get(ENGINE_PROCESS_ENV):
        return None
    from forgeflow.engine.client import EngineClient, EngineRunner

    client = EngineClient(settings.engine_socket_path)
    return EngineRunner(client) if client.alive() else None


#: Set in the engine's own process: its flow runs use its pools directly.
ENGINE_PROCESS_ENV = "FORGEFLOW_ENGINE_PROCESS"

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
        super().__init__(
            f"stage {stage.index} ({stage.stage.plugin}.{stage.stage.tool}) failed: {result.error_type}: {result.error}"
        )
        self.stage = stage
        self.result = result


class PipelineFailed(Exception):
    """The pipeline stopped; ``envelope`` holds the error and the partial result."""

    def __init__(self, envelope: ResultEnvelope) -> None:
        super().__init__(f"{envelope.error_type}: {envelope.error}")
        self.envelope = envelope


@dataclass
class JobRun:
    """The state of one job while its flow runs (hooks read it)."""

    job_id: str
    services: Services
    reports: list[StageReport]
    flow_run_id: str | None = None
    outcomes: dict[int, CallResult] = field(default_factory=dict)
    completed: int = 0
    terminal_sent: bool = False

    def emit(self, event: Any) -> None:
        self.services.sink.emit(event)

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


_active_runs: dict[str, JobRun] = {}  # flow run id -> JobRun, for the flow-level hooks
_ended_runs: collections.OrderedDict[str, None] = collections.OrderedDict()  # flow runs whose job has ended
_ENDED_KEPT = 1000


def _mark_ended(flow_run_id: str) -> None:
    _ended_runs[flow_run_id] = None
    while len(_ended_runs) > _ENDED_KEPT:
        _ended_runs.popitem(last=False)


_flow_run_of_job: dict[str, str] = {}  # job id -> its latest flow run id in this process


def last_flow_run_id(job_id: str) -> str | None:
    """The flow run this process started for ``job_id`` (to mark it after a cancel)."""
    return _flow_run_of_job.get(job_id)


def _write_checkpoint(settings: Settings, job_id: str, result: dict[str, Any], reports: list[StageReport]) -> None:
    """Partial results on disk, so a job killed without hooks still reports what it had."""
    path = checkpoint_path(settings, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    data = {"partial_result": result, "stages": [r.model_dump() for r in reports]}
    tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


# --- stage tasks and their hooks --------------------------------------------------------------


def _stage_task(run: JobRun, stage: ResolvedStage) -> Any:
    """A Prefect task for one stage, named so the UI shows index, plugin and tool."""
    label = f"stage-{stage.index}: {stage.stage.plugin}.{stage.stage.tool}"
    report = run.reports[stage.index]

    def on_running(tsk: Any, task_run: Any, state: Any) -> None:
        report.status = "running"
        run.emit(
            StageStart(
                job_id=run.job_id,
                stage_index=stage.index,
                plugin=stage.stage.plugin,
                tool=stage.stage.tool,
                attempt=max(1, getattr(task_run, "run_count", 1) or 1),
            )
        )

    def on_completion(tsk: Any, task_run: Any, state: Any) -> None:
        outcome = run.outcomes[stage.index]
        report.status = "completed"
        run.completed += 1
        run.emit(_stage_end(run.job_id, stage, outcome, ok=True))
        run.emit(progress(run.job_id, run.completed, len(run.reports)))

    def on_failure(tsk: Any, task_run: Any, state: Any) -> None:
        outcome = run.outcomes.get(stage.index) or CallResult.failure(
            "TaskFailed", state.message or "the stage task failed"
        )
        report.status = "cancelled" if outcome.error_type == CANCELLED else "failed"
        report.error, report.error_type = outcome.error, outcome.error_type
        run.emit(_stage_end(run.job_id, stage, outcome, ok=False))
        run.emit(
            PipelineError(
                job_id=run.job_id,
                stage_index=stage.index,
                plugin=stage.stage.plugin,
                tool=stage.stage.tool,
                error=outcome.error or "stage failed",
                error_type=outcome.error_type or "Error",
            )
        )

    def run_stage(inputs: dict[str, Any]) -> dict[str, Any]:
        settings = run.services.settings
        call = ToolCall(
            plugin=stage.plugin,
            tool=stage.tool.name,
            config=stage.config,
            inputs=inputs,
            timeout_s=stage.timeout_s,
            memory_limit_mb=stage.stage.memory_limit_mb or settings.stage_memory_limit_mb,
            job_id=run.job_id,
            stage_index=stage.index,
        )
        result = run.services.runner.run(call)
        run.outcomes[stage.index] = result
        report.duration_ms = result.duration_ms
        report.result_size_bytes = result.result_size_bytes
        report.peak_memory_mb = result.peak_memory_mb
        if result.reused_outputs or result.computed_outputs:
            report.reused_outputs, report.computed_outputs = result.reused_outputs, result.computed_outputs
        if not result.ok:
            raise StageFailed(stage, result)
        return result.outputs or {}

    # mypy cannot pick one of task()'s overloads for hooks given as lists: the call is checked at run time.
    return task(  # type: ignore[call-overload]
        run_stage,
        name=label,
        task_run_name=label,
        retries=stage.stage.retries,
        # Prefect can only interrupt the main thread: in the engine's job threads the runner's own
        # hard kill is the one timeout (and Prefect would warn about it at every stage).
        timeout_seconds=stage.timeout_s + _BACKSTOP_GRACE_S
        if threading.current_thread() is threading.main_thread()
        else None,
        cache_policy=NO_CACHE,
        persist_result=False,
        on_running=[on_running],
        on_completion=[on_completion],
        on_failure=[on_failure],
    )


def _stage_end(job_id: str, stage: ResolvedStage, outcome: CallResult, ok: bool) -> StageEnd:
    return StageEnd(
        job_id=job_id,
        stage_index=stage.index,
        plugin=stage.stage.plugin,
        tool=stage.stage.tool,
        duration_ms=round(outcome.duration_ms),
        ok=ok,
        result_size_bytes=outcome.result_size_bytes,
        peak_memory_mb=outcome.peak_memory_mb,
    )


# --- flow-level hooks: the terminal message when the body could not send it -------------------


def _flow_ended_abnormally(status: Literal["crashed", "cancelled"]) -> Any:
    def hook(flw: Any, flow_run: Any, state: Any) -> None:
        if str(flow_run.id) in _ended_runs:
            return  # the body already sent the job's terminal message (a cancel, say)
        run = _active_runs.pop(str(flow_run.id), None)
        job_id = (flow_run.parameters or {}).get("job_id") or (run.job_id if run else None)
        if not job_id:
            return
        sink = run.services.sink if run else current_services().sink
        message = state.message or f"flow run {status}"
        error_type = EndReason.FLOW_RUN_CRASHED if status == "crashed" else EndReason.FLOW_RUN_CANCELLED
        reports = run.reports if run else []
        envelope = job_end.ended_abnormally(reports, status=status, error=message, error_type=error_type)
        for event in abnormal_end(
            job_id,
            status=status,
            envelope=envelope,
            stage=job_end.running_stage(reports),
            flow_run_id=str(flow_run.id),
        ):
            sink.emit(event)
        if run is not None:
            run.terminal_sent = True
        _mark_ended(str(flow_run.id))
        sink.flush(timeout=5.0)

    return hook


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"job-{flow_run.parameters.get('job_id') or 'adhoc'}"


@flow(
    name=FLOW_NAME,
    flow_run_name=_run_name,
    persist_result=False,
    validate_parameters=False,
    on_crashed=[_flow_ended_abnormally("crashed")],
    on_cancellation=[_flow_ended_abnormally("cancelled")],
)
def pipeline_flow(
    pipeline: dict[str, Any], input: dict[str, Any] | None = None, job_id: str | None = None
) -> dict[str, Any]:
    """Run a ForgeFlow pipeline: one task per stage, stage N's outputs feeding stage N+1.

    Parameters are plain JSON so the Prefect UI, schedules and the API can all start it:
    ``pipeline`` is a pipeline definition (or the seed's list of stages), ``input`` the job input
    (``{"media": "sha256:..."}``), ``job_id`` the ForgeFlow job (one is made when absent).
    Returns the result envelope; after a failed stage the flow run ends Failed and its state
    carries :class:`PipelineFailed`, whose ``envelope`` holds the partial result.
    """
    services = current_services()
    job_id = job_id or uuid.uuid4().hex
    input_data = dict(input or {})
    flow_run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    try:
        definition: PipelineDefinition | None = PipelineDefinition.model_validate(pipeline)
        parse_error = None
    except ValidationError as exc:
        definition, parse_error = None, definition_error(exc)
    stages = definition.stages if definition else []
    run = JobRun(job_id, services, job_end.pending_reports(stages), flow_run_id)
    _active_runs[flow_run_id] = run
    _flow_run_of_job[job_id] = flow_run_id
    run.emit(JobStatusEvent(job_id=job_id, status="running", flow_run_id=flow_run_id))
    try:
        return _execute(run, definition, parse_error, input_data).to_dict()
    except PipelineFailed as failed:
        # An expected outcome, not a bug: end the run Failed with the envelope, without a traceback.
        return Failed(message=str(failed), data=failed)  # type: ignore[return-value]
    except Exception as exc:  # a bug of ours must still end the job with a terminal message
        run.finish(
            "failed",
            job_end.failed(
                run.reports, error=f"internal error: {exc}", error_type=type(exc).__name__, stage_failed=None
            ),
        )
        raise
    finally:
        if run.terminal_sent:
            _active_runs.pop(flow_run_id, None)
            _mark_ended(flow_run_id)


def _execute(
    run: JobRun,
    definition: PipelineDefinition | None,
    parse_error: PipelineValidationError | None,
    input_data: dict[str, Any],
) -> ResultEnvelope:
    services = run.services
    try:
        if definition is None:
            raise parse_error or PipelineValidationError([])
        validated = validate_pipeline(definition, input_data, services.registry, services.settings)
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

    context = dict(input_data)
    result: dict[str, Any] = {}
    for stage in validated.stages:
        inputs = {name: context[name] for name in stage.input_fields if name in context}
        try:
            if services.is_cancelled(run.job_id):  # cancelled between two stages: start no other
                run.outcomes[stage.index] = CallResult.failure(CANCELLED, "cancelled by request")
                run.reports[stage.index].status = "cancelled"
                raise StageFailed(stage, run.outcomes[stage.index])
            outputs = _stage_task(run, stage)(inputs)
        except BaseException as exc:
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
            run.finish("cancelled" if cancelled else "failed", envelope)
            if cancelled and not isinstance(exc, Exception):
                raise
            raise PipelineFailed(envelope) from None
        context.update(outputs)
        result.update(outputs)
        _write_checkpoint(services.settings, run.job_id, result, run.reports)

    envelope = job_end.succeeded(result, run.reports)
    run.finish("succeeded", envelope)
    return envelope
