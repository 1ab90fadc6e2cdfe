"""The OpenAPI document beyond what FastAPI derives from the routes.

- What a route can answer besides its success. Every error leaves in the one shape
  (errors.py), so each documented error status points at `ErrorResponse`; FastAPI would
  otherwise describe 422 with its own `{"detail": [...]}` shape, which this service never
  sends.
- Parameters as they travel (no null in a query string or a header), bounds that are
  settings, such as the page size, and the schema of metadata to any depth.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from agent_orchestrator.config import Settings
from agent_orchestrator.models.storable import VALUE_SCHEMA


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: Any = None
    correlation_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


_MEANING = {
    400: "the request body is not JSON that can be read (`bad_request`)",
    401: "no credentials, or credentials that are not valid (`unauthorized`)",
    403: "the token lacks the operation's scope (`forbidden`)",
    404: "no such resource for the caller's tenant (`not_found`)",
    409: "the resource's state does not allow it (`conflict`)",
    413: "the request body is over MAX_REQUEST_BYTES (`payload_too_large`)",
    422: "a field is missing or not valid; `details` names it (`validation_error`)",
    429: "a rate limit is reached; `details` names it (`rate_limited`); or, for a new turn "
    "or batch, the tenant's LLM token budget for the day is spent (`budget_exceeded`)",
    503: "a token of another issuer could not be checked now: the Identity Service or the "
    "issuer's JWKS did not answer (`service_unavailable`)",
}

_SECONDS = {"schema": {"type": "integer", "minimum": 0}}
#: What a 429 carries besides its body (middleware/rate_limit.py).
_RATE_LIMIT_HEADERS = {
    "Retry-After": {**_SECONDS, "description": "seconds until a retry can pass"},
    "RateLimit-Limit": {**_SECONDS, "description": "requests per minute of the limit reached"},
    "RateLimit-Remaining": {**_SECONDS, "description": "always 0 on a 429"},
    "RateLimit-Reset": {**_SECONDS, "description": "seconds until the limit admits again"},
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses, in the one error shape."""
    entries: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _MEANING[status]}
        if status == 429:
            entry["headers"] = _RATE_LIMIT_HEADERS
        entries[status] = entry
    return entries


#: The content of a Server-Sent Events answer, one event described (as schemathesis and
#: OpenAPI 3.2's `itemSchema` read it): `id` is the cursor to resume from, `event` the
#: type, `data` the event's JSON envelope (docs/api.md, "Server-Sent Events").
SSE_CONTENT: dict[str, Any] = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["id", "event", "data"],
            "properties": {
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "event": {"type": "string"},
                "data": {"type": "string", "contentMediaType": "application/json"},
            },
        }
    }
}

#: Every route of the public API authenticates (asking the Identity Service, when one is
#: configured, about tokens of other issuers), checks a scope, validates its input and is
#: rate limited.
API_ERRORS = errors(401, 403, 422, 429, 503)


def refine_openapi(app: FastAPI, settings: Settings) -> None:
    """Four edits to the document FastAPI derives, made once when it is first built:

    - The component `StorableValue` that metadata's schema refers to (models/storable.py).
    - An optional query or header parameter is declared `str | None` in Python, which
      FastAPI renders as "a string or null". A query string or a header cannot carry a
      null: the parameter is either sent or not. Left in, the null reads as the literal
      text "null" to a client generator (schemathesis sent `Last-Event-ID: null`).
    - MAX_PAGE_SIZE becomes the `maximum` of every list's `limit`. The bound is a
      setting, read per request (routes/deps.py), so the declaration cannot carry it.
    - The batch request's bounds that are settings (BATCH_MAX_ITEMS, BATCH_MAX_PARALLEL),
      and its `callback_url` only where webhooks are enabled (WEBHOOK_SECRET set): this
      instance refuses it otherwise, as it refuses any field the document does not name.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # built once and kept by FastAPI, so these edits run once
        schema.setdefault("components", {}).setdefault("schemas", {})["StorableValue"] = (
            VALUE_SCHEMA
        )
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                for parameter in operation.get("parameters", []):
                    parameter["schema"] = _without_null(parameter["schema"])
                    if parameter["name"] == "limit" and parameter["in"] == "query":
                        parameter["schema"]["maximum"] = settings.max_page_size
        _refine_batch_request(schema["components"]["schemas"]["BatchRequest"], settings)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _refine_batch_request(schema: dict[str, Any], settings: Settings) -> None:
    properties = schema["properties"]
    properties["items"]["maxItems"] = settings.batch_max_items
    for option in properties["max_parallel"]["anyOf"]:
        if option.get("type") == "integer":
            option["maximum"] = settings.batch_max_parallel
    if settings.webhook_secret is None:
        properties.pop("callback_url", None)  # idempotent: FastAPI hands back the same dict


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    options = schema.get("anyOf")
    if not options:
        return schema
    kept = [option for option in options if option.get("type") != "null"]
    if len(kept) != 1:
        return schema
    rest = {key: value for key, value in schema.items() if key != "anyOf"}
    return {**kept[0], **rest}
