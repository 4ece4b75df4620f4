"""``/v1/jobs``: submit (inline pipeline, saved template, legacy single plugin), read, list, cancel."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Response, Security
from fastapi.concurrency import run_in_threadpool
from pydantic import JsonValue

from forgeflow.api.auth import Principal, Scope, forbidden
from forgeflow.api.deps import ApiState, ScopedRoute, authorize, get_state, within_submission_quota
from forgeflow.api.errors import ApiError, ApiErrorType, not_found
from forgeflow.api.models import (
    JOB_ID_PATTERN,
    MAX_POSITION,
    NO_NUL,
    CancelResult,
    ErrorBody,
    EventList,
    JobAccepted,
    JobCreate,
    JobList,
    JobPipelineView,
    JobView,
    RawPipeline,
)
from forgeflow.api.reuse import work_key
from forgeflow.api.routers.views import job_summary, job_view, pipeline_view
from forgeflow.api.store import Conflict
from forgeflow.api.store.rows import JobRow
from forgeflow.canonical import JsonObject, canonical_json
from forgeflow.pipeline.definition import PipelineDefinition, raw_stages
from forgeflow.pipeline.outcome import JobStatus, is_terminal
from forgeflow.pipeline.validation import (
    PipelineValidationError,
    parse_definition,
    validate_pipeline,
)
from forgeflow.plugins.errors import MediaError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=ScopedRoute)

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API token."},
    404: {"model": ErrorBody, "description": "Unknown job or template."},
}


def validation_error(exc: PipelineValidationError, *, prefix: str, legacy: bool = False) -> ApiError:
    """A PipelineValidationError as a 422 whose ``field`` points into the request body."""
    issues = [i.model_dump() for i in exc.issues]
    first = issues[0] if issues else {}
    field = None
    if first:
        name = first.get("field")
        kind = first.get("error_type")
        if legacy:
            if kind in ("UnknownPlugin", "PluginUnavailable"):
                field = "plugin_id"
            elif kind == "UnknownTool":
                field = "tool_name"
            elif kind in ("MissingInput", "InputError") and name:
                field = f"input.{name}"
            else:
                field = name or "plugin_id"
        elif name and (kind == "InputError" or (kind == "MissingInput" and not first.get("stage_index"))):
            field = f"input.{name}"  # a job input value, or one the first stage needs from the job input
        else:
            parts = [prefix]
            if first.get("stage_index") is not None:
                parts.append(str(first["stage_index"]))
            if name:
                parts.append(name)
            field = ".".join(parts)
    return ApiError(422, exc.message, exc.error_type, field=field, issues=issues)


def check_cheap_limits(state: ApiState, pipeline: RawPipeline, input_data: Mapping[str, JsonValue] | None) -> None:
    """Limits that cost nothing to check, before the pipeline is parsed and validated."""
    settings = state.settings
    stages = raw_stages(pipeline)
    if len(stages) > settings.max_stages:
        raise ApiError(
            422,
            f"{len(stages)} stages is over the limit of {settings.max_stages} (FORGEFLOW_MAX_STAGES)",
            ApiErrorType.REQUEST_VALIDATION,
            field="pipeline",
        )
    size = len(canonical_json(input_data or {}).encode())
    if size > settings.max_job_input_bytes:
        raise ApiError(
            422,
            f"the job input is {size} bytes as JSON, over the limit of {settings.max_job_input_bytes} "
            "(FORGEFLOW_MAX_JOB_INPUT_BYTES): put large data in the media store (POST /v1/media) and pass its ref",
            ApiErrorType.REQUEST_VALIDATION,
            field="input",
        )


def check_media(state: ApiState, media: Any) -> None:
    """The job's media exists where a stage will look for it: a stored ref, or a file inside an allowed
    media root (422 naming ``input.media`` now, rather than a stage failing seconds later)."""
    try:
        state.media.resolve(media, input_roots=state.settings.media_input_roots)
    except MediaError as exc:
        raise ApiError(422, exc.message, exc.error_type, field="input.media") from None


def parse_pipeline(raw: JsonObject | None, *, prefix: str, list_form: bool = False) -> PipelineDefinition:
    """``raw`` parsed, or a 422 whose field starts with ``prefix``; ``list_form``: ``raw`` wraps the
    list of stages the user sent as ``prefix`` (a problem with that list names ``prefix`` alone)."""
    try:
        return parse_definition(raw, list_named_by_caller=list_form)
    except PipelineValidationError as exc:
        raise validation_error(exc, prefix=prefix) from None


@router.post(
    "",
    status_code=202,
    response_model=JobAccepted,
    summary="Submit a job",
    responses={
        **ERRORS,
        200: {"model": JobAccepted, "description": "The same body was submitted before with this job_id."},
        409: {"model": ErrorBody, "description": "job_id already used with a different body."},
        413: {"model": ErrorBody, "description": "Request body too large."},
        422: {"model": ErrorBody, "description": "Malformed request or invalid pipeline (nothing is stored)."},
        429: {
            "model": ErrorBody,
            "description": "The token's submission rate is used up: retry after `Retry-After` s.",
        },
    },
    dependencies=[Depends(within_submission_quota)],
)
async def submit_job(
    body: JobCreate,
    response: Response,
    state: ApiState = Depends(get_state),
    principal: Principal = Security(authorize, scopes=[Scope.RUN]),
) -> JobAccepted:
    """Validates the pipeline against the installed plugins and the job input, stores the job as
    `queued` and returns at once (202). The job runs as its own Prefect flow run; follow it on
    `GET /v1/jobs/{job_id}` or `WS /v1/ws/jobs/{job_id}`."""
    forms = [name for name in ("pipeline", "pipeline_id", "plugin_id") if getattr(body, name) is not None]
    if not forms:
        raise ApiError(
            422,
            "give the stages in 'pipeline', a saved template in 'pipeline_id', "
            "or a single plugin with 'plugin_id' and 'tool_name'",
            ApiErrorType.REQUEST_VALIDATION,
            field="pipeline",
        )
    if len(forms) > 1:
        raise ApiError(
            422,
            f"give only one of 'pipeline', 'pipeline_id', 'plugin_id' (got {', '.join(forms)})",
            ApiErrorType.REQUEST_VALIDATION,
            field=forms[1],
        )
    form = forms[0]
    if form != "plugin_id":
        for name in ("tool_name", "config"):
            if getattr(body, name) is not None:
                raise ApiError(
                    422,
                    f"'{name}' belongs to the legacy form with 'plugin_id'",
                    ApiErrorType.REQUEST_VALIDATION,
                    field=name,
                )
    check_cheap_limits(state, body.pipeline, body.input)
    template_id = None
    legacy = False
    if form == "pipeline":
        if isinstance(body.pipeline, list):
            listed: JsonObject = {"stages": body.pipeline}
            if body.timeout_seconds is not None:
                listed["timeout_seconds"] = body.timeout_seconds
            if body.description is not None:
                listed["description"] = body.description
            raw: JsonObject | None = listed
        elif body.timeout_seconds is not None or body.description is not None:
            raise ApiError(
                422,
                "with a pipeline object, put 'timeout_seconds' and 'description' inside it",
                ApiErrorType.REQUEST_VALIDATION,
                field="timeout_seconds",
            )
        else:
            raw = body.pipeline
        definition = parse_pipeline(raw, prefix="pipeline", list_form=isinstance(body.pipeline, list))
        source = "inline"
    elif form == "pipeline_id":
        if body.timeout_seconds is not None or body.description is not None:
            raise ApiError(
                422,
                "a template's timeout is part of the template",
                ApiErrorType.REQUEST_VALIDATION,
                field="timeout_seconds",
            )
        template = await run_in_threadpool(state.store.get_template, body.pipeline_id or "")
        if template is None:
            raise not_found("pipeline", body.pipeline_id or "", "list them with GET /v1/pipelines")
        definition = PipelineDefinition.model_validate(template["definition"])
        template_id = template["id"]
        source = "template"
    else:
        if body.tool_name is None:
            raise ApiError(
                422,
                "the legacy form needs 'tool_name' with 'plugin_id'",
                ApiErrorType.REQUEST_VALIDATION,
                field="tool_name",
            )
        stage: JsonObject = {"plugin": body.plugin_id, "tool": body.tool_name, "config": body.config or {}}
        raw = {"stages": [stage]}
        if body.timeout_seconds is not None:
            raw["timeout_seconds"] = body.timeout_seconds
        definition = parse_pipeline(raw, prefix="pipeline")
        source = "legacy"
        legacy = True

    job, created = await run_in_threadpool(
        _store_submission,
        state,
        body,
        definition,
        source=source,
        template_id=template_id,
        legacy=legacy,
        created_by=principal.name,
    )
    return _accepted(state, response, job, created)


def _store_submission(
    state: ApiState,
    body: JobCreate,
    definition: PipelineDefinition,
    *,
    source: str,
    template_id: str | None,
    legacy: bool,
    created_by: str | None,
) -> tuple[JobRow, bool]:
    """Validate a submission against the installed plugins, check its media, and store it (or find
    it stored): all in one worker thread, as a hop to the threadpool and back costs about as much as
    any one of these steps for a small job."""
    try:
        validated = validate_pipeline(definition, body.input, state.registry, state.settings)
    except PipelineValidationError as exc:
        raise validation_error(exc, prefix="pipeline", legacy=legacy) from None
    if "media" in validated.job_input_fields:
        check_media(state, body.input.get("media"))
    pipeline = validated.canonical_definition().model_dump(mode="json")
    request: JsonObject = {"source": source, "pipeline_id": template_id, "pipeline": pipeline, "input": body.input}
    if body.reuse:  # said only when set: a submission without it keeps its request hash
        request["reuse"] = True
    try:
        return state.store.create_job(
            job_id=body.job_id or f"job-{uuid.uuid4().hex}",
            pipeline=pipeline,
            input_data=body.input,
            request_hash=hashlib.sha256(canonical_json(request).encode()).hexdigest(),
            source=source,
            template_id=template_id,
            created_by=created_by,
            work_key=job_work_key(state, pipeline, body.input),
            reuse=body.reuse,
            publish=state.publish,
        )
    except Conflict as exc:
        raise ApiError(409, str(exc), ApiErrorType.CONFLICT, field="job_id") from None


def job_work_key(state: ApiState, pipeline: Mapping[str, JsonValue], input_data: Mapping[str, JsonValue]) -> str | None:
    """The job's work key (:mod:`forgeflow.api.reuse`); None when its media cannot be read here."""
    try:
        return work_key(pipeline, input_data, state.registry, state.media, state.settings.media_input_roots)
    except (MediaError, OSError):
        return None


def _accepted(state: ApiState, response: Response, job: JobRow, created: bool) -> JobAccepted:
    """The answer to a stored submission (202 when it made the job, 200 when it was there), the
    launcher woken for a new one."""
    if created and state.launcher is not None:
        state.launcher.wake()
    job_id = job["id"]
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{quote(job_id, safe='')}"
    return JobAccepted(
        job_id=job_id,
        status=job["status"],
        created=created,
        pipeline_id=job["template_id"],
        created_by=job["created_by"],
        retry_of=job["retry_of"],
        reused_from=job.get("reused_from"),
        links={
            "self": f"/v1/jobs/{job_id}",
            "pipeline": f"/v1/jobs/{job_id}/pipeline",
            "events": f"/v1/jobs/{job_id}/events",
            "websocket": f"/v1/ws/jobs/{job_id}",
            "cancel": f"/v1/jobs/{job_id}/cancel",
            "outputs": f"/v1/jobs/{job_id}/outputs",
        },
    )


@router.get("", response_model=JobList, summary="List jobs", responses=ERRORS)
async def list_jobs(
    status: list[JobStatus] | None = Query(None, description="Only jobs in these states (repeat to give several)."),
    pipeline_id: str | None = Query(None, max_length=200, pattern=NO_NUL, description="Only jobs of this template."),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_POSITION),
    state: ApiState = Depends(get_state),
) -> JobList:
    """Newest first."""
    rows, total = await run_in_threadpool(state.store.list_jobs, list(status or []), limit, offset, pipeline_id)
    return JobList(
        items=[job_summary(r) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
    )


JobIdPath = Path(..., min_length=1, max_length=128, pattern=NO_NUL, description="The job id.")


async def _job(state: ApiState, job_id: str) -> JobRow:
    job = await run_in_threadpool(state.store.get_job, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.get("/{job_id}", response_model=JobView, summary="A job: status and result envelope", responses=ERRORS)
async def get_job(job_id: str = JobIdPath, state: ApiState = Depends(get_state)) -> JobView:
    job = await _job(state, job_id)
    rows = await run_in_threadpool(state.store.stage_rows, job_id)
    return job_view(job, rows)


@router.get(
    "/{job_id}/pipeline",
    response_model=JobPipelineView,
    summary="Pipeline execution state of a job",
    responses=ERRORS,
)
async def get_job_pipeline(job_id: str = JobIdPath, state: ApiState = Depends(get_state)) -> JobPipelineView:
    """`{job_id, pipeline, stages_executed, current_stage, status}` plus every stage's status,
    timings and error."""
    job = await _job(state, job_id)
    rows = await run_in_threadpool(state.store.stage_rows, job_id)
    return pipeline_view(job, rows)


@router.get("/{job_id}/events", response_model=EventList, summary="Stored messages of a job", responses=ERRORS)
async def get_job_events(
    job_id: str = JobIdPath,
    after_seq: int = Query(0, ge=0, le=MAX_POSITION, description="Only messages with a larger seq."),
    limit: int = Query(1000, ge=1, le=10_000),
    state: ApiState = Depends(get_state),
) -> EventList:
    import json

    job = await _job(state, job_id)
    stored = await run_in_threadpool(state.store.events_after, job_id, after_seq, limit)
    return EventList(
        job_id=job_id,
        events=[json.loads(e.payload) for e in stored],
        last_seq=job["last_seq"],
        next_after_seq=stored[-1].seq if len(stored) == limit and stored[-1].seq < job["last_seq"] else None,
    )


@router.post(
    "/{job_id}/cancel",
    response_model=CancelResult,
    status_code=202,
    summary="Cancel a job",
    responses={
        **ERRORS,
        409: {"model": ErrorBody, "description": "The job already ended."},
        503: {"model": ErrorBody, "description": "This service runs no launcher."},
    },
)
async def cancel_job(
    job_id: str = JobIdPath,
    state: ApiState = Depends(get_state),
    principal: Principal = Security(authorize, scopes=[Scope.RUN]),
) -> CancelResult:
    """A queued job is cancelled at once; a running one gets SIGTERM (its flow run is cancelled and
    its running stage killed), SIGKILL after a grace period. Its terminal `cancelled` message
    follows on the job's stream. A `run` token cancels the jobs it submitted; another's job needs
    `admin`. The job keeps the name of the token that asked (`cancelled_by`)."""
    job = await _job(state, job_id)
    if job["created_by"] != principal.name and not principal.may(Scope.ADMIN):
        raise forbidden(principal, Scope.ADMIN, f"cancelling job {job_id!r} of {job['created_by'] or 'no token'!r}")
    if is_terminal(job["status"]):
        raise ApiError(
            409, f"job {job_id!r} already ended ({job['status']})", ApiErrorType.CONFLICT, job_status=job["status"]
        )
    if state.launcher is None:
        raise ApiError(503, "this service runs no launcher", ApiErrorType.UNAVAILABLE)
    try:
        await state.launcher.cancel(job_id, by=principal.name)
    except KeyError:
        raise not_found("job", job_id) from None
    job = await _job(state, job_id)
    return CancelResult(job_id=job_id, status=job["status"], cancel_requested=True, cancelled_by=job["cancelled_by"])


@router.post(
    "/{job_id}/retry",
    status_code=202,
    response_model=JobAccepted,
    summary="Retry a job that did not succeed, resuming its work",
    responses={
        **ERRORS,
        200: {"model": JobAccepted, "description": "This job was retried before: that retry, unless it failed too."},
        409: {"model": ErrorBody, "description": "The job has not ended, or it succeeded."},
        429: {"model": ErrorBody, "description": "The token's submission rate is used up."},
    },
    dependencies=[Depends(within_submission_quota)],
)
async def retry_job(
    response: Response,
    job_id: str = JobIdPath,
    state: ApiState = Depends(get_state),
    principal: Principal = Security(authorize, scopes=[Scope.RUN]),
) -> JobAccepted:
    """A new job, linked to this one (`retry_of`), with the same pipeline and input and `resume: true`:
    the stages that completed (same plugin version, tool, config and inputs) are not run again, their
    outputs and artifacts are taken as they are; a stage that was interrupted (its host or engine lost)
    continues after the last chunk it wrote when its tool is resumable, else it starts over. The
    result is the one an uninterrupted run gives. Retrying the same job twice gives the same new job."""
    job = await _job(state, job_id)
    if not is_terminal(job["status"]) or job["status"] == "succeeded":
        reason = "it succeeded: nothing to retry" if job["status"] == "succeeded" else f"it is {job['status']}"
        raise ApiError(
            409, f"job {job_id!r} cannot be retried: {reason}", ApiErrorType.CONFLICT, job_status=job["status"]
        )
    pipeline: JsonObject = {**job["pipeline"], "resume": True}
    retry_id = _retry_id(job_id, job_id)
    while (
        (earlier := await run_in_threadpool(state.store.get_job, retry_id)) is not None
        and is_terminal(earlier["status"])
        and earlier["status"] != "succeeded"
    ):
        retry_id = _retry_id(job_id, retry_id)  # that retry ended without success too: another one
    request_hash = hashlib.sha256(canonical_json({"retry_of": job_id, "pipeline": pipeline}).encode()).hexdigest()
    try:
        retry, created = await run_in_threadpool(
            lambda: state.store.create_job(
                job_id=retry_id,
                pipeline=pipeline,
                input_data=job["input"],
                request_hash=request_hash,
                source="retry",
                template_id=job["template_id"],
                created_by=principal.name,
                retry_of=job_id,
                publish=state.publish,
            )
        )
    except Conflict as exc:
        raise ApiError(409, str(exc), ApiErrorType.CONFLICT) from None
    return _accepted(state, response, retry, created)


def _retry_id(job_id: str, seed: str) -> str:
    """The id of a retry: the job's own where it has the form of a submitted id (jobs made by Prefect
    runs may not), then ``-retry-`` and a hash."""
    base = job_id[:100] if re.match(JOB_ID_PATTERN, job_id[:100]) else "job"
    return f"{base}-retry-{hashlib.sha256(seed.encode()).hexdigest()[:8]}"
