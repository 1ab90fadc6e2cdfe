"""Exception handlers: every error leaves in the one shape, with the correlation id."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from agent_orchestrator.errors import STATUS_CODES, ServiceError, error_body, validation_message
from agent_orchestrator.middleware.context import HEADER, BodyTooLarge, correlation_id_of
from agent_orchestrator.observability.logging import get_logger

log = get_logger(__name__)


def _response(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    correlation_id = correlation_id_of(request.scope)
    all_headers = dict(headers or {})
    if correlation_id:
        # The 500 handler runs outside the request layer, so set the header here too.
        all_headers[HEADER] = correlation_id
    return JSONResponse(
        error_body(code, message, details, correlation_id), status_code=status, headers=all_headers
    )


def _field_name(location: tuple[Any, ...]) -> str:
    # ("body", "metadata", "x") -> "metadata.x"; ("query", "limit") -> "limit"
    parts = [str(part) for part in location[1:]] or [str(part) for part in location]
    return ".".join(parts)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return _response(request, exc.status_code, exc.code, exc.message, exc.details, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {
            "field": _field_name(tuple(item["loc"])),
            "in": str(item["loc"][0]),
            "message": validation_message(item),
        }
        for item in exc.errors()
    ]
    fields = ", ".join(sorted({item["field"] for item in details}))
    return _response(request, 422, "validation_error", f"invalid request: {fields}", details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = STATUS_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route for {request.url.path}"
    headers = exc.headers
    if exc.status_code == 405:
        message = f"method {request.method} is not allowed here"
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
    details = exc.details if isinstance(exc, BodyTooLarge) else None
    return _response(request, exc.status_code, code, message, details, headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's 405 names only the first
    route that matched the path, and FastAPI makes one route per method: the Allow header
    of `OPTIONS /api/v1/sessions/{id}` said GET, leaving out PATCH and DELETE. Each method
    is tried against the router's own matching, which also walks included routers."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]
    return ", ".join(allowed)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # This handler runs in ServerErrorMiddleware, outside the request layer, whose
    # bound context variables are already reset: name the correlation id explicitly.
    log.exception(
        "unhandled error",
        path=request.url.path,
        error_type=type(exc).__name__,
        correlation_id=correlation_id_of(request.scope),
    )
    return _response(request, 500, "internal_error", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
