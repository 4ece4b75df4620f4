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
import json
import threading
from pathlib import Path
from typing import Literal, TypedDict, cast

from prefect import Flow, Task, flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun, State, TaskRun
from prefect.context import FlowRunContext
from prefect.flows import FlowStateHook
from prefect.states import Failed
from prefect.utilities.annotations import quote
from pydantic import JsonValue, ValidationError

from forgeflow.canonical import JsonArrayField, JsonObject, JsonObjectField, canonical_json
from forgeflow.events.models import JobStatusEvent, abnormal_end
from forgeflow.jobs.stages import JobRun, PipelineFailed, current_services, execute
from forgeflow.pipeline import outcome as job_end
from forgeflow.pipeline.definition import PipelineDefinition
from forgeflow.pipeline.outcome import EndReason
from forgeflow.pipeline.validation import ResolvedStage, definition_error
from forgeflow.redact import install_log_redaction

# A cold flow-run process (`python -m prefect.engine`) has no entry point of ours: it loads this module.
install_log_redaction()

FLOW_NAME = "forgeflow-pipeline"
# Prefect's own timeout only backstops the runner's hard kill.
_BACKSTOP_GRACE_S = 30.0

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


# --- one Prefect task per stage ---------------------------------------------------------------


#: A stage's Prefect task: the stage's inputs in, its outputs out.
StageTask = Task[[JsonObject], JsonObject]


def _run_stage_as_task(run: JobRun, stage: ResolvedStage, inputs: JsonObject) -> JsonObject:
    """A stage as a Prefect task, named so the UI shows index, plugin and tool; its state hooks make
    the stage's transitions (start, end, error) on the run."""
    label = f"stage-{stage.index}: {stage.name}"

    def on_running(tsk: StageTask, task_run: TaskRun, state: State[JsonObject]) -> None:
        run.stage_started(stage, attempt=getattr(task_run, "run_count", 1) or 1)

    def on_completion(tsk: StageTask, task_run: TaskRun, state: State[JsonObject]) -> None:
        run.stage_completed(stage)

    def on_failure(tsk: StageTask, task_run: TaskRun, state: State[JsonObject]) -> None:
        run.stage_failed(stage, state.message)

    def run_stage(stage_inputs: JsonObject) -> JsonObject:
        return run.call_stage(stage, stage_inputs)

    stage_task: StageTask = task(
        name=label,
        task_run_name=label,
        retries=stage.stage.retries,
        # Prefect can only interrupt the main thread: in the engine's job threads the runner's own
        # hard kill is the one timeout (and Prefect would warn about it at every stage).
        # (the runner's timeout counts from the last progress, up to the host's cap: so does the backstop)
        timeout_seconds=max(stage.timeout_s, run.services.settings.max_stage_timeout_s) + _BACKSTOP_GRACE_S
        if threading.current_thread() is threading.main_thread()
        else None,
        cache_policy=NO_CACHE,
        persist_result=False,
        on_running=[on_running],
        on_completion=[on_completion],
        on_failure=[on_failure],
    )(run_stage)
    return stage_task(_unwalked(inputs))


def _unwalked(value: JsonObject) -> JsonObject:
    """A stage's inputs, or a flow's envelope, as Prefect should pass them on: untouched.

    Prefect walks a task's arguments (twice per stage) and a flow's return value looking for futures
    to resolve and to record as dependencies: every frame of a clip's detections, poses and actions,
    ~0.5 s of a 64-frame job's tail. They hold none. ``quote`` stops the walk; Prefect hands the
    task the dict itself, and :mod:`forgeflow.jobs.executor` unwraps the flow's return (hence the cast)."""
    return cast("JsonObject", quote(value))


# --- flow-level hooks: the terminal message when the body could not send it -------------------


#: What the pipeline flow returns: the result envelope, or the Failed state carrying it (Prefect makes a
#: state that a flow returns its flow run's final state).
FlowResult = JsonObject | State[JsonObject]


def _flow_ended_abnormally(status: Literal["crashed", "cancelled"]) -> FlowStateHook[..., FlowResult]:
    def hook(flow: Flow[..., FlowResult], flow_run: FlowRun, state: State[FlowResult]) -> None:  # passed by name
        if str(flow_run.id) in _ended_runs:
            return  # the body already sent the job's terminal message (a cancel, say)
        run = _active_runs.pop(str(flow_run.id), None)
        job_id = (flow_run.parameters or {}).get("job_id") or (run.job_id if run else str(flow_run.id))
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


#: Largest flow-run parameters passed inline (canonical JSON). Prefect's server refuses more than
#: ``PREFECT_SERVER_API_MAX_PARAMETER_SIZE`` (512 KiB by default); what is larger goes in a file.
INLINE_PARAMETERS_MAX = 256 * 1024


class FlowParameters(TypedDict, total=False):
    """The parameters of a job's flow run (:func:`pipeline_flow`'s)."""

    pipeline: JsonObject | list[JsonValue] | None
    input: JsonObject | None
    job_id: str
    parameters_file: str


def flow_parameters(
    pipeline: JsonObject | list[JsonValue] | None, input_data: JsonObject, job_id: str, spill_dir: Path
) -> FlowParameters:
    """The parameters of a job's flow run: ``{pipeline, input, job_id}`` when they are small enough,
    else ``{job_id, parameters_file}`` naming ``spill_dir/parameters.json`` (the job's folder), so a
    job input of any size the API accepts reaches its flow run."""
    text = canonical_json({"pipeline": pipeline, "input": input_data})
    if len(text.encode()) <= INLINE_PARAMETERS_MAX:
        return {"pipeline": pipeline, "input": input_data, "job_id": job_id}
    spill_dir.mkdir(parents=True, exist_ok=True)
    path = spill_dir / "parameters.json"
    path.write_text(text, encoding="utf-8")
    return {"job_id": job_id, "parameters_file": str(path)}


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"job-{flow_run.parameters.get('job_id') or flow_run.id}"


@flow(
    name=FLOW_NAME,
    flow_run_name=_run_name,
    persist_result=False,
    validate_parameters=False,
    on_crashed=[_flow_ended_abnormally("crashed")],
    on_cancellation=[_flow_ended_abnormally("cancelled")],
)
def pipeline_flow(
    pipeline: JsonObjectField | JsonArrayField | None = None,
    input: JsonObjectField | None = None,
    job_id: str | None = None,
    parameters_file: str | None = None,
) -> FlowResult:
    """Run a ForgeFlow pipeline: one task per stage, stage N's outputs feeding stage N+1.

    Parameters are plain JSON so the Prefect UI, schedules and the API can all start it:
    ``pipeline`` is a pipeline definition (or the seed's list of stages), ``input`` the job input
    (``{"media": "sha256:..."}``), ``job_id`` the ForgeFlow job (one is made when absent).
    ``parameters_file`` names a JSON file on this host holding ``{pipeline, input}`` instead: what
    :func:`flow_parameters` passes when they are too large for a flow run's parameters.
    Returns the result envelope; after a failed stage the flow run ends Failed and its state
    carries :class:`PipelineFailed`, whose ``envelope`` holds the partial result.
    """
    services = current_services()
    context = FlowRunContext.get()
    this_run = context.flow_run if context is not None else None
    assert this_run is not None  # the flow's body runs in its flow run
    flow_run_id = str(this_run.id)
    job_id = job_id or flow_run_id
    if parameters_file is not None:
        spilled = json.loads(Path(parameters_file).read_text(encoding="utf-8"))
        pipeline, input = spilled["pipeline"], spilled["input"]
    input_data = dict(input or {})
    try:
        definition: PipelineDefinition | None = PipelineDefinition.model_validate(pipeline)
        parse_error = None
    except ValidationError as exc:
        definition, parse_error = None, definition_error(exc)
    stages = definition.stages if definition else []
    run = JobRun(job_id, services, job_end.pending_reports(stages), flow_run_id)
    # A Prefect retry of the flow run (run_count 2, 3, ...) resumes the attempt before it.
    run.resume = (this_run.run_count or 1) > 1
    _active_runs[flow_run_id] = run
    _flow_run_of_job[job_id] = flow_run_id
    # The pipeline and input ride on the running message: a run the API did not start (the Prefect
    # UI's "Run", a schedule) becomes a job with them; the store keeps them on the job, not the message.
    shown = definition.model_dump(mode="json") if definition else pipeline if isinstance(pipeline, dict) else None
    run.emit(
        JobStatusEvent(
            job_id=job_id, status="running", flow_run_id=flow_run_id, pipeline=shown, input=input_data or None
        )
    )
    try:
        return _unwalked(execute(run, definition, parse_error, input_data, _run_stage_as_task).to_dict())
    except PipelineFailed as failed:
        # An expected outcome, not a bug: end the run Failed with the envelope, without a traceback.
        return Failed(message=str(failed), data=failed)
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
