"""Runs an orchestration plan across the downstream services.

Independent steps run concurrently; each waits only for the steps it depends on. Every
attempt passes the service's circuit breaker and concurrency cap, runs under the step's
timeout, and is retried with backoff and jitter (tenacity) when the failure is retryable,
the policy allows and the service's retry budget has room (at most
`retry_concurrency` steps of one service retrying at once, so a failing service is not
sent a storm of retries). An optional step that fails is skipped with a warning; a required
step that fails fails the plan with the downstream error code. A streaming step forwards
its chunks as they arrive (coalescing those that arrive while one is being published:
reply_chunks.py) and is retried only before its first chunk arrived.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

import tenacity
from opentelemetry.trace import SpanKind

from agent_orchestrator.clients.base import CallContext, DownstreamError
from agent_orchestrator.models.agent import ReplyChunk, ReplyDone, Usage
from agent_orchestrator.models.orchestration import (
    OrchestrationPlan,
    Ref,
    RetryPolicy,
    ServiceCall,
    StepOutcome,
)
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.observability.metrics import (
    SERVICE_CALL_FAILURES,
    SERVICE_CALL_SECONDS,
    SERVICE_RETRIES_SHED,
)
from agent_orchestrator.observability.tracing import span_scope
from agent_orchestrator.resilience.circuit_breaker import CircuitBreaker, Permit
from agent_orchestrator.services.reply_chunks import ChunkForwarder

log = get_logger(__name__)

#: A streamed step's deadline (`call.timeout` for the next event) is moved on only once
#: this share of it has passed since it was last set. Setting it at every event (a timer
#: made and cancelled per token) was 3% of an embedded turn's CPU; the wait for an event
#: may now end up to 1% early, and forwarding the first piece (one publish) counts in it.
_REARM_SHARE = 0.01


class PlanFailed(Exception):
    def __init__(self, outcome: StepOutcome, error: DownstreamError) -> None:
        super().__init__(f"step {outcome.step} failed: {error.code}")
        self.outcome = outcome
        self.error = error


@dataclass
class StreamedReply:
    content: str
    usage: Usage
    finish_reason: str
    model: str | None
    chunks: int


@dataclass
class PlanRun:
    """One execution of a plan: its context, inputs, and where its side channels go."""

    ctx: CallContext
    request: dict[str, Any]
    on_chunk: Callable[[ReplyChunk], Awaitable[None]]
    on_progress: Callable[[int, int], Awaitable[None]]
    on_warning: Callable[[StepOutcome], Awaitable[None]]
    on_step: Callable[[StepOutcome, float], Awaitable[None]]
    outcomes: dict[str, StepOutcome] = field(default_factory=dict)


@dataclass
class ResilienceSettings:
    failure_threshold: int = 5
    failure_rate: float = 0.5
    window_seconds: float = 30.0
    open_seconds: float = 10.0
    half_open_probes: int = 1
    service_concurrency: int = 50
    retry_concurrency: int = 3


class ServiceCoordinator:
    def __init__(self, services: dict[str, Any], resilience: ResilienceSettings) -> None:
        self.services = services
        self.resilience = resilience
        self.breakers: dict[str, CircuitBreaker] = {}
        self.bulkheads: dict[str, asyncio.Semaphore] = {}
        #: Steps per service between their first failed attempt and their last retry.
        self.retrying: dict[str, int] = {}

    def available(self, service: str) -> bool:
        return self.services.get(service) is not None

    def breaker(self, service: str) -> CircuitBreaker:
        if service not in self.breakers:
            r = self.resilience
            self.breakers[service] = CircuitBreaker(
                service,
                failure_threshold=r.failure_threshold,
                failure_rate=r.failure_rate,
                window_seconds=r.window_seconds,
                open_seconds=r.open_seconds,
                half_open_probes=r.half_open_probes,
            )
        return self.breakers[service]

    def bulkhead(self, service: str) -> asyncio.Semaphore:
        if service not in self.bulkheads:
            self.bulkheads[service] = asyncio.Semaphore(self.resilience.service_concurrency)
        return self.bulkheads[service]

    # --- the plan -------------------------------------------------------------------------
    async def run(self, plan: OrchestrationPlan, run: PlanRun) -> dict[str, StepOutcome]:
        finished: dict[str, asyncio.Future[StepOutcome]] = {
            step.step: asyncio.get_running_loop().create_future() for step in plan.steps
        }
        total = len(plan.steps)
        completed = 0

        async def step_task(call: ServiceCall) -> None:
            nonlocal completed
            for dependency in call.depends_on:
                await asyncio.shield(finished[dependency])
            outcome = await self._run_step(call, run)
            run.outcomes[call.step] = outcome
            finished[call.step].set_result(outcome)
            completed += 1
            await run.on_progress(completed, total)

        try:
            async with asyncio.TaskGroup() as group:
                for call in plan.steps:
                    group.create_task(step_task(call), name=f"step-{call.step}")
        except* PlanFailed as failures:
            raise failures.exceptions[0] from None
        return run.outcomes

    async def _run_step(self, call: ServiceCall, run: PlanRun) -> StepOutcome:
        if call.when is not None and not resolve(call.when, run):
            outcome = StepOutcome(
                step=call.step,
                service=call.service,
                operation=call.operation,
                status="skipped",
            )
            await run.on_step(outcome, 0.0)
            return outcome
        attributes = {"service": call.service, "operation": call.operation}
        with span_scope(
            f"step {call.step}", run.ctx.traceparent, kind=SpanKind.CLIENT, attributes=attributes
        ) as scope:
            # The step's span is the parent of its downstream calls (tracing.py).
            ctx = (
                run.ctx
                if scope.traceparent is None
                else replace(run.ctx, traceparent=scope.traceparent)
            )
            outcome = await self._run_called_step(call, run, ctx)
            if outcome.status == "failed":  # an optional step's failure raises nothing
                scope.fail()
            return outcome

    async def _run_called_step(
        self, call: ServiceCall, run: PlanRun, ctx: CallContext
    ) -> StepOutcome:
        client = self.services.get(call.service)
        started = time.perf_counter()
        attempts = 0
        try:
            if client is None:
                raise DownstreamError(
                    call.service,
                    "service_unavailable",
                    f"no {call.service} service is configured",
                    retryable=False,
                )
            inputs = {name: resolve(value, run) for name, value in call.inputs.items()}
            operation = getattr(client, call.operation)

            async def attempt() -> Any:
                nonlocal attempts
                attempts += 1
                if call.stream:
                    return await self._stream_once(call, operation, inputs, run, ctx)
                return await self._call_once(call, operation, inputs, ctx)

            output = await self._with_retries(call, attempt)
        except DownstreamError as error:
            latency = (time.perf_counter() - started) * 1000
            SERVICE_CALL_FAILURES.labels(call.service, error.code).inc()
            outcome = StepOutcome(
                step=call.step,
                service=call.service,
                operation=call.operation,
                status="failed",
                attempts=attempts,
                latency_ms=latency,
                error={"code": error.code, "message": error.message, "retryable": error.retryable},
            )
            await run.on_step(outcome, latency)
            if call.required:
                raise PlanFailed(outcome, error) from error
            log.warning("optional step degraded", step=call.step, code=error.code)
            await run.on_warning(outcome)
            return outcome
        latency = (time.perf_counter() - started) * 1000
        SERVICE_CALL_SECONDS.labels(call.service, call.operation).observe(latency / 1000)
        outcome = StepOutcome(
            step=call.step,
            service=call.service,
            operation=call.operation,
            status="succeeded",
            attempts=attempts,
            latency_ms=latency,
            output=output,
        )
        await run.on_step(outcome, latency)
        return outcome

    async def _with_retries(self, call: ServiceCall, attempt: Callable[[], Awaitable[Any]]) -> Any:
        """The first attempt runs bare (the common case: it works); retries of retryable
        failures run in a tenacity loop, waiting Retry-After when the service said so,
        else exponential backoff with jitter. A step retries only while fewer than
        `retry_concurrency` steps of its service are retrying; otherwise its first failure
        stands (Envoy's `max_retries` works the same way: a shed retry is not queued)."""
        policy = call.retry
        try:
            return await attempt()
        except DownstreamError as error:
            if policy.attempts <= 1 or not error.retryable:
                raise
            first_failure = error
        service = call.service
        retrying = self.retrying.get(service, 0)
        if retrying >= self.resilience.retry_concurrency:
            SERVICE_RETRIES_SHED.labels(service).inc()
            raise DownstreamError(
                service,
                first_failure.code,
                f"{first_failure.message} (not retried: {retrying} steps of {service} "
                "are retrying already)",
                retryable=first_failure.retryable,
                status=first_failure.status,
                retry_after=first_failure.retry_after,
            ) from first_failure
        self.retrying[service] = retrying + 1
        try:
            await asyncio.sleep(_delay(policy, first_failure, 1))

            def wait(state: tenacity.RetryCallState) -> float:
                error = state.outcome.exception() if state.outcome else None
                return _delay(policy, error, state.attempt_number + 1)

            retry_loop = tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(policy.attempts - 1),
                wait=wait,
                retry=tenacity.retry_if_exception(
                    lambda error: isinstance(error, DownstreamError) and error.retryable
                ),
                reraise=True,
            )
            return await retry_loop(attempt)
        finally:
            self.retrying[service] -= 1

    def _admitted(self, service: str) -> Permit:
        permit = self.breaker(service).admit()
        if permit is None:
            raise DownstreamError(
                service, "circuit_open", f"{service} is failing; calls are paused", retryable=False
            )
        return permit

    async def _call_once(
        self,
        call: ServiceCall,
        operation: Callable[..., Awaitable[Any]],
        inputs: dict[str, Any],
        ctx: CallContext,
    ) -> Any:
        permit = self._admitted(call.service)
        async with self.bulkhead(call.service):
            try:
                async with asyncio.timeout(call.timeout):
                    result = await operation(ctx, **inputs)
            except TimeoutError as error:
                permit.failed()
                raise DownstreamError(
                    call.service,
                    "timeout",
                    f"{call.operation} took longer than {call.timeout:g} s",
                    retryable=True,
                ) from error
            except DownstreamError as error:
                _judge(permit, error)
                raise
            except BaseException:  # cancelled, or our own failure: no verdict on the service
                permit.released()  # (kept, a half-open probe's slot would never come back)
                raise
        permit.succeeded()
        return result

    async def _stream_once(
        self,
        call: ServiceCall,
        operation: Callable[..., AsyncGenerator[Any]],
        inputs: dict[str, Any],
        run: PlanRun,
        ctx: CallContext,
    ) -> StreamedReply:
        permit = self._admitted(call.service)
        pieces: list[str] = []
        done: ReplyDone | None = None
        forward = ChunkForwarder(run.on_chunk)
        async with self.bulkhead(call.service):
            try:
                async with (
                    aclosing(operation(ctx, **inputs)) as events,
                    asyncio.timeout(call.timeout) as deadline,
                ):
                    iterator = aiter(events)
                    loop = asyncio.get_running_loop()
                    armed = loop.time()
                    while True:
                        now = loop.time()
                        if now - armed > call.timeout * _REARM_SHARE:
                            deadline.reschedule(now + call.timeout)
                            armed = now
                        try:
                            event = await anext(iterator)
                        except StopAsyncIteration:
                            break
                        if isinstance(event, ReplyChunk):
                            pieces.append(event.content)
                            await forward.add(event.content)
                        elif isinstance(event, ReplyDone):
                            done = event
                            break
            except TimeoutError as error:
                permit.failed()
                await forward.flush()  # what arrived before the failure still goes out
                raise _stream_error(
                    call, "timeout", f"no event for {call.timeout:g} s", True, pieces
                ) from error
            except DownstreamError as error:
                _judge(permit, error)
                await forward.flush()
                raise _stream_error(
                    call, error.code, error.message, error.retryable, pieces
                ) from error
            except BaseException:  # cancelled, or our own failure (a chunk's publish, say)
                permit.released()  # no verdict on the service; a probe's slot comes back
                forward.cancel()
                raise
        await forward.flush()
        if done is None:
            permit.failed()
            raise _stream_error(
                call, "stream_cut", "the stream ended without its end event", True, pieces
            )
        permit.succeeded()
        return StreamedReply(
            content="".join(pieces),
            usage=done.usage,
            finish_reason=done.finish_reason,
            model=done.model,
            chunks=len(pieces),
        )


class _ChunksForwarded(DownstreamError):
    """A stream failed after chunks reached the client: retrying would repeat the reply."""


def _stream_error(
    call: ServiceCall, code: str, message: str, retryable: bool, pieces: list[str]
) -> DownstreamError:
    if pieces:
        return _ChunksForwarded(
            call.service, code, f"{message} (after {len(pieces)} chunks)", retryable=False
        )
    return DownstreamError(call.service, code, message, retryable=retryable)


def _delay(policy: RetryPolicy, error: BaseException | None, failures: int) -> float:
    """Wait after the `failures`-th failure: Retry-After when given, else exponential
    backoff (initial x 2^(n-1), capped) plus up to `initial` of jitter."""
    if isinstance(error, DownstreamError) and error.retry_after is not None:
        return min(error.retry_after, policy.max_delay)
    base = min(policy.max_delay, policy.initial * 2.0 ** (failures - 1))
    return base + random.uniform(0, policy.initial)


def _judge(permit: Permit, error: DownstreamError) -> None:
    if error.retryable:
        permit.failed()
    else:
        permit.released()


def resolve(value: Any, run: PlanRun) -> Any:
    """Inputs are literals or `Ref`s into the request or earlier steps' outputs. A ref to
    a step that was skipped or failed (optional) yields the ref's default."""
    if not isinstance(value, Ref):
        return value
    root, _, rest = value.path.partition(".")
    if root == "request":
        current: Any = run.request
        parts = rest.split(".") if rest else []
    elif root == "steps":
        name, _, tail = rest.partition(".")
        outcome = run.outcomes.get(name)
        if outcome is None or outcome.status != "succeeded":
            return value.default
        current = outcome.output
        parts = tail.split(".") if tail else []
    else:
        raise ValueError(f"unknown reference root in {value.path!r}")
    for part in parts:
        if current is None:
            return value.default
        current = current.get(part) if isinstance(current, dict) else getattr(current, part, None)
    return value.default if current is None else current
