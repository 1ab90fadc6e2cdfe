"""The service's one error shape and the exceptions that map onto it.

Every error body is `{"error": {"code", "message", "details", "correlation_id"}}`; the codes
follow the platform's error matrix (docs/api.md lists them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent_orchestrator.models.storable import NO_NUL


class ServiceError(Exception):
    """An error with a stable code, an HTTP status and optional details."""

    status_code = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}
        if code is not None:
            self.code = code


class ValidationFailed(ServiceError):
    status_code = 422
    code = "validation_error"


def field_problem(field: str, where: str, message: str) -> dict[str, str]:
    """One entry of a validation error's `details`, as the request validator writes them:
    the field, where the request carries it (`body`, `query`, `header`, `path`), and what
    is wrong with it."""
    return {"field": field, "in": where, "message": message}


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str = "authentication required", **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kwargs)


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class ServiceUnavailable(ServiceError):
    status_code = 503
    code = "service_unavailable"


class RateLimited(ServiceError):
    status_code = 429
    code = "rate_limited"


#: Default code for a bare HTTP status (framework-raised errors such as 404 and 405).
STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}


def error_body(
    code: str, message: str, details: Any = None, correlation_id: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "details": details,
            "correlation_id": correlation_id,
        }
    }


def validation_message(item: Mapping[str, Any]) -> str:
    """A pydantic error's message for a client, over HTTP or a WebSocket: pydantic's own,
    except where it only quotes a pattern or an encoding a reader would have to decode,
    and without the prefix it puts before our own validators' words."""
    kind, message = item.get("type"), str(item["msg"])
    if kind == "string_pattern_mismatch" and item.get("ctx", {}).get("pattern") == NO_NUL:
        return "must not contain the NUL character (U+0000)"
    if kind == "string_unicode":
        return "must be Unicode text (a lone surrogate is not)"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    return message
