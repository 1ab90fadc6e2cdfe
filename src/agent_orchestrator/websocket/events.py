"""The `/ws/v1` protocol's messages: what a client may send (typed, discriminated by `type`)
and how every server message is framed (the event envelope of DESIGN section 8).

Parsing never raises anything but `ProtocolError`, whose code and field paths become a
`system.error`: a bad message is answered, never fatal to the connection.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from agent_orchestrator.errors import validation_message
from agent_orchestrator.events.models import Event
from agent_orchestrator.models.chat import ChatRequest
from agent_orchestrator.models.storable import UnstorableJson, storable_json, strict_json

#: Codes of a `system.error` that a client may simply retry.
RETRYABLE = frozenset({"rate_limited", "service_unavailable", "timeout", "internal_error"})

RequestId = Annotated[str | None, Field(default=None, min_length=1, max_length=128)]


class _ClientMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: RequestId = None


class AuthMessage(_ClientMessage):
    type: Literal["auth"]
    token: str = Field(min_length=1, max_length=8192)


class ChatSend(ChatRequest):
    """ChatRequest's fields and rules, plus what a socket needs instead of headers."""

    type: Literal["chat.send"]
    request_id: RequestId = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    subscribe: bool = True

    def to_request(self) -> ChatRequest:
        return ChatRequest.model_validate(self.model_dump(include=set(ChatRequest.model_fields)))


class ChatCancel(_ClientMessage):
    type: Literal["chat.cancel"]
    task_id: uuid.UUID


class _Target(_ClientMessage):
    session_id: uuid.UUID | None = None
    task_id: uuid.UUID | None = None
    batch_id: uuid.UUID | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> _Target:
        named = [self.session_id, self.task_id, self.batch_id]
        if sum(value is not None for value in named) != 1:
            raise ValueError("give exactly one of session_id, task_id and batch_id")
        return self


class Subscribe(_Target):
    type: Literal["subscribe"]
    after: str | None = Field(default=None, pattern=r"^[0-9]{1,20}$")


class Unsubscribe(_Target):
    type: Literal["unsubscribe"]


class Ping(_ClientMessage):
    type: Literal["system.ping"]


ClientMessage = Annotated[
    AuthMessage | ChatSend | ChatCancel | Subscribe | Unsubscribe | Ping,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("auth", "chat.send", "chat.cancel", "subscribe", "unsubscribe", "system.ping")


class ProtocolError(Exception):
    """A client message that cannot be acted on; becomes a `system.error`."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: list[dict[str, str]] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.request_id = request_id


def _field_path(location: tuple[int | str, ...]) -> str:
    # Drop the union tag pydantic puts first ("chat.send"), keep the fields.
    parts = [str(part) for part in location[1:]] if location else []
    return ".".join(parts) or "(message)"


def parse_client_message(text: str) -> ClientMessage:
    """One text frame into a typed message, or ProtocolError naming what is wrong."""
    try:
        data = strict_json(text)
    except (ValueError, RecursionError) as error:
        raise ProtocolError("bad_request", f"message is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", "a message must be a JSON object with a 'type'")
    raw_id = data.get("request_id")
    request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 128 else None
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(
            "validation_error",
            "a message needs a string 'type'",
            details=[{"field": "type", "message": "required, one of " + ", ".join(CLIENT_TYPES)}],
            request_id=request_id,
        )
    if kind not in CLIENT_TYPES:
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {kind[:64]!r}",
            details=[{"field": "type", "message": "one of " + ", ".join(CLIENT_TYPES)}],
            request_id=request_id,
        )
    try:
        # Every message type at once: nesting, and text no database here can store. A bad
        # string is then a validation error instead of a failed transaction.
        storable_json(data)
    except UnstorableJson as error:
        raise ProtocolError(
            "validation_error",
            f"invalid {kind}: {error}",
            details=[{"field": error.path or "(message)", "message": error.reason}],
            request_id=request_id,
        ) from None
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as error:
        details = [
            {"field": _field_path(item["loc"]), "message": validation_message(item)}
            for item in error.errors(include_url=False, include_input=False)
        ]
        first = details[0]
        raise ProtocolError(
            "validation_error",
            f"invalid {kind}: {first['field']}: {first['message']}",
            details=details,
            request_id=request_id,
        ) from None


# --- server messages ------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def envelope(
    kind: str,
    data: dict[str, Any],
    *,
    tenant_id: str = "",
    session_id: str | None = None,
    task_id: str | None = None,
) -> str:
    """A server message that is not a logged event: `id` is empty (not a cursor)."""
    message = {
        "id": "",
        "type": kind,
        "tenant_id": tenant_id,
        "session_id": session_id,
        "task_id": task_id,
        "ts": _now(),
        "data": data,
    }
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def error_message(
    code: str,
    message: str,
    *,
    tenant_id: str = "",
    request_id: str | None = None,
    details: Any = None,
    retryable: bool | None = None,
) -> str:
    data: dict[str, Any] = {
        "code": code,
        "message": message,
        "retryable": code in RETRYABLE if retryable is None else retryable,
        "request_id": request_id,
    }
    if details is not None:
        data["details"] = details
    return envelope("system.error", data, tenant_id=tenant_id)


def ack_message(
    for_type: str,
    request_id: str | None,
    *,
    tenant_id: str,
    session_id: str | None = None,
    task_id: str | None = None,
    **data: Any,
) -> str:
    body = {"for": for_type, "request_id": request_id, **data}
    return envelope("system.ack", body, tenant_id=tenant_id, session_id=session_id, task_id=task_id)


class EventEncoder:
    """Serialises each bus event once, however many sockets receive it: the same event
    object (same id, same content) reaches every local subscriber of its stream."""

    def __init__(self, capacity: int = 1024) -> None:
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity

    def encode(self, event: Event) -> str:
        if not event.id:
            return event.model_dump_json()
        text = self._cache.get(event.id)
        if text is None:
            text = self._cache[event.id] = event.model_dump_json()
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return text
