"""A test double for every downstream service of the orchestrator, in one HTTP server.

It implements the contracts written in docs/contracts/ (conversation, agent management,
agent execution, query, embedding, ingestion, workflow engine, tool registry, identity) and
an OpenAI-compatible Chat Completions endpoint, deterministically, with fault injection
(latency, error rate, status codes, Retry-After, fail the next N requests, streams cut after
N chunks, mid-stream error events, hanging requests, slow chunks) driven through an
unauthenticated control API under `/_control`. docs/contracts/test-double.md describes it.

Run it as its own process (faults such as hangs and cut connections need a real socket):

    python -m tests.doubles.downstream --host 127.0.0.1 --port 8090 \
        [--llm-api-key KEY] [--service-token TOKEN] [--seed 0]

Every service path is unique, so all the `*_URL` variables point at the same base URL, and
`LLM_BASE_URL` at `<base>/v1`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import math
import random
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import parse_qsl

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ServiceName = Literal[
    "conversation",
    "agent_management",
    "agent_execution",
    "query",
    "embedding",
    "ingestion",
    "workflow",
    "tools",
    "identity",
    "llm",
]
SERVICES: tuple[str, ...] = get_args(ServiceName)

# Path prefix -> service. The prefixes do not overlap, so one server hosts them all.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("/v1/sessions/", "conversation"),
    ("/v1/agents", "agent_management"),
    ("/v1/executions", "agent_execution"),
    ("/v1/search", "query"),
    ("/v1/embeddings", "embedding"),
    ("/v1/ingestions", "ingestion"),
    ("/v1/workflows/", "workflow"),
    ("/v1/runs/", "workflow"),
    ("/v1/tools", "tools"),
    ("/v1/introspect", "identity"),
    ("/v1/chat/completions", "llm"),
    ("/v1/models", "llm"),
)

ERROR_CODES = {
    400: "validation_error",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "timeout",
}
_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}

DEFAULT_AGENT: dict[str, Any] = {
    "id": "default",
    "name": "Default agent",
    "system_prompt": "You are a helpful assistant.",
    "model": None,
    "temperature": None,
    "knowledge": None,
    "tools": [],
    "requires": [],
}

TOOLS: dict[str, dict[str, Any]] = {
    "echo": {
        "id": "echo",
        "name": "echo",
        "description": "Returns its arguments unchanged.",
        "parameters": {"type": "object", "additionalProperties": True},
    },
    "add": {
        "id": "add",
        "name": "add",
        "description": "Adds two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}

EMBEDDING_MODEL = "double-embedding-8d"
LLM_DEFAULT_MODEL = "double-llm"
REPLY_PREFIX = "double says: "
MAX_RECORDS = 10_000
FAR_FUTURE_EXP = 4_102_444_800  # 2100-01-01T00:00:00Z

log = logging.getLogger("downstream_double")


def retryable(status: int) -> bool:
    return status == 429 or status >= 500


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def service_for(path: str) -> str | None:
    for prefix, service in _PREFIXES:
        if path.startswith(prefix):
            return service
    return None


def reply_chunks(text: str) -> list[str]:
    """Word-sized chunks whose concatenation is exactly `text`."""
    return re.findall(r"\S+\s*|\s+", text)


def word_count(messages: list[dict[str, Any]]) -> int:
    return sum(len(_text_of(m.get("content")).split()) for m in messages)


def _text_of(content: Any) -> str:
    """Text of a message content: a string, or OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def embed(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(b / 127.5) - 1.0 for b in digest[:8]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


# ---------------------------------------------------------------------------------------
# Errors


def error_body(service: str | None, status: int, message: str, code: str | None = None) -> Any:
    if service == "llm":
        kind, default_code = _OPENAI_ERRORS.get(status, ("server_error", None))
        return {
            "error": {"message": message, "type": kind, "param": None, "code": code or default_code}
        }
    return {
        "error": {
            "code": code or ERROR_CODES.get(status, "internal_error" if status >= 500 else "error"),
            "message": message,
            "retryable": retryable(status),
        }
    }


def error_response(
    service: str | None,
    status: int,
    message: str,
    *,
    code: str | None = None,
    retry_after: int | None = None,
) -> JSONResponse:
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        error_body(service, status, message, code), status_code=status, headers=headers
    )


class Reject(Exception):
    """Raised by a handler to answer with the contract's error shape."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


# ---------------------------------------------------------------------------------------
# Faults, records, streams


class FaultIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: ServiceName
    latency_ms: int = Field(0, ge=0)
    error_rate: float = Field(0.0, ge=0.0, le=1.0)
    status: int | None = Field(None, ge=400, le=599)
    retry_after: int | None = Field(None, ge=0)
    fail_times: int | None = Field(None, ge=0)
    cut_after_chunks: int | None = Field(None, ge=0)
    error_after_chunks: int | None = Field(None, ge=0)
    hang: bool = False
    chunk_delay_ms: int = Field(0, ge=0)
    # Not a failure: every streamed reply of the service is this text instead of the echo.
    reply: str | None = None


Mode = Literal["hang", "cut", "error_event", "status"]


@dataclass
class Fault:
    spec: FaultIn
    rng: random.Random
    remaining: int | None
    injected: int = 0

    def _mode(self, streaming: bool) -> Mode | None:
        s = self.spec
        if s.hang:
            return "hang"
        if streaming and s.cut_after_chunks is not None:
            return "cut"
        if streaming and s.error_after_chunks is not None:
            return "error_event"
        if s.status is not None:
            return "status"
        stream_only = s.cut_after_chunks is not None or s.error_after_chunks is not None
        if not stream_only and (s.error_rate > 0 or s.fail_times is not None):
            return "status"  # status defaults to 500
        return None

    def pick(self, streaming: bool) -> Mode | None:
        """The failure this request gets, if any (consumes fail_times / the seeded random)."""
        mode = self._mode(streaming)
        if mode is None:
            return None
        if self.remaining is not None:
            if self.remaining <= 0:
                return None
            self.remaining -= 1
        elif self.spec.error_rate > 0 and self.rng.random() >= self.spec.error_rate:
            return None
        self.injected += 1
        return mode

    def describe(self) -> dict[str, Any]:
        return {
            **self.spec.model_dump(),
            "fail_times_remaining": self.remaining,
            "injected": self.injected,
        }


@dataclass
class StreamRecord:
    id: int
    service: str
    path: str
    tenant_id: str
    opened_at: float
    closed_at: float | None = None
    chunks_sent: int = 0
    outcome: str = "open"  # completed | client_disconnected | cut | error_event


@dataclass
class RequestContext:
    service: str
    tenant_id: str
    data: Any
    headers: dict[str, str]
    mode: Mode | None
    fault: FaultIn | None


@dataclass
class DoubleState:
    seed: int = 0
    service_token: str | None = None
    llm_api_key: str | None = None
    faults: dict[str, Fault] = field(default_factory=dict)
    records: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_RECORDS))
    streams: list[StreamRecord] = field(default_factory=list)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    message_ids: set[tuple[str, str]] = field(default_factory=set)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotency: dict[tuple[str, str, str], str] = field(default_factory=dict)
    #: tokens the identity service answers inactive from now on (a logout, a revocation)
    revoked: set[str] = field(default_factory=set)
    #: tokens the identity service answers with other scopes than they spell, from now on
    scopes: dict[str, list[str]] = field(default_factory=dict)
    counter: int = 0

    def reset(self) -> None:
        self.revoked.clear()
        self.scopes.clear()
        self.faults.clear()
        self.records.clear()
        self.streams.clear()
        self.agents.clear()
        self.messages.clear()
        self.message_ids.clear()
        self.jobs.clear()
        self.runs.clear()
        self.idempotency.clear()
        self.counter = 0

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def set_fault(self, spec: FaultIn) -> Fault:
        fault = Fault(
            spec=spec,
            rng=random.Random(f"{self.seed}:{spec.service}"),
            remaining=spec.fail_times,
        )
        self.faults[spec.service] = fault
        return fault

    def agent(self, agent_id: str) -> dict[str, Any] | None:
        if agent_id in self.agents:
            return self.agents[agent_id]
        return DEFAULT_AGENT if agent_id == "default" else None

    def stream_report(self, service: str | None) -> dict[str, Any]:
        streams = [s for s in self.streams if service is None or s.service == service]
        outcomes = [s.outcome for s in streams]
        return {
            "opened": len(streams),
            "active": outcomes.count("open"),
            "closed": len(streams) - outcomes.count("open"),
            "completed": outcomes.count("completed"),
            "client_disconnected": outcomes.count("client_disconnected"),
            "cut": outcomes.count("cut"),
            "error_event": outcomes.count("error_event"),
            "streams": [asdict(s) for s in streams],
        }


# ---------------------------------------------------------------------------------------
# The gate: records, latency, auth and faults for every service request (pure ASGI, so
# hangs and streams see the real connection).


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _is_streaming(service: str, method: str, path: str, data: Any) -> bool:
    if method != "POST":
        return False
    if service == "agent_execution":
        return path.rstrip("/") == "/v1/executions"
    if service == "llm":
        return isinstance(data, dict) and data.get("stream") is True
    return False


class Gate:
    def __init__(self, app: ASGIApp, state: DoubleState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = service_for(scope["path"]) if scope["type"] == "http" else None
        if service is None:
            await self.app(scope, receive, send)
            return
        state = self.state
        body = await _read_body(receive)
        if body is None:
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        data: Any = None
        bad_json = False
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                bad_json = True
        method = scope["method"]
        state.records.append(
            {
                "service": service,
                "method": method,
                "path": scope["path"],
                "query": dict(parse_qsl(scope["query_string"].decode("latin-1"))),
                "headers": headers,
                "json": data,
                "time": time.time(),
            }
        )
        send = _echo_correlation(send, headers.get("x-correlation-id"))
        fault = state.faults.get(service)
        if fault is not None and fault.spec.latency_ms:
            await asyncio.sleep(fault.spec.latency_ms / 1000)

        denied = self._check_auth(service, headers)
        if denied is not None:
            await denied(scope, receive, send)
            return
        if bad_json:
            await error_response(service, 400, "request body is not valid JSON")(
                scope, receive, send
            )
            return

        mode = fault.pick(_is_streaming(service, method, scope["path"], data)) if fault else None
        if mode == "hang":
            await _wait_disconnect(receive)  # answer nothing; the client gives up
            return
        if mode == "status":
            assert fault is not None
            status = fault.spec.status or 500
            await error_response(
                service, status, f"injected fault ({status})", retry_after=fault.spec.retry_after
            )(scope, receive, send)
            return

        scope.setdefault("state", {})["double"] = RequestContext(
            service=service,
            tenant_id=headers.get("x-tenant-id", ""),
            data=data,
            headers=headers,
            mode=mode,
            fault=fault.spec if fault else None,
        )
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_auth(self, service: str, headers: dict[str, str]) -> Response | None:
        authorization = headers.get("authorization", "")
        if service == "llm":
            if self.state.llm_api_key is None:
                return None
            if authorization == f"Bearer {self.state.llm_api_key}":
                return None
            return error_response("llm", 401, "Incorrect API key provided.", code="invalid_api_key")
        if self.state.service_token is None:
            return None
        if authorization != f"Bearer {self.state.service_token}":
            return error_response(service, 401, "missing or invalid service token")
        # Introspection is the one call without a tenant: the tenant is what it answers.
        if service != "identity" and not headers.get("x-tenant-id"):
            return error_response(service, 400, "X-Tenant-ID header is required")
        return None


def _echo_correlation(send: Send, correlation_id: str | None) -> Send:
    if not correlation_id:
        return send

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [
                *message.get("headers", []),
                (b"x-correlation-id", correlation_id.encode("latin-1")),
            ]
        await send(message)

    return wrapped


# ---------------------------------------------------------------------------------------
# Server-sent events with cuts, error events, delays and disconnect detection


def sse(payload: Any) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class EventStream(Response):
    """Streams `head`, then the counted `chunks`, then `tail`, applying the request's fault.

    A cut returns without finishing the HTTP response, so uvicorn closes the connection
    (the client sees an incomplete chunked body). A client that goes away is noticed at
    once (a task waits for `http.disconnect`) and recorded as `client_disconnected`.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        state: DoubleState,
        ctx: RequestContext,
        path: str,
        *,
        head: list[bytes],
        chunks: list[bytes],
        tail: list[bytes],
        error_event: bytes,
    ) -> None:
        # Not Response.__init__: it would set content-length from an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.state = state
        self.ctx = ctx
        self.path = path
        self.head = head
        self.chunks = chunks
        self.tail = tail
        self.error_event = error_event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = StreamRecord(
            id=len(self.state.streams) + 1,
            service=self.ctx.service,
            path=self.path,
            tenant_id=self.ctx.tenant_id,
            opened_at=time.time(),
        )
        self.state.streams.append(record)
        gone = asyncio.Event()

        async def watch() -> None:
            await _wait_disconnect(receive)
            gone.set()

        watcher = asyncio.create_task(watch())
        fault = self.ctx.fault
        delay = (fault.chunk_delay_ms / 1000) if fault else 0.0
        cut = fault.cut_after_chunks if fault and self.ctx.mode == "cut" else None
        error_after = fault.error_after_chunks if fault and self.ctx.mode == "error_event" else None

        async def pause() -> bool:
            """Waits `delay`; False when the client went away meanwhile."""
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), delay)
            else:
                await asyncio.sleep(0)
            return not gone.is_set()

        async def emit(data: bytes) -> bool:
            if gone.is_set():
                return False
            await send({"type": "http.response.body", "body": data, "more_body": True})
            return not gone.is_set()

        outcome = "completed"
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for data in self.head:
                if not await emit(data):
                    outcome = "client_disconnected"
                    return
            for index, data in enumerate(self.chunks):
                if cut is not None and index >= cut:
                    outcome = "cut"
                    return
                if error_after is not None and index >= error_after:
                    await emit(self.error_event)
                    outcome = "error_event"
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                if (index > 0 and not await pause()) or not await emit(data):
                    outcome = "client_disconnected"
                    return
                record.chunks_sent += 1
            if cut is not None:
                outcome = "cut"
                return
            if error_after is not None:
                await emit(self.error_event)
                outcome = "error_event"
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if self.chunks and not await pause():
                outcome = "client_disconnected"
                return
            for data in self.tail:
                if not await emit(data):
                    outcome = "client_disconnected"
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            outcome = "client_disconnected"
        finally:
            watcher.cancel()
            record.outcome = outcome
            record.closed_at = time.time()


class _QuietCut(logging.Filter):
    """A cut is deliberate: hide uvicorn's complaint about the unfinished response."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


# ---------------------------------------------------------------------------------------
# Request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class MessageIn(_Body):
    id: str = Field(min_length=1)
    role: Literal["user", "assistant", "system", "tool"]
    content: str
    task_id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class KnowledgeIn(_Body):
    collection_ids: list[str]
    top_k: int = Field(5, ge=1, le=100)


class AgentIn(_Body):
    id: str = Field(min_length=1)
    name: str | None = None
    system_prompt: str = ""
    model: str | None = None
    temperature: float | None = None
    knowledge: KnowledgeIn | None = None
    tools: list[str] = Field(default_factory=list)
    requires: list[str] = Field(default_factory=list)

    def as_contract(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name if self.name is not None else self.id,
            "system_prompt": self.system_prompt,
            "model": self.model,
            "temperature": self.temperature,
            "knowledge": self.knowledge.model_dump(include={"collection_ids", "top_k"})
            if self.knowledge
            else None,
            "tools": self.tools,
            "requires": self.requires,
        }


class ChatMessageIn(_Body):
    role: Literal["user", "assistant", "system", "tool"]
    content: str


class ExecutionIn(_Body):
    agent: AgentIn
    messages: list[ChatMessageIn]
    context: dict[str, Any] = Field(default_factory=dict)
    stream: bool = True


class SearchIn(_Body):
    query: str
    collection_ids: list[str] = Field(default_factory=list)
    top_k: int = Field(5, ge=1, le=100)


class EmbeddingsIn(_Body):
    texts: list[str] = Field(min_length=1, max_length=2048)


class DocumentIn(_Body):
    id: str = Field(min_length=1)
    content: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class IngestionIn(_Body):
    documents: list[DocumentIn] = Field(min_length=1)


class RunIn(_Body):
    input: dict[str, Any] = Field(default_factory=dict)


class InvokeIn(_Body):
    arguments: dict[str, Any] = Field(default_factory=dict)


class IntrospectIn(_Body):
    token: str


class ScopesIn(_Body):
    token: str
    scopes: list[str]


class ChatCompletionIn(_Body):
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    temperature: float | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream_options: dict[str, Any] | None = None


_M = TypeVar("_M", bound=BaseModel)


def _ctx(request: Request) -> RequestContext:
    ctx: RequestContext = request.scope["state"]["double"]
    return ctx


def _reply_text(fault: FaultIn | None, user_text: str) -> str:
    return fault.reply if fault and fault.reply is not None else REPLY_PREFIX + user_text


def _parse(model: type[_M], ctx: RequestContext) -> _M:
    try:
        return model.model_validate(ctx.data if ctx.data is not None else {})
    except ValidationError as exc:
        raise Reject(422, describe_errors(exc.errors())) from exc


def describe_errors(errors: Any) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)


def _advance(entry: dict[str, Any]) -> str:
    """queued -> running -> final, one step per status read."""
    entry["reads"] += 1
    steps = ["queued", "running", entry["final"]]
    entry["status"] = steps[min(entry["reads"], 2)]
    return str(entry["status"])


# ---------------------------------------------------------------------------------------
# The application


def create_app(
    *, seed: int = 0, service_token: str | None = None, llm_api_key: str | None = None
) -> FastAPI:
    state = DoubleState(seed=seed, service_token=service_token, llm_api_key=llm_api_key)
    app = FastAPI(title="Downstream test double", docs_url=None, redoc_url=None)
    app.state.double = state
    app.add_middleware(Gate, state=state)

    @app.exception_handler(Reject)
    async def on_reject(request: Request, exc: Reject) -> Response:
        return error_response(service_for(request.url.path), exc.status, exc.message, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(service_for(request.url.path), 422, describe_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(service_for(request.url.path), exc.status_code, str(exc.detail))

    # -- conversation ------------------------------------------------------------------

    @app.get("/v1/sessions/{session_id}/messages")
    async def list_messages(
        request: Request, session_id: str, limit: int = Query(50, ge=1, le=1000)
    ) -> Any:
        ctx = _ctx(request)
        stored = state.messages.get((ctx.tenant_id, session_id), [])
        return {"messages": stored[-limit:]}

    @app.post("/v1/sessions/{session_id}/messages")
    async def save_message(request: Request, session_id: str) -> Any:
        ctx = _ctx(request)
        body = _parse(MessageIn, ctx)
        key = (ctx.tenant_id, body.id)
        if key in state.message_ids:
            return JSONResponse({"id": body.id}, status_code=200)
        state.message_ids.add(key)
        state.messages.setdefault((ctx.tenant_id, session_id), []).append(
            {
                "id": body.id,
                "role": body.role,
                "content": body.content,
                "created_at": now_iso(),
                "task_id": body.task_id,
                "metadata": body.metadata,
            }
        )
        return JSONResponse({"id": body.id}, status_code=201)

    # -- agent management --------------------------------------------------------------

    @app.get("/v1/agents/{agent_id}")
    async def get_agent(agent_id: str) -> Any:
        agent = state.agent(agent_id)
        if agent is None:
            raise Reject(404, f"agent {agent_id!r} not found", "not_found")
        return agent

    # -- agent execution ---------------------------------------------------------------

    @app.post("/v1/executions")
    async def execute(request: Request) -> Any:
        ctx = _ctx(request)
        body = _parse(ExecutionIn, ctx)
        if not body.stream:
            raise Reject(422, "stream must be true: executions are only streamed")
        messages = [m.model_dump() for m in body.messages]
        fault = ctx.fault
        pieces = reply_chunks(_reply_text(fault, last_user_text(messages)))
        status = (fault.status if fault else None) or 500
        return EventStream(
            state,
            ctx,
            request.url.path,
            head=[],
            chunks=[
                sse({"type": "chunk", "content": piece, "index": i})
                for i, piece in enumerate(pieces)
            ],
            tail=[
                sse(
                    {
                        "type": "done",
                        "usage": {
                            "prompt_tokens": word_count(messages),
                            "completion_tokens": len(pieces),
                        },
                        "finish_reason": "stop",
                    }
                )
            ],
            error_event=sse(
                {
                    "type": "error",
                    "code": ERROR_CODES.get(status, "internal_error"),
                    "message": f"injected mid-stream error ({status})",
                    "retryable": retryable(status),
                }
            ),
        )

    # -- query -------------------------------------------------------------------------

    @app.post("/v1/search")
    async def search(request: Request) -> Any:
        body = _parse(SearchIn, _ctx(request))
        collections = body.collection_ids
        results = []
        if collections:
            for i in range(body.top_k):
                collection = collections[i % len(collections)]
                results.append(
                    {
                        "title": f"{collection} result {i + 1}",
                        "url": f"https://double.invalid/{collection}/{i + 1}",
                        "snippet": f"Passage {i + 1} about {body.query}",
                        "score": round(1 / (i + 1), 4),
                    }
                )
        return {"results": results}

    # -- embedding ---------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        body = _parse(EmbeddingsIn, _ctx(request))
        return {"model": EMBEDDING_MODEL, "embeddings": [embed(t) for t in body.texts]}

    # -- ingestion ---------------------------------------------------------------------

    def _idempotent(ctx: RequestContext, kind: str) -> str | None:
        key = ctx.headers.get("idempotency-key")
        return state.idempotency.get((ctx.tenant_id, kind, key)) if key else None

    def _remember(ctx: RequestContext, kind: str, value: str) -> None:
        key = ctx.headers.get("idempotency-key")
        if key:
            state.idempotency[(ctx.tenant_id, kind, key)] = value

    @app.post("/v1/ingestions")
    async def ingest(request: Request) -> Any:
        ctx = _ctx(request)
        body = _parse(IngestionIn, ctx)
        existing = _idempotent(ctx, "ingestion")
        if existing is not None:
            job = state.jobs[existing]
            return JSONResponse({"job_id": existing, "status": job["status"]}, status_code=202)
        job_id = state.next_id("job")
        fails = any(d.metadata.get("double_fail") for d in body.documents)
        state.jobs[job_id] = {
            "tenant_id": ctx.tenant_id,
            "status": "queued",
            "reads": 0,
            "final": "failed" if fails else "succeeded",
            "documents": len(body.documents),
        }
        _remember(ctx, "ingestion", job_id)
        return JSONResponse({"job_id": job_id, "status": "queued"}, status_code=202)

    @app.get("/v1/ingestions/{job_id}")
    async def ingestion_status(request: Request, job_id: str) -> Any:
        job = state.jobs.get(job_id)
        if job is None or job["tenant_id"] != _ctx(request).tenant_id:
            raise Reject(404, f"ingestion job {job_id!r} not found", "not_found")
        status = _advance(job)
        answer: dict[str, Any] = {
            "job_id": job_id,
            "status": status,
            "documents": job["documents"],
        }
        if status == "failed":
            answer["error"] = {"code": "ingestion_failed", "message": "a document failed"}
        return answer

    # -- workflow engine ---------------------------------------------------------------

    @app.post("/v1/workflows/{workflow_id}/runs")
    async def start_run(request: Request, workflow_id: str) -> Any:
        ctx = _ctx(request)
        body = _parse(RunIn, ctx)
        existing = _idempotent(ctx, "run")
        if existing is not None:
            return JSONResponse(
                {"run_id": existing, "status": state.runs[existing]["status"]}, status_code=202
            )
        run_id = state.next_id("run")
        state.runs[run_id] = {
            "tenant_id": ctx.tenant_id,
            "workflow_id": workflow_id,
            "input": body.input,
            "status": "queued",
            "reads": 0,
            "final": "failed" if body.input.get("double_fail") else "succeeded",
        }
        _remember(ctx, "run", run_id)
        return JSONResponse({"run_id": run_id, "status": "queued"}, status_code=202)

    @app.get("/v1/runs/{run_id}")
    async def run_status(request: Request, run_id: str) -> Any:
        run = state.runs.get(run_id)
        if run is None or run["tenant_id"] != _ctx(request).tenant_id:
            raise Reject(404, f"run {run_id!r} not found", "not_found")
        status = _advance(run)
        answer: dict[str, Any] = {"run_id": run_id, "status": status, "output": None}
        if status == "succeeded":
            answer["output"] = {"workflow_id": run["workflow_id"], "input": run["input"]}
        elif status == "failed":
            answer["error"] = {"code": "workflow_failed", "message": "the workflow failed"}
        return answer

    # -- tool registry -----------------------------------------------------------------

    @app.get("/v1/tools")
    async def list_tools() -> Any:
        return {"tools": list(TOOLS.values())}

    @app.post("/v1/tools/{tool_id}/invoke")
    async def invoke_tool(request: Request, tool_id: str) -> Any:
        body = _parse(InvokeIn, _ctx(request))
        if tool_id not in TOOLS:
            raise Reject(404, f"tool {tool_id!r} not found", "not_found")
        if tool_id == "echo":
            return {"result": body.arguments}
        a, b = body.arguments.get("a"), body.arguments.get("b")
        numbers = (int, float)
        if not isinstance(a, numbers) or not isinstance(b, numbers):
            raise Reject(422, "add needs numeric arguments a and b")
        return {"result": a + b}

    # -- identity ----------------------------------------------------------------------

    @app.post("/v1/introspect")
    async def introspect(request: Request) -> Any:
        body = _parse(IntrospectIn, _ctx(request))
        parts = body.token.split(":", 3)  # scopes may hold colons: tok:acme:alice:chat:write
        revoked = body.token in state.revoked
        if not revoked and len(parts) in (3, 4) and parts[0] == "tok" and parts[1] and parts[2]:
            scopes = [s for s in parts[3].split(",") if s] if len(parts) == 4 else []
            scopes = state.scopes.get(body.token, scopes)
            return {
                "active": True,
                "sub": parts[2],
                "tenant_id": parts[1],
                "scopes": scopes,
                "exp": FAR_FUTURE_EXP,
            }
        return {"active": False, "sub": None, "tenant_id": None, "scopes": [], "exp": None}

    # -- LLM (OpenAI-compatible) -------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> Any:
        return {
            "object": "list",
            "data": [
                {"id": LLM_DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "double"}
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        ctx = _ctx(request)
        body = _parse(ChatCompletionIn, ctx)
        model = body.model or LLM_DEFAULT_MODEL
        pieces = reply_chunks(_reply_text(ctx.fault, last_user_text(body.messages)))
        limit = body.max_completion_tokens or body.max_tokens
        finish = "stop"
        if limit is not None and limit < len(pieces):
            pieces, finish = pieces[:limit], "length"
        usage = {
            "prompt_tokens": word_count(body.messages),
            "completion_tokens": len(pieces),
            "total_tokens": word_count(body.messages) + len(pieces),
        }
        completion_id = state.next_id("chatcmpl")
        created = int(time.time())
        if not body.stream:
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if include_usage:
                payload["usage"] = None
            return sse(payload)

        tail = [chunk({}, finish)]
        if include_usage:
            tail.append(
                sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            )
        tail.append(sse("[DONE]"))
        status = (ctx.fault.status if ctx.fault else None) or 500
        return EventStream(
            state,
            ctx,
            request.url.path,
            head=[chunk({"role": "assistant", "content": ""}, None)],
            chunks=[chunk({"content": piece}, None) for piece in pieces],
            tail=tail,
            error_event=sse(error_body("llm", status, f"injected mid-stream error ({status})")),
        )

    # -- the health check every platform service answers (no auth, not recorded) ------------

    @app.get("/health")
    async def service_health() -> Any:
        return {"status": "ok"}

    # -- control API (no auth, not recorded) -------------------------------------------

    @app.get("/_control/health")
    async def health() -> Any:
        return {"status": "ok"}

    @app.post("/_control/faults")
    async def set_fault(spec: FaultIn) -> Any:
        return state.set_fault(spec).describe()

    @app.get("/_control/faults")
    async def get_faults() -> Any:
        return {"faults": [f.describe() for f in state.faults.values()]}

    @app.delete("/_control/faults")
    async def clear_faults(service: str | None = None) -> Any:
        if service is None:
            cleared = len(state.faults)
            state.faults.clear()
        else:
            cleared = 1 if state.faults.pop(service, None) else 0
        return {"cleared": cleared}

    @app.post("/_control/agents", status_code=201)
    async def register_agent(agent: AgentIn) -> Any:
        state.agents[agent.id] = agent.as_contract()
        return state.agents[agent.id]

    @app.get("/_control/requests")
    async def recorded(service: str | None = None, path: str | None = None) -> Any:
        found = [
            r
            for r in state.records
            if (service is None or r["service"] == service) and (path is None or r["path"] == path)
        ]
        return {"count": len(found), "requests": found}

    @app.delete("/_control/requests")
    async def forget_requests() -> Any:
        state.records.clear()
        return {"cleared": True}

    @app.post("/_control/revoked")
    async def revoke(body: IntrospectIn) -> Any:
        state.revoked.add(body.token)
        return {"revoked": len(state.revoked)}

    @app.post("/_control/scopes")
    async def rescope(body: ScopesIn) -> Any:
        state.scopes[body.token] = body.scopes
        return {"rescoped": len(state.scopes)}

    @app.get("/_control/streams")
    async def streams(service: str | None = None) -> Any:
        return state.stream_report(service)

    @app.post("/_control/reset")
    async def reset() -> Any:
        state.reset()
        return {"status": "reset"}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.doubles.downstream", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--llm-api-key", help="require 'Authorization: Bearer KEY' on /v1/chat")
    parser.add_argument(
        "--service-token", help="require 'Authorization: Bearer TOKEN' and X-Tenant-ID"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the error_rate draws")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("uvicorn.error").addFilter(_QuietCut())
    app = create_app(seed=args.seed, service_token=args.service_token, llm_api_key=args.llm_api_key)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    turn_off_full_collections()
    uvicorn.Server(config).run()


def turn_off_full_collections() -> None:
    """The double stands in for downstream services that answer at once, so its own
    pauses must not show up in what the benchmarks measure. What it keeps (the request
    log, conversations, stream records) grows during a run, and a full collection walked
    all of it and every object its imports made: measured in the chat benchmark, 30-84 ms
    pauses every few thousand turns, each delaying every request in flight, in the
    orchestrated turns and the direct replays alike. So the start-up objects are frozen
    (never walked again) and full collections are off: what the double keeps holds no
    reference cycles, and the cycles a request leaves behind die in the young
    collections, which still run."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1_000_000_000)


if __name__ == "__main__":
    main()
