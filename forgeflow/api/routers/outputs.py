"""``/v1/jobs/{job_id}/outputs``: a job's outputs for analysis — listed, paged by frame, downloaded whole.

A per-frame output of a long video is a chunked Parquet artifact (:mod:`forgeflow.plugins.frames`);
the job's envelope names it by ref. These routes read it a chunk at a time: a page of frames as JSON
(``/frames?start=&limit=``), or the whole output as one Parquet file (a row group per chunk), written
to a temporary file chunk by chunk and streamed, so the API never holds a match's records. Inline
per-frame outputs (short clips, images) are served the same way.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import JsonValue
from starlette.background import BackgroundTask

from forgeflow.api.deps import ApiState, ScopedRoute, get_state
from forgeflow.api.errors import ApiError, ApiErrorType, not_found
from forgeflow.api.models import MAX_POSITION, NO_NUL, ErrorBody, FramePage, JobOutput, JobOutputs
from forgeflow.canonical import JsonObject
from forgeflow.plugins.errors import MediaError
from forgeflow.plugins.frames import FRAMES_KEY, is_frames, page_frames, write_frames_file

router = APIRouter(prefix="/v1/jobs", tags=["outputs"], route_class=ScopedRoute)

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Unknown job, or the job has no such per-frame output (yet)."},
    422: {"model": ErrorBody, "description": "Invalid path or query parameter."},
}
#: Most frames one page holds.
MAX_PAGE = 1000
PARQUET = "application/vnd.apache.parquet"

JobIdPath = Path(..., min_length=1, max_length=128, pattern=NO_NUL, description="The job id.")
OutputPath = Path(..., min_length=1, max_length=200, pattern=NO_NUL, description="The output's name (`players`).")


async def _result(state: ApiState, job_id: str) -> JsonObject:
    """The job's result, or what its completed stages made when it failed (empty while it runs)."""
    job = await run_in_threadpool(state.store.get_job, job_id)
    if job is None:
        raise not_found("job", job_id)
    envelope = job["envelope"] or {}
    result = envelope.get("result") if envelope.get("ok") else envelope.get("partial_result")
    return result if isinstance(result, dict) else {}


def _is_per_frame(value: JsonValue) -> bool:
    return is_frames(value) or (
        isinstance(value, list) and all(isinstance(r, dict) and isinstance(r.get("frame_index"), int) for r in value)
    )


async def _output(state: ApiState, job_id: str, name: str) -> JsonValue:
    value = (await _result(state, job_id)).get(name)
    if value is None or not _is_per_frame(value):
        raise ApiError(
            404,
            f"job {job_id!r} has no per-frame output {name!r} (see GET /v1/jobs/{job_id}/outputs)",
            ApiErrorType.NOT_FOUND,
        )
    return value


def _describe(job_id: str, name: str, value: JsonValue) -> JobOutput:
    base = f"/v1/jobs/{job_id}/outputs/{name}"
    links = {"download_url": base, "frames_url": f"{base}/frames"}
    if isinstance(value, dict) and is_frames(value):
        info = {k: v for k, v in value.items() if k != FRAMES_KEY}
        return JobOutput.model_validate({"name": name, "stored": "artifact", "ref": value[FRAMES_KEY], **info, **links})
    records = value if isinstance(value, list) else []  # per frame: a list of records
    indices = [r["frame_index"] for r in records if isinstance(r, dict)]
    return JobOutput(
        name=name,
        stored="inline",
        frames=len(records),
        first_frame=indices[0] if indices else None,
        last_frame=indices[-1] if indices else None,
        **links,
    )


@router.get("/{job_id}/outputs", response_model=JobOutputs, summary="A job's per-frame outputs", responses=ERRORS)
async def list_outputs(job_id: str = JobIdPath, state: ApiState = Depends(get_state)) -> JobOutputs:
    """Each per-frame output of the job's result (or partial result): stored inline or as a chunked
    Parquet artifact (ref, frame range, chunks, size, item counts, column types), with its links."""
    result = await _result(state, job_id)
    outputs = [_describe(job_id, name, value) for name, value in result.items() if _is_per_frame(value)]
    return JobOutputs(job_id=job_id, outputs=outputs)


@router.get(
    "/{job_id}/outputs/{name}/frames",
    response_model=FramePage,
    summary="A page of a per-frame output, by frame index",
    responses=ERRORS,
)
async def get_output_frames(
    job_id: str = JobIdPath,
    name: str = OutputPath,
    start: int = Query(0, ge=0, le=MAX_POSITION, description="First frame index of the page."),
    limit: int = Query(100, ge=1, le=MAX_PAGE, description=f"Most frames in the page (at most {MAX_PAGE})."),
    state: ApiState = Depends(get_state),
) -> FramePage:
    """The records with ``frame_index >= start``, at most ``limit`` of them, in frame order;
    ``next_start`` is where the next page starts (null after the last). Only the chunks that hold the
    page are read."""
    value = await _output(state, job_id, name)
    try:
        frames, next_start = await run_in_threadpool(page_frames, value, state.media, start, limit)
    except MediaError as exc:
        raise ApiError(404, exc.message, ApiErrorType.NOT_FOUND) from None
    return FramePage(job_id=job_id, output=name, start=start, limit=limit, frames=frames, next_start=next_start)


@router.get(
    "/{job_id}/outputs/{name}",
    summary="A per-frame output as one Parquet file",
    responses={**ERRORS, 200: {"content": {PARQUET: {}}, "description": "The output, a row group per chunk."}},
    response_class=FileResponse,
)
async def download_output(
    job_id: str = JobIdPath, name: str = OutputPath, state: ApiState = Depends(get_state)
) -> FileResponse:
    """The whole output as one Parquet file (zstd, a row group per chunk), for pandas
    (``pd.read_parquet``), polars (``pl.read_parquet``) or DuckDB (``read_parquet``)."""
    value = await _output(state, job_id, name)
    state.media.root.mkdir(parents=True, exist_ok=True)  # the file is written beside the chunks it reads
    fd, path = tempfile.mkstemp(prefix=".output-", suffix=".parquet", dir=state.media.root)
    os.close(fd)
    try:
        await run_in_threadpool(write_frames_file, value, state.media, path)
    except (MediaError, OSError) as exc:
        os.unlink(path)
        message = exc.message if isinstance(exc, MediaError) else str(exc)
        raise ApiError(
            404, f"output {name!r} of job {job_id!r} cannot be read: {message}", ApiErrorType.NOT_FOUND
        ) from None
    except BaseException:
        os.unlink(path)
        raise
    return FileResponse(
        path,
        media_type=PARQUET,
        filename=f"{job_id}-{name}.parquet",
        background=BackgroundTask(os.unlink, path),
    )
