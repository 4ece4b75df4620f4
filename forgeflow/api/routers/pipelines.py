"""``/v1/pipelines``: saved, validated pipeline templates and their run statistics."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from fastapi import APIRouter, Depends, Path, Response, Security
from fastapi.concurrency import run_in_threadpool

from forgeflow.api.auth import Principal, Scope
from forgeflow.api.deps import ApiState, ScopedRoute, authorize, get_state
from forgeflow.api.errors import ApiError, ApiErrorType, not_found
from forgeflow.api.models import (
    NO_NUL,
    ErrorBody,
    PipelineCheck,
    PipelineCheckResult,
    PipelineCreate,
    StageStats,
    TemplateDetail,
    TemplateSummary,
)
from forgeflow.api.routers.jobs import check_cheap_limits, check_media, parse_pipeline, validation_error
from forgeflow.api.routers.views import template_summary
from forgeflow.api.store import Conflict
from forgeflow.api.store.templates import StageFigures
from forgeflow.canonical import JsonObject
from forgeflow.pipeline.definition import PipelineDefinition

router = APIRouter(prefix="/v1/pipelines", tags=["pipelines"], route_class=ScopedRoute)
#: ``/v1/pipeline-checks``: a path of its own, so no template id can shadow it.
checks_router = APIRouter(prefix="/v1/pipeline-checks", tags=["pipelines"], route_class=ScopedRoute)

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API token."},
    404: {"model": ErrorBody, "description": "Unknown pipeline."},
}


def slugify(name: str) -> str:
    """``"Soccer Analysis"`` → ``"soccer-analysis"``."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:200].strip("-")


def _job_input_fields(state: ApiState, definition: PipelineDefinition) -> list[str]:
    from forgeflow.pipeline.validation import validate_pipeline

    try:
        return list(validate_pipeline(definition, None, state.registry, state.settings).job_input_fields)
    except Exception:
        return []


def _template_definition(body: PipelineCreate) -> PipelineDefinition:
    """The definition a template body describes (stages in ``stages`` or the seed's ``pipeline``), or
    a 422 naming the field the body used."""
    if body.stages is not None and body.pipeline is not None:
        raise ApiError(
            422,
            "give the stages in 'stages' or 'pipeline', not both",
            ApiErrorType.REQUEST_VALIDATION,
            field="pipeline",
        )
    stages = body.stages if body.stages is not None else body.pipeline
    if stages is None:
        raise ApiError(422, "a template needs 'stages'", ApiErrorType.REQUEST_VALIDATION, field="stages")
    raw: JsonObject = {"stages": stages}
    for name in ("timeout_seconds", "description", "runner"):
        if getattr(body, name) is not None:
            raw[name] = getattr(body, name)
    return parse_pipeline(raw, prefix="stages" if body.stages is not None else "pipeline", list_form=True)


async def _validated_template(state: ApiState, body: PipelineCreate) -> JsonObject:
    """The definition of a template to store: valid, every stage's plugin named canonically, and no
    stage that needs a field only a later stage produces (a job could never give it in time)."""
    from forgeflow.pipeline.validation import STAGE_ORDER, PipelineValidationError, validate_pipeline

    definition = _template_definition(body)
    prefix = "stages" if body.stages is not None else "pipeline"
    try:
        validated = await run_in_threadpool(validate_pipeline, definition, None, state.registry, state.settings)
        order = [w for w in validated.warnings if w.error_type == STAGE_ORDER]
        if order:
            raise PipelineValidationError(order)
    except PipelineValidationError as exc:
        raise validation_error(exc, prefix=prefix) from None
    return validated.canonical_definition().model_dump(mode="json")


def _template_id(name: str) -> str:
    template_id = slugify(name)
    if not template_id:
        raise ApiError(422, "the name must contain letters or digits", ApiErrorType.REQUEST_VALIDATION, field="name")
    return template_id


@router.post(
    "",
    status_code=201,
    response_model=TemplateSummary,
    summary="Save a pipeline template",
    responses={
        **ERRORS,
        409: {"model": ErrorBody, "description": "A template with this name (id) exists: replace it with PUT."},
        422: {"model": ErrorBody, "description": "Malformed or invalid pipeline."},
    },
)
async def create_pipeline(
    body: PipelineCreate,
    response: Response,
    state: ApiState = Depends(get_state),
    principal: Principal = Security(authorize, scopes=[Scope.RUN]),
) -> TemplateSummary:
    """The stages are validated against the installed plugins (job inputs are checked when a job
    uses the template); a stage that needs a field only a later stage produces is refused. The id
    is a slug of the name: `"Soccer Analysis"` → `soccer-analysis`. `PUT /v1/pipelines/{id}` replaces
    a saved one."""
    template_id = _template_id(body.name)
    definition = await _validated_template(state, body)
    try:
        row = await run_in_threadpool(
            state.store.create_template, template_id, body.name.strip(), definition, principal.name
        )
    except Conflict as exc:
        raise ApiError(
            409, f"{exc}: replace it with PUT /v1/pipelines/{template_id}", ApiErrorType.CONFLICT, field="name"
        ) from None
    response.headers["Location"] = f"/v1/pipelines/{template_id}"
    return template_summary(row)


@checks_router.post(
    "",
    response_model=PipelineCheckResult,
    summary="Check a pipeline without running it",
    responses={
        **ERRORS,
        422: {"model": ErrorBody, "description": "POST /v1/jobs would refuse it: the same error, naming the field."},
    },
    dependencies=[Security(authorize, scopes=[Scope.READ])],  # a POST that stores nothing: reading is enough
)
async def check_pipeline(body: PipelineCheck, state: ApiState = Depends(get_state)) -> PipelineCheckResult:
    """The checks of `POST /v1/jobs` for an inline pipeline, without storing or running anything (what
    a form calls while someone types): its limits, the pipeline document, the installed plugins and
    tools, each stage's config, the inputs each stage needs from the job input or an earlier stage and
    their types, and the job input when it is given. A pipeline a submission would refuse gets the
    same 422, naming stage and field; one it would accept gets its stages and the job input fields."""
    from forgeflow.pipeline.validation import PipelineValidationError, validate_pipeline

    check_cheap_limits(state, body.pipeline, body.input)
    raw: JsonObject | None = {"stages": body.pipeline} if isinstance(body.pipeline, list) else body.pipeline
    definition = parse_pipeline(raw, prefix="pipeline", list_form=isinstance(body.pipeline, list))
    try:
        validated = await run_in_threadpool(validate_pipeline, definition, body.input, state.registry, state.settings)
    except PipelineValidationError as exc:
        raise validation_error(exc, prefix="pipeline") from None
    if body.input is not None and "media" in validated.job_input_fields:
        await run_in_threadpool(check_media, state, body.input.get("media"))
    return PipelineCheckResult(
        stages=[s.name for s in validated.stages],
        job_input_fields=list(validated.job_input_fields),
        warnings=[w.model_dump() for w in validated.warnings],
    )


@router.get("", response_model=list[TemplateSummary], summary="List pipeline templates", responses=ERRORS)
async def list_pipelines(state: ApiState = Depends(get_state)) -> list[TemplateSummary]:
    """`[{id, name, stages, created_at}, ...]`, oldest first."""
    rows = await run_in_threadpool(state.store.list_templates)
    return [template_summary(r) for r in rows]


PipelineIdPath = Path(..., min_length=1, max_length=200, pattern=NO_NUL, description="The template id.")


@router.get("/{pipeline_id}", response_model=TemplateDetail, summary="A template with its statistics", responses=ERRORS)
async def get_pipeline(pipeline_id: str = PipelineIdPath, state: ApiState = Depends(get_state)) -> TemplateDetail:
    """`{id, name, stages, last_used, success_rate, ...}`: run counts by status, mean duration of
    succeeded runs, and per stage the runs, failures and mean duration."""
    row = await run_in_threadpool(state.store.get_template, pipeline_id)
    if row is None:
        raise not_found("pipeline", pipeline_id)
    stats = await run_in_threadpool(state.store.template_stats, pipeline_id)
    summary = template_summary(row)
    by_index = {s["stage_index"]: s for s in stats["stage_stats"]}
    stage_stats = []
    for index, stage in enumerate(summary.stages):
        figures = by_index.get(index) or StageFigures(
            stage_index=index,
            runs=0,
            completed=0,
            failed=0,
            mean_duration_ms=None,
            min_duration_ms=None,
            max_duration_ms=None,
        )
        stage_stats.append(StageStats(**figures, plugin=stage.get("plugin", ""), tool=stage.get("tool", "")))
    definition = PipelineDefinition.model_validate(row["definition"])
    fields = await run_in_threadpool(_job_input_fields, state, definition)
    return TemplateDetail(
        **summary.model_dump(),
        last_used=stats["last_used"],
        runs=stats["runs"],
        success_rate=stats["success_rate"],
        mean_duration_ms=stats["mean_duration_ms"],
        stage_stats=stage_stats,
        job_input_fields=fields,
    )


@router.put(
    "/{pipeline_id}",
    response_model=TemplateSummary,
    summary="Replace a pipeline template",
    responses={
        **ERRORS,
        422: {"model": ErrorBody, "description": "Malformed or invalid pipeline, or a name of another id."},
    },
)
async def replace_pipeline(
    body: PipelineCreate, pipeline_id: str = PipelineIdPath, state: ApiState = Depends(get_state)
) -> TemplateSummary:
    """Replaces a saved template's stages, timeout, runner and description with the body's (the same
    form and checks as `POST /v1/pipelines`). Its id, statistics and the jobs that used it stay (each
    job keeps its own copy of the stages); the name may change only as far as its id does not."""
    if await run_in_threadpool(state.store.get_template, pipeline_id) is None:
        raise not_found("pipeline", pipeline_id, "save it with POST /v1/pipelines")
    template_id = _template_id(body.name)
    if template_id != pipeline_id:
        raise ApiError(
            422,
            f"the name {body.name.strip()!r} has the id {template_id!r}, not {pipeline_id!r}: "
            "save it as a new template with POST /v1/pipelines",
            ApiErrorType.REQUEST_VALIDATION,
            field="name",
        )
    definition = await _validated_template(state, body)
    row = await run_in_threadpool(state.store.update_template, pipeline_id, body.name.strip(), definition)
    if row is None:  # deleted meanwhile
        raise not_found("pipeline", pipeline_id, "save it with POST /v1/pipelines")
    return template_summary(row)


@router.delete("/{pipeline_id}", status_code=204, summary="Delete a template", responses=ERRORS)
async def delete_pipeline(
    pipeline_id: str = PipelineIdPath,
    state: ApiState = Depends(get_state),
    principal: Principal = Security(authorize, scopes=[Scope.ADMIN]),
) -> Response:
    """Jobs that used it keep their own copy of the stages. Who deleted it is in `GET /v1/audit`."""
    if not await run_in_threadpool(state.store.delete_template, pipeline_id, principal.name):
        raise not_found("pipeline", pipeline_id)
    return Response(status_code=204)
