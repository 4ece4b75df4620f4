"""``/v1/media``: upload an image or video into the content-addressed store (the ref is job input),
what a ref holds, and its bytes (what worker hosts fetch)."""

from __future__ import annotations

import base64
import errno
import re
from functools import partial
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from forgeflow.api.deps import ApiState, WorkerScopedRoute, get_state
from forgeflow.api.errors import ApiError, ApiErrorType, not_found
from forgeflow.api.models import MEDIA_REF_PATTERN, ErrorBody, MediaView
from forgeflow.plugins.errors import MediaError, MediaNotFound, MediaTooLarge
from forgeflow.plugins.media import MediaWriter

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

router = APIRouter(prefix="/v1/media", tags=["media"], route_class=WorkerScopedRoute)

MULTIPART_OVERHEAD = 64 * 1024
#: Bytes of an upload gathered before they are written to the store (off the event loop).
WRITE_BATCH = 1024 * 1024


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"upload is larger than the limit of {limit} bytes (FORGEFLOW_MAX_UPLOAD_BYTES)",
        "MediaTooLarge",
        field="file",
    )


def _malformed(detail: str) -> ApiError:
    return ApiError(422, f"malformed multipart body: {detail}", ApiErrorType.REQUEST_VALIDATION, field="file")


def _no_file() -> ApiError:
    return ApiError(422, "the form needs a file in the field 'file'", ApiErrorType.REQUEST_VALIDATION, field="file")


class _Batches:
    """Upload bytes on their way into a :class:`MediaWriter`: gathered to :data:`WRITE_BATCH`, then
    hashed and written in a worker thread, so the event loop never waits on the disk and memory holds
    one batch whatever the upload's size."""

    def __init__(self, writer: MediaWriter) -> None:
        self.writer = writer
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, data: bytes) -> None:
        if data:
            self._parts.append(data)
            self._size += len(data)

    async def flush(self, *, all_of_it: bool = False) -> None:
        if self._size >= WRITE_BATCH or (all_of_it and self._size):
            data = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
            await run_in_threadpool(self.writer.write, data)


class _FormFile:
    """The callbacks of a streaming multipart parser that route the data of the form's file part
    (field ``file``, with a filename) into a :class:`_Batches`; every other part is read past, never
    kept (the body limit bounds them)."""

    def __init__(self, batches: _Batches) -> None:
        self.batches = batches
        self.filename: str | None = None
        self.found = False  # the file part began
        self.complete = False  # ... and ended
        self.ended = False  # the closing boundary came
        self._into_file = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._into_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise _malformed('the Content-Disposition header field "name" must be provided')
        if options[b"name"] != b"file" or b"filename" not in options:
            return
        if self.found:
            raise _malformed("more than one file in the field 'file'")
        self.found = self._into_file = True
        self.filename = _decode(options[b"filename"]) or None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._into_file:
            self.batches.add(data[start:end])

    def on_part_end(self) -> None:
        if self._into_file:
            self.complete = True
        self._into_file = False

    def on_end(self) -> None:
        self.ended = True


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


async def _receive_form(request: Request, batches: _Batches, limit: int) -> str | None:
    """Stream a multipart/form-data body: the file's bytes into ``batches``; returns its filename."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise _malformed("missing boundary in multipart")
    form = _FormFile(batches)
    parser = MultipartParser(boundary, form.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + MULTIPART_OVERHEAD:
                raise _too_large(limit)
            parser.write(chunk)
            await batches.flush()
        parser.finalize()
    except MultipartParseError as exc:
        raise _malformed(str(exc)) from None
    if not form.found:
        raise _no_file()
    if not (form.complete and form.ended):
        raise _malformed("the body ended before the file did")
    await batches.flush(all_of_it=True)
    return form.filename


async def _receive_raw(request: Request, batches: _Batches) -> str | None:
    """Stream a raw body (``application/octet-stream``, ``image/*``, ``video/*``) into ``batches``."""
    async for chunk in request.stream():
        batches.add(chunk)
        await batches.flush()
    await batches.flush(all_of_it=True)
    return request.headers.get("x-filename") or None


@router.post(
    "",
    status_code=201,
    response_model=MediaView,
    summary="Upload an image or video",
    responses={
        401: {"model": ErrorBody, "description": "Missing or invalid API token."},
        413: {"model": ErrorBody, "description": "Larger than FORGEFLOW_MAX_UPLOAD_BYTES."},
        507: {"model": ErrorBody, "description": "No disk space left for it on the API host."},
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
async def upload_media(request: Request, state: ApiState = Depends(get_state)) -> MediaView:
    """Multipart form with a `file` field (or the raw bytes as `application/octet-stream`,
    `image/*`, `video/*`). Answers `{"ref": "sha256:...", ...}`: use it as `{"input": {"media": ref}}`.
    Storing the same bytes twice gives the same ref."""
    limit = state.settings.max_upload_bytes
    content_type = request.headers.get("content-type", "")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
        raise _too_large(limit)
    multipart = content_type.startswith("multipart/form-data")
    if not multipart and not re.match(r"^(application/octet-stream|image/|video/)", content_type):
        raise ApiError(
            415,
            "send multipart/form-data with a 'file' field, or the raw bytes as application/octet-stream",
            "UnsupportedMediaType",
            field="file",
        )
    # The bytes go straight into a temporary file of the store as they arrive, hashed on the way:
    # no copy in memory nor in a spool file, whatever the size (a match is gigabytes).
    writer = await run_in_threadpool(partial(state.media.writer, max_bytes=limit))
    try:
        batches = _Batches(writer)
        filename = await (_receive_form(request, batches, limit) if multipart else _receive_raw(request, batches))
        info = await run_in_threadpool(writer.commit, filename)
    except MediaTooLarge:
        raise _too_large(limit) from None
    except MediaError as exc:
        status = 415 if "unsupported" in exc.message else 422
        raise ApiError(status, exc.message, exc.error_type, field="file") from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise ApiError(
            507, "no space left for the upload in the API's media store", "InsufficientStorage", field="file"
        ) from None
    finally:
        await run_in_threadpool(writer.close)  # deletes what was not committed
    return MediaView.model_validate(info.to_dict())


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
) -> MediaView:
    try:
        return MediaView.model_validate((await run_in_threadpool(state.media.info, ref)).to_dict())
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
