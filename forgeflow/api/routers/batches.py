"""``/v1/batches``: one pipeline over a folder or a list of media, each file its own job on the fleet.

Create (``run`` scope), list and read (``read``), cancel and retry (``run``), download the summary
(Parquet, CSV). A worker host's ingest token opens these routes too: the batch flow
(``forgeflow-batch``, run by a schedule or the Prefect UI) registers and follows its batch with it.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path as FsPath
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Response, Security
from fastapi.concurrency import run_in_threadpool

from forgeflow.api.auth import Principal, Scope
from forgeflow.api.batch_models import BatchCreate, BatchList, BatchMedia, BatchRetried, BatchView
from forgeflow.api.batch_summary import SummaryRow, summary_rows, to_csv, to_parquet
from forgeflow.api.batches import batch_service, file_status
from forgeflow.api.deps import ApiState, WorkerScopedRoute, authorize_worker, get_state
from forgeflow.api.errors import ApiError, ApiErrorType, not_found
from forgeflow.api.models import MAX_POSITION, NO_NUL, ErrorBody
from forgeflow.api.routers.jobs import check_cheap_limits, parse_pipeline, validation_error
from forgeflow.api.store.batches import NewFile
from forgeflow.api.store.rows import BatchRow
from forgeflow.canonical import JsonObject
from forgeflow.pipeline.definition import PipelineDefinition
from forgeflow.pipeline.validation import PipelineValidationError, validate_pipeline
from forgeflow.plugins.errors import MediaError

router = APIRouter(prefix="/v1/batches", tags=["batches"], route_class=WorkerScopedRoute)

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or invalid API token."},
    404: {"model": ErrorBody, "description": "Unknown batch or template."},
}
BatchIdPath = Path(..., min_length=1, max_length=64, pattern=NO_NUL, description="The batch id.")
#: A media ref that validation accepts in place of each file's own (the files are checked one by one).
_SOME_MEDIA = "sha256:" + "0" * 64


def _folder_files(state: ApiState, folder: str, pattern: str) -> list[NewFile]:
    """The files of ``folder`` (inside an allowed media root) matching ``pattern``, sorted by name,
    each put in the media store (a file that cannot be is kept, with why, and fails on its own)."""
    settings = state.settings
    path = FsPath(folder).expanduser().resolve()
    roots = [FsPath(r).expanduser().resolve() for r in settings.media_input_roots]
    if not any(path == r or path.is_relative_to(r) for r in roots):
        raise ApiError(
            422,
            f"folder {folder!r} is not inside an allowed media root (FORGEFLOW_MEDIA_INPUT_ROOTS); "
            "upload the files (POST /v1/media) and pass their refs in 'media' instead",
            ApiErrorType.REQUEST_VALIDATION,
            field="folder",
        )
    if not path.is_dir():
        raise ApiError(
            422, f"folder {folder!r} is not a folder on this host", ApiErrorType.REQUEST_VALIDATION, field="folder"
        )
    found = sorted(p for p in path.iterdir() if p.is_file() and fnmatch.fnmatch(p.name, pattern))
    if len(found) > settings.batch_max_files:
        raise ApiError(
            422,
            f"{len(found)} files match, over the limit of {settings.batch_max_files} (FORGEFLOW_BATCH_MAX_FILES)",
            ApiErrorType.REQUEST_VALIDATION,
            field="pattern",
        )
    files = []
    for p in found:
        try:
            files.append(NewFile(p.name, state.media.put_file(p, max_bytes=settings.max_media_bytes).ref))
        except MediaError as exc:
            files.append(NewFile(p.name, None, exc.message, exc.error_type))
    return files


def _media_files(state: ApiState, media: list[str | BatchMedia]) -> list[NewFile]:
    files = []
    for i, item in enumerate(media):
        entry = item if isinstance(item, BatchMedia) else BatchMedia(ref=item)
        if not state.media.has(entry.ref):
            raise ApiError(
                422, f"media {entry.ref!r} is not stored (POST /v1/media)", "MediaNotFound", field=f"media.{i}"
            )
        files.append(NewFile(entry.name or entry.ref, entry.ref))
    return files


async def _definition(state: ApiState, body: BatchCreate) -> tuple[PipelineDefinition, str | None]:
    if (body.pipeline is None) == (body.pipeline_id is None):
        raise ApiError(
            422,
            "give the stages in 'pipeline' or a saved template in 'pipeline_id'",
            ApiErrorType.REQUEST_VALIDATION,
            field="pipeline",
        )
    if body.pipeline_id is not None:
        template = await run_in_threadpool(state.store.get_template, body.pipeline_id)
        if template is None:
            raise not_found("pipeline", body.pipeline_id, "list them with GET /v1/pipelines")
        return PipelineDefinition.model_validate(template["definition"]), template["id"]
    raw: JsonObject | None = {"stages": body.pipeline} if isinstance(body.pipeline, list) else body.pipeline
    return parse_pipeline(raw, prefix="pipeline", list_form=isinstance(body.pipeline, list)), None


@router.post(
    "",
    status_code=201,
    response_model=BatchView,
    summary="Run a pipeline over a folder or a list of media: one job per file",
    responses={
        **ERRORS,
        200: {"model": BatchView, "description": "This flow run registered its batch before: that batch."},
        422: {"model": ErrorBody, "description": "Invalid pipeline, folder or media (nothing is stored)."},
    },
)
async def create_batch(
    body: BatchCreate,
    response: Response,
    state: ApiState = Depends(get_state),
    principal: Principal = Security(authorize_worker, scopes=[Scope.RUN]),
) -> BatchView:
    """Each file becomes its own job (`batch_id` set), run by any worker of the fleet, at most
    `max_concurrency` at once. A file whose work an earlier job did (same media content, pipeline
    and plugin versions) takes that job's result at once (`reused_from`) unless `force`: running a
    batch again computes only the files that failed or are new."""
    service = batch_service(state)
    if body.flow_run_id:
        known = await run_in_threadpool(service.repo.by_flow_run, body.flow_run_id)
        if known is not None:
            response.status_code = 200
            return await run_in_threadpool(service.view, known)
    if (body.folder is None) == (body.media is None):
        raise ApiError(
            422,
            "give the files as a 'folder' (with 'pattern') or as 'media' refs",
            ApiErrorType.REQUEST_VALIDATION,
            field="folder",
        )
    check_cheap_limits(state, body.pipeline, body.input)
    definition, template_id = await _definition(state, body)
    sample = {**body.input, "media": _SOME_MEDIA}
    try:
        validated = await run_in_threadpool(validate_pipeline, definition, sample, state.registry, state.settings)
    except PipelineValidationError as exc:
        raise validation_error(exc, prefix="pipeline") from None
    if "media" not in validated.job_input_fields:
        raise ApiError(
            422,
            "the pipeline's first stages read no 'media': a batch gives each job one file as its media",
            ApiErrorType.REQUEST_VALIDATION,
            field="pipeline",
        )
    if body.media is not None:
        if len(body.media) > state.settings.batch_max_files:
            raise ApiError(
                422,
                f"{len(body.media)} files is over the limit of {state.settings.batch_max_files} (FORGEFLOW_BATCH_MAX_FILES)",
                ApiErrorType.REQUEST_VALIDATION,
                field="media",
            )
        files = await run_in_threadpool(_media_files, state, body.media)
        source: JsonObject = {"media": len(files)}
    else:
        assert body.folder is not None
        files = await run_in_threadpool(_folder_files, state, body.folder, body.pattern)
        source = {"folder": body.folder, "pattern": body.pattern}
    pipeline = validated.canonical_definition().model_dump(mode="json")
    batch = await run_in_threadpool(
        lambda: service.create(
            name=body.name,
            pipeline=pipeline,
            template_id=template_id,
            source=source,
            files=files,
            extra_input=body.input,
            max_concurrency=body.max_concurrency,
            force=body.force,
            created_by=principal.name,
            flow_run_id=body.flow_run_id,
        )
    )
    response.headers["Location"] = f"/v1/batches/{quote(batch['id'], safe='')}"
    return await run_in_threadpool(service.view, batch)


@router.get("", response_model=BatchList, summary="List batches", responses=ERRORS)
async def list_batches(
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_POSITION),
    state: ApiState = Depends(get_state),
) -> BatchList:
    """Newest first."""
    service = batch_service(state)
    rows, total = await run_in_threadpool(service.repo.page, limit, offset)
    return BatchList(
        items=[service.summary_item(r) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
    )


async def _batch(state: ApiState, batch_id: str) -> BatchRow:
    batch = await run_in_threadpool(batch_service(state).repo.get, batch_id)
    if batch is None:
        raise not_found("batch", batch_id)
    return batch


@router.get("/{batch_id}", response_model=BatchView, summary="A batch: progress and each file's job", responses=ERRORS)
async def get_batch(batch_id: str = BatchIdPath, state: ApiState = Depends(get_state)) -> BatchView:
    batch = await _batch(state, batch_id)
    return await run_in_threadpool(batch_service(state).view, batch)


@router.post(
    "/{batch_id}/cancel",
    status_code=202,
    response_model=BatchView,
    summary="Cancel a batch",
    responses={
        **ERRORS,
        409: {"model": ErrorBody, "description": "The batch already ended."},
        503: {"model": ErrorBody, "description": "This service runs no launcher."},
    },
)
async def cancel_batch(
    batch_id: str = BatchIdPath,
    state: ApiState = Depends(get_state),
    principal: Principal = Security(authorize_worker, scopes=[Scope.RUN]),
) -> BatchView:
    """No file starts from now on: queued jobs are cancelled at once, running ones are cancelled (their
    flow runs too) and end `cancelled`; the batch ends `cancelled` once they did."""
    batch = await _batch(state, batch_id)
    if batch["status"] != "running":
        raise ApiError(409, f"batch {batch_id!r} already ended ({batch['status']})", ApiErrorType.CONFLICT)
    if state.launcher is None:
        raise ApiError(503, "this service runs no launcher", ApiErrorType.UNAVAILABLE)
    service = batch_service(state)
    for job_id in await run_in_threadpool(service.request_cancel, batch_id):
        try:
            await state.launcher.cancel(job_id, by=principal.name)
        except KeyError:
            pass
    await run_in_threadpool(service.supervise_one, batch_id)
    return await run_in_threadpool(service.view, await _batch(state, batch_id))


@router.post(
    "/{batch_id}/retry",
    status_code=202,
    response_model=BatchRetried,
    summary="Retry the files of a batch that failed",
    responses={**ERRORS, 409: {"model": ErrorBody, "description": "The batch runs, or no file failed."}},
)
async def retry_batch(
    batch_id: str = BatchIdPath,
    state: ApiState = Depends(get_state),
    principal: Principal = Security(authorize_worker, scopes=[Scope.RUN]),
) -> BatchRetried:
    """Each file that failed, crashed or was cancelled gets a new job that resumes its last one (its
    completed stages are not run again); the files that succeeded stay as they are."""
    batch = await _batch(state, batch_id)
    if batch["status"] == "running":
        raise ApiError(409, f"batch {batch_id!r} still runs: cancel it first or wait", ApiErrorType.CONFLICT)
    retried = await run_in_threadpool(batch_service(state).retry, batch_id, principal.name)
    if not retried:
        raise ApiError(409, f"batch {batch_id!r} has no failed file to retry", ApiErrorType.CONFLICT)
    batch = await _batch(state, batch_id)
    return BatchRetried(batch_id=batch_id, status=batch["status"], retried=retried)


async def _summary_rows(state: ApiState, batch_id: str) -> list[SummaryRow]:
    await _batch(state, batch_id)
    files = await run_in_threadpool(lambda: batch_service(state).repo.files(batch_id, envelopes=True))
    return summary_rows([(f, file_status(f)) for f in files])


@router.get(
    "/{batch_id}/summary.parquet",
    summary="The batch's summary as Parquet (one row per file)",
    responses={**ERRORS, 200: {"content": {"application/vnd.apache.parquet": {}}}},
    response_class=Response,
)
async def summary_parquet(batch_id: str = BatchIdPath, state: ApiState = Depends(get_state)) -> Response:
    rows = await _summary_rows(state, batch_id)
    data = await run_in_threadpool(to_parquet, rows)
    return Response(
        data,
        media_type="application/vnd.apache.parquet",
        headers={"Content-Disposition": f'attachment; filename="{batch_id}-summary.parquet"'},
    )


@router.get(
    "/{batch_id}/summary.csv",
    summary="The batch's summary as CSV (one row per file)",
    responses={**ERRORS, 200: {"content": {"text/csv": {}}}},
    response_class=Response,
)
async def summary_csv(batch_id: str = BatchIdPath, state: ApiState = Depends(get_state)) -> Response:
    rows = await _summary_rows(state, batch_id)
    return Response(
        to_csv(rows),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{batch_id}-summary.csv"'},
    )
