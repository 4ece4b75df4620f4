"""Errors of the API and their JSON form: ``{"error", "error_type", "field"?, "issues"?}``."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from forgeflow.plugins.errors import ForgeFlowError


class ApiErrorType(StrEnum):
    """The ``error_type`` of errors the API itself answers (a plugin's or the pipeline's own errors
    keep theirs: ``UnknownPlugin``, ``PipelineValidationError`` …)."""

    BAD_REQUEST = "BadRequest"
    REQUEST_VALIDATION = "RequestValidationError"
    NOT_FOUND = "NotFound"
    CONFLICT = "Conflict"
    UNAUTHORIZED = "Unauthorized"
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
        **extra: Any,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.body: dict[str, Any] = {"error": error, "error_type": error_type, **extra}
        if field is not None:
            self.body["field"] = field
        self.headers = headers


def not_found(kind: str, ident: str, hint: str | None = None) -> ApiError:
    message = f"unknown {kind} {ident!r}" + (f"; {hint}" if hint else "")
    return ApiError(404, message, ApiErrorType.NOT_FOUND)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        issues = []
        for err in exc.errors():
            loc = err.get("loc", ())
            issues.append({"field": _loc(loc), "location": loc[0] if loc else None, "message": err.get("msg", "")})
        first: dict[str, Any] = issues[0] if issues else {"field": None, "message": "invalid request"}
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
        kind = {404: ApiErrorType.NOT_FOUND, 405: ApiErrorType.METHOD_NOT_ALLOWED, 401: ApiErrorType.UNAUTHORIZED}.get(
            exc.status_code, ApiErrorType.HTTP_ERROR
        )
        return JSONResponse(
            {"error": str(exc.detail), "error_type": kind}, status_code=exc.status_code, headers=exc.headers
        )
