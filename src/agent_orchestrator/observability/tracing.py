"""OpenTelemetry spans, exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set;
with it unset nothing is created or sent (each span site checks one module global).

Three kinds of span make a chat turn's trace, each the parent of the next:
- `server`: one per HTTP request, a child of the client's `traceparent` when it sent one;
- `chat.turn`: one per attempt of a chat task, in the worker, a child of the request's
  span (its traceparent travels in the task's input: trace_context.py);
- `step <name>`: one per plan step, whose own id is the parent id of the `traceparent`
  sent with that step's downstream calls, so the services' spans hang under it.

Parents are passed as `traceparent` strings rather than through context variables: the
trace crosses a queue and processes, and inside a process the plan runs its steps as
tasks of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
)

from agent_orchestrator.observability.trace_context import parse_traceparent

#: The process's tracer while an exporter is configured; None otherwise.
TRACER: trace.Tracer | None = None
_PROVIDER: TracerProvider | None = None
_USERS = 0  # lifespans in this process that configured it (tests run several)


def start_tracing(endpoint: str | None, service_name: str) -> None:
    """Export spans to `endpoint` (the OTLP/HTTP base URL) from now on; no-op without it."""
    global TRACER, _PROVIDER, _USERS
    if not endpoint:
        return
    _USERS += 1
    if _PROVIDER is not None:
        return
    _PROVIDER = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    _PROVIDER.add_span_processor(BatchSpanProcessor(exporter))
    TRACER = _PROVIDER.get_tracer("agent_orchestrator")


def stop_tracing() -> None:
    """Send what is buffered and stop, once the last user of the provider stops."""
    global TRACER, _PROVIDER, _USERS
    if _PROVIDER is None:
        return
    _USERS -= 1
    if _USERS > 0:
        return
    provider, _PROVIDER, TRACER = _PROVIDER, None, None
    provider.shutdown()  # flushes the batch processor


def parent_of(traceparent: str | None) -> Context | None:
    """The remote span a `traceparent` names, as a parent context (None: a new trace)."""
    parsed = parse_traceparent(traceparent) if traceparent else None
    if parsed is None:
        return None
    _, trace_id, span_id, flags = parsed.split("-")
    remote = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
    )
    return trace.set_span_in_context(NonRecordingSpan(remote))


def start_span(
    name: str,
    parent: str | None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, Any] | None = None,
) -> Span | None:
    """A started span under `parent` (a traceparent), or None when tracing is off. The
    caller ends it."""
    tracer = TRACER
    if tracer is None:
        return None
    return tracer.start_span(name, context=parent_of(parent), kind=kind, attributes=attributes)


class SpanScope:
    """What `span_scope` yields: the traceparent that makes its span a parent (None when
    tracing is off), and `fail()` for an outcome that is a failure without an exception."""

    __slots__ = ("span", "traceparent")

    def __init__(self, span: Span | None) -> None:
        self.span = span
        self.traceparent = traceparent_of(span) if span is not None else None

    def fail(self) -> None:
        if self.span is not None:
            self.span.set_status(StatusCode.ERROR)


@contextmanager
def span_scope(
    name: str,
    parent: str | None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, Any] | None = None,
) -> Iterator[SpanScope]:
    """A span around the block, under `parent`, ended with it (an error status when the
    block raises); with tracing off, a scope whose `traceparent` is None and nothing else."""
    scope = SpanScope(start_span(name, parent, kind=kind, attributes=attributes))
    if scope.span is None:
        yield scope
        return
    try:
        yield scope
    except BaseException:
        scope.fail()
        raise
    finally:
        scope.span.end()


def traceparent_of(span: Span) -> str:
    """The `traceparent` that makes `span` the parent of whatever receives it."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
