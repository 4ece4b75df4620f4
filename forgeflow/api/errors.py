"""Errors of the API and their JSON form: ``{"error", "error_type", "field"?, "issues"?}`` (a body that
is not JSON: ``line`` and ``column`` instead of ``field``)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TypedDict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from forgeflow.events.models import EVENT_TYPES
from forgeflow.plugins.errors import ForgeFlowError


class ApiErrorType(StrEnum):
    """The ``error_type`` of errors the API itself answers (a plugin's or the pipeline's own errors
    keep theirs: ``UnknownPlugin``, ``PipelineValidationError`` …)."""

    BAD_REQUEST = "BadRequest"
    REQUEST_VALIDATION = "RequestValidationError"
    NOT_FOUND = "NotFound"
    CONFLICT = "Conflict"
    UNAUTHORIZED = "Unauthorized"
    FORBIDDEN = "Forbidden"
    TOO_MANY_REQUESTS = "TooManyRequests"
    UNAVAILABLE = "Unavailable"
    METHOD_NOT_ALLOWED = "MethodNotAllowed"
    HTTP_ERROR = "HTTPError"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        error_type: str = ApiErrorType.BAD_REQUEST,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: object,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.error_type = error_type
        self.body: dict[str, object] = {"error": error, "error_type": error_type, **extra}
        if field is not None:
            self.body["field"] = field
        self.headers = headers


def not_found(kind: str, ident: str, hint: str | None = None) -> ApiError:
    message = f"unknown {kind} {ident!r}" + (f"; {hint}" if hint else "")
    return ApiError(404, message, ApiErrorType.NOT_FOUND)


def _loc(loc: Sequence[object]) -> str:
    """``events.1.ok`` for pydantic's ``("body", "events", 1, "pipeline_stage_end", "ok")``: where the
    field is, without the request part or the event union's tag."""
    parts = [str(p) for p in loc if p not in EVENT_TYPES]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


async def _malformed_json(request: Request, error: ErrorDetails) -> dict[str, object]:
    """The body of a 422 for a request body that is not JSON: the line, column and reason, as
    ``forgeflow validate`` says them (FastAPI gives only the character offset, in ``loc``)."""
    loc = error.get("loc", ())
    offset = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
    reason = str((error.get("ctx") or {}).get("error") or "not valid JSON")
    text = (await request.body()).decode("utf-8", errors="replace")[:offset]
    line = text.count("\n") + 1
    column = offset - (text.rfind("\n") + 1) + 1
    message = f"malformed JSON at line {line}, column {column}: {reason}"
    return {
        "error": message,
        "error_type": ApiErrorType.REQUEST_VALIDATION,
        "line": line,
        "column": column,
        "issues": [{"field": None, "location": "body", "message": message, "line": line, "column": column}],
    }


class _Issue(TypedDict):
    """A problem of a request that does not validate, as a 422's ``issues`` lists it."""

    field: str | None
    location: int | str | None
    message: str


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors: Sequence[ErrorDetails] = exc.errors()
        malformed = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if malformed is not None:
            return JSONResponse(await _malformed_json(request, malformed), status_code=422)
        issues: list[_Issue] = []
        for err in errors:
            loc = err.get("loc", ())
            field = _loc(loc)
            inner = (err.get("ctx") or {}).get("path")  # where inside the field (storable values)
            if inner:
                field = f"{field}.{inner}" if field else str(inner)
            issues.append({"field": field, "location": loc[0] if loc else None, "message": err.get("msg", "")})
        first: _Issue = issues[0] if issues else {"field": None, "location": None, "message": "invalid request"}
        message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
        if len(issues) > 1:
            message += f" (and {len(issues) - 1} more)"
        body = {
            "error": message,
            "error_type": ApiErrorType.REQUEST_VALIDATION,
            "field": first["field"],
            "issues": issues,
        }
        return JSONResponse(body, status_code=422)

    @app.exception_handler(ForgeFlowError)
    async def _forgeflow(request: Request, exc: ForgeFlowError) -> JSONResponse:
        body = exc.to_dict()
        issues = body.get("issues")
        if isinstance(issues, list) and issues and "field" not in body:
            first = issues[0]
            parts = []
            if first.get("stage_index") is not None:
                parts += ["pipeline", str(first["stage_index"])]
            if first.get("field"):
                parts.append(str(first["field"]))
            body["field"] = ".".join(parts) or None
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {
            400: ApiErrorType.BAD_REQUEST,
            401: ApiErrorType.UNAUTHORIZED,
            404: ApiErrorType.NOT_FOUND,
            405: ApiErrorType.METHOD_NOT_ALLOWED,
        }.get(exc.status_code, ApiErrorType.HTTP_ERROR)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request, headers.get("Allow")))
        return JSONResponse(
            {"error": str(exc.detail), "error_type": kind}, status_code=exc.status_code, headers=headers
        )


def allowed_methods(request: Request, named: str | None = None) -> list[str]:
    """Every method the API answers at the request's path: the methods of its OpenAPI document's path
    that matches, and ``named`` (the ``Allow`` of Starlette's own 405, which names only the first route
    that matches the path)."""
    methods = {m.strip().upper() for m in (named or "").split(",") if m.strip()}
    app = request.app
    path, root = request.scope["path"], request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if isinstance(app, FastAPI):
        for template, item in app.openapi().get("paths", {}).items():
            if compile_path(template)[0].match(path):
                methods |= {m.upper() for m in item if m.upper() in _HTTP_METHODS}
    return sorted(methods)


_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}
