"""``/v1/media``: upload an image or video into the content-addressed store (the ref is job input),
what a ref holds, and its bytes (what worker hosts fetch)."""

from __future__ import annotations

import base64
import re
from typing import Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from starlette.datastructures import UploadFile
from starlette.types import Message

from forgeflow.api.deps import ApiState, WorkerScopedRoute, get_state
from forgeflow.api.errors import ApiError, ApiErrorType, not_found
from forgeflow.api.models import MEDIA_REF_PATTERN, ErrorBody, MediaView
from forgeflow.plugins.errors import MediaError, MediaNotFound, MediaTooLarge

router = APIRouter(prefix="/v1/media", tags=["media"], route_class=WorkerScopedRoute)

MULTIPART_OVERHEAD = 64 * 1024


class _BodyTooLarge(Exception):
    pass


def _limited(request: Request, limit: int) -> Request:
    """The request with a body that stops at ``limit`` bytes (chunked uploads have no Content-Length)."""
    seen = 0
    receive = request.receive

    async def limited_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge()
        return message

    return Request(request.scope, limited_receive)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"upload is larger than the limit of {limit} bytes", "MediaTooLarge", field="file")


def _store(state: ApiState, stream: Any, filename: str | None) -> dict[str, Any]:
    try:
        info = state.media.put_stream(stream, filename=filename, max_bytes=state.settings.max_upload_bytes)
    except MediaTooLarge:
        raise _too_large(state.settings.max_upload_bytes) from None
    except MediaError as exc:
        status = 415 if "unsupported" in exc.message else 422
        raise ApiError(status, exc.message, exc.error_type, field="file") from None
    return info.to_dict()


@router.post(
    "",
    status_code=201,
    response_model=MediaView,
    summary="Upload an image or video",
    responses={
        401: {"model": ErrorBody, "description": "Missing or invalid API token."},
        413: {"model": ErrorBody, "description": "Larger than FORGEFLOW_MAX_UPLOAD_BYTES."},
        415: {"model": ErrorBody, "description": "Not a supported image or video."},
        422: {"model": ErrorBody, "description": "No file, or an empty one."},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
async def upload_media(request: Request, state: ApiState = Depends(get_state)) -> dict[str, Any]:
    """Multipart form with a `file` field (or the raw bytes as `application/octet-stream`,
    `image/*`, `video/*`). Answers `{"ref": "sha256:...", ...}`: use it as `{"input": {"media": ref}}`.
    Storing the same bytes twice gives the same ref."""
    limit = state.settings.max_upload_bytes
    content_type = request.headers.get("content-type", "")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
        raise _too_large(limit)
    if content_type.startswith("multipart/form-data"):
        limited = _limited(request, limit + MULTIPART_OVERHEAD)
        try:
            form = await limited.form(max_files=1, max_fields=10)
        except _BodyTooLarge:
            raise _too_large(limit) from None
        except Exception as exc:
            if "too large" in str(exc).lower():
                raise _too_large(limit) from None
            raise ApiError(
                422, f"malformed multipart body: {exc}", ApiErrorType.REQUEST_VALIDATION, field="file"
            ) from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(
                    422, "the form needs a file in the field 'file'", ApiErrorType.REQUEST_VALIDATION, field="file"
                )
            return await run_in_threadpool(_store, state, upload.file, upload.filename)
        finally:
            await form.close()
    if not re.match(r"^(application/octet-stream|image/|video/)", content_type):
        raise ApiError(
            415,
            "send multipart/form-data with a 'file' field, or the raw bytes as application/octet-stream",
            "UnsupportedMediaType",
            field="file",
        )
    import tempfile

    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024, dir=str(state.settings.home)) as tmp:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            tmp.write(chunk)
        tmp.seek(0)
        filename = request.headers.get("x-filename") or None
        return await run_in_threadpool(_store, state, tmp, filename)


@router.get(
    "/{ref}",
    response_model=MediaView,
    summary="What a media ref holds",
    responses={
        404: {"model": ErrorBody, "description": "Unknown ref."},
        422: {"model": ErrorBody, "description": "Not a media ref."},
    },
)
async def media_info(
    ref: str = Path(..., pattern=MEDIA_REF_PATTERN, description="A media ref: `sha256:` and 64 hex digits."),
    state: ApiState = Depends(get_state),
) -> dict[str, Any]:
    try:
        return (await run_in_threadpool(state.media.info, ref)).to_dict()
    except MediaNotFound:
        raise not_found("media ref", ref) from None
    except MediaError as exc:
        raise ApiError(422, exc.message, exc.error_type, field="ref") from None


#: Every type :func:`~forgeflow.plugins.media.sniff` gives a stored file: what the content route may answer.
STORED_MEDIA_TYPES = (
    "image/jpeg",
    "image/png",
    "image/bmp",
    "image/webp",
    "image/tiff",
    "video/mp4",
    "video/quicktime",
    "video/x-msvideo",
    "video/x-matroska",
)
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_CONTENT_HEADERS = {
    "ETag": {"description": 'The file\'s SHA-256 in hex, quoted: `"<hex>"`.', "schema": {"type": "string"}},
    "Repr-Digest": {
        "description": "The file's SHA-256 (RFC 9530): `sha-256=:<base64>:`.",
        "schema": {"type": "string"},
    },
}


@router.get(
    "/{ref}/content",
    summary="The bytes a media ref holds",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The stored file, with its own media type; `Range` requests are answered 206.",
            "content": dict.fromkeys(STORED_MEDIA_TYPES, _BINARY),
            "headers": _CONTENT_HEADERS,
        },
        304: {"description": "`If-None-Match` names this file's ETag: the client has it already."},
        404: {"model": ErrorBody, "description": "Unknown ref."},
        422: {"model": ErrorBody, "description": "Not a media ref."},
    },
)
async def media_content(
    request: Request,
    ref: str = Path(..., pattern=MEDIA_REF_PATTERN, description="A media ref: `sha256:` and 64 hex digits."),
    state: ApiState = Depends(get_state),
) -> Response:
    """Streams the stored file (worker hosts fetch the media of their jobs here). `ETag` and
    `Repr-Digest` carry its SHA-256, so a client checks what it got against the ref; the content
    never changes, so it may be cached for good."""
    try:
        info = await run_in_threadpool(state.media.info, ref)
        path = await run_in_threadpool(state.media.path, ref)
    except MediaNotFound:
        raise not_found("media ref", ref) from None
    except MediaError as exc:
        raise ApiError(422, exc.message, exc.error_type, field="ref") from None
    etag = f'"{info.sha256}"'
    headers = {
        "ETag": etag,
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(info.sha256)).decode()}:",
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    wanted = request.headers.get("if-none-match")
    if wanted and (wanted.strip() == "*" or etag in [tag.strip().removeprefix("W/") for tag in wanted.split(",")]):
        return Response(status_code=304, headers=headers)
    return FileResponse(
        path,
        media_type=info.media_type,
        headers=headers,
        filename=info.filename,
        content_disposition_type="inline",
    )
