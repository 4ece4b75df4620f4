"""A job's stage loop, free of Prefect: validate the pipeline, run its stages, end the job.

:func:`execute` validates the pipeline, then runs its stages in order, stage N's outputs feeding
stage N+1, and ends the job through :mod:`forgeflow.pipeline.outcome` (with the result drawn on the
job's input media, :mod:`forgeflow.jobs.annotated_media`, when its tools declare something to draw).
How one stage runs is given to it: :mod:`forgeflow.jobs.flow` runs each stage as a Prefect task whose
state hooks call :meth:`JobRun.stage_started` / :meth:`~JobRun.stage_completed` /
:meth:`~JobRun.stage_failed`; :func:`run_stage_directly` does the same in-process (the fast tests use
it). Either way the same events are emitted in the same order.

A job's services are :mod:`forgeflow.jobs.services`, its running state :mod:`forgeflow.jobs.job_run`;
their names are importable from here too, where the rest of ForgeFlow has always taken them.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

from forgeflow.canonical import JsonObject, canonical_json
from forgeflow.engine.runners.base import CallResult
from forgeflow.events.models import PipelineError
from forgeflow.jobs.annotated_media import Annotation, annotate_live, drawn_live, layers_of, with_annotated_media
from forgeflow.jobs.checkpoints import checkpoint_path
from forgeflow.jobs.job_run import CANCELLED, JobRun, PipelineFailed, StageFailed
from forgeflow.jobs.overlap import end_feeds, streamed_fields, wait_for_feeds
from forgeflow.jobs.services import ENGINE_PROCESS_ENV, Services, current_services, use_services
from forgeflow.pipeline import outcome as job_end
from forgeflow.pipeline.definition import PipelineDefinition
from forgeflow.pipeline.outcome import ResultEnvelope, StageReport
from forgeflow.pipeline.validation import PipelineValidationError, ResolvedStage, validate_pipeline
from forgeflow.settings import Settings

__all__ = [
    "CANCELLED",
    "ENGINE_PROCESS_ENV",
    "JobRun",
    "PipelineFailed",
    "Services",
    "StageDriver",
    "StageFailed",
    "current_services",
    "execute",
    "run_stage_directly",
    "use_services",
]


def _write_checkpoint(settings: Settings, job_id: str, result: JsonObject, reports: list[StageReport]) -> None:
    """Partial results on disk, so a job killed without hooks still reports what it had."""
    path = checkpoint_path(settings, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    data = {"partial_result": result, "stages": [r.model_dump() for r in reports]}
    tmp.write_text(canonical_json(data), encoding="utf-8")
    tmp.replace(path)


#: Runs one stage of a run with its inputs and returns its outputs (raises when it fails).
StageDriver = Callable[[JobRun, ResolvedStage, JsonObject], JsonObject]


def run_stage_directly(run: JobRun, stage: ResolvedStage, inputs: JsonObject) -> JsonObject:
    """A stage in this thread, without Prefect: the same transitions a Prefect task's hooks make."""
    run.stage_started(stage)
    try:
        outputs = run.call_stage(stage, inputs)
    except Exception as exc:
        run.stage_failed(stage, str(exc))
        raise
    run.stage_completed(stage)
    return outputs


def _feeding(run: JobRun, stage: ResolvedStage, inputs: JsonObject, run_stage: StageDriver) -> JsonObject:
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
    input_data: JsonObject,
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
    result: JsonObject = {}
    stages = validated.stages
    # A stage that a next one may read while it writes (overlap.streamed_fields) runs in a thread of
    # its own; every other stage runs here, as it always did.
    pool = ThreadPoolExecutor(max_workers=len(stages), thread_name_prefix="forgeflow-stage")
    started: list[tuple[ResolvedStage, Future[JsonObject] | None]] = []
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
    pending_outputs: dict[int, JsonObject] = {}
    layers = layers_of(stage.tool for stage in stages)  # what the stages' tools declare to draw on the job's media
    annotation: Future[Annotation] | None = None  # drawn as the stages go
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
            ahead = services.head_start is not None and services.head_start.stage.index == stage.index
            if services.is_cancelled(run.job_id) and not ahead:  # cancelled between two stages: start no other
                run.outcomes[stage.index] = CallResult.failure(CANCELLED, "cancelled by request")
                run.reports[stage.index].status = "cancelled"
                raise StageFailed(stage, run.outcomes[stage.index])
            inputs = {name: context[name] for name in stage.input_fields if name in context} | (feeds or {})
            for name in stage.output_fields:
                run.field_stage[name] = stage.index
            follower = stages[position + 1] if position + 1 < len(stages) else None
            if follower is None and (live := drawn_live(run, stages, layers, input_data)):
                annotation = pool.submit(contextvars.copy_context().run, annotate_live, run, live, layers, input_data)
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
        futures_wait([f for _, f in started if f is not None])
        if annotation is not None:
            futures_wait([annotation])
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
            envelope = with_annotated_media(run, input_data, result, layers, envelope)
        run.finish("cancelled" if cancelled else "failed", envelope)
        if cancelled and not isinstance(exc, Exception):
            raise
        raise PipelineFailed(envelope) from None
    finally:
        pool.shutdown(wait=False)

    made = annotation.result() if annotation is not None else (None, None)
    envelope = with_annotated_media(run, input_data, result, layers, job_end.succeeded(result, run.reports), made)
    run.finish("succeeded", envelope)
    return envelope
