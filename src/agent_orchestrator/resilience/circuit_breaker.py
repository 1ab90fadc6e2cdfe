"""A circuit breaker per downstream service, per process.

closed -> open when, within WINDOW seconds, at least FAILURE_THRESHOLD calls failed and
they are at least FAILURE_RATE of the calls made (Hystrix and resilience4j trip at 50%);
open -> half-open after OPEN seconds, letting HALF_OPEN_PROBES calls through; a probe's
success closes it, a probe's failure opens it again. While open, calls fail fast with
`circuit_open` and never reach the service. Only failures that say the service is unwell
count (timeouts, connect errors, 429, 5xx); a 4xx is the caller's problem, and neither a
failure nor a call here.

Why a rate as well as a count: a count alone trips on the same five failures whether
they are five of five calls or five of fifty thousand, so the busier the service, the
more an occasional error would cut it off for everyone.

The window is counted in ten buckets (as Hystrix does), so its memory does not grow with
traffic: a call leaves it between WINDOW and 1.1 x WINDOW seconds after it was made.

Written here rather than taken from pybreaker: pybreaker counts consecutive failures
only (no time window, no rate), has no asyncio half-open probe limit, and we need the
state as a metric.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client import Gauge

from agent_orchestrator.observability.metrics import PREFIX

CIRCUIT_STATE = Gauge(
    f"{PREFIX}_circuit_state",
    "Circuit state per service (0 closed, 1 half-open, 2 open)",
    ["service"],
)


class CircuitState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


_GAUGE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}

#: Buckets the window is counted in.
BUCKETS = 10


class _Bucket:
    __slots__ = ("calls", "failures", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.calls = 0
        self.failures = 0


@dataclass(frozen=True, slots=True)
class Permit:
    """One admitted call. Its verdict counts only in the state it was admitted in: a call
    that set out before the breaker opened cannot close it by succeeding late, nor can it
    count as one of a half-open breaker's probes."""

    breaker: CircuitBreaker
    generation: int

    def succeeded(self) -> None:
        self.breaker._succeeded(self.generation)

    def failed(self) -> None:
        """The service is unwell: a timeout, a connect error, a 429 or a 5xx."""
        self.breaker._failed(self.generation)

    def released(self) -> None:
        """No verdict (cancelled, or a 4xx): a half-open probe's slot is free again."""
        self.breaker._released(self.generation)


class CircuitBreaker:
    def __init__(
        self,
        service: str,
        *,
        failure_threshold: int,
        window_seconds: float,
        open_seconds: float,
        half_open_probes: int,
        failure_rate: float = 0.0,
    ) -> None:
        self.service = service
        self.failure_threshold = failure_threshold
        self.failure_rate = failure_rate
        self.window = window_seconds
        self._bucket_width = window_seconds / BUCKETS
        self.open_seconds = open_seconds
        self.half_open_probes = half_open_probes
        self._now = time.monotonic
        self._buckets: deque[_Bucket] = deque()
        self._calls = 0  # in the window
        self._failures = 0  # in the window
        self._state = CircuitState.CLOSED
        self._opened_at = 0.0
        self._probes = 0
        #: Moves on with every change of state; a permit is for one generation.
        self._generation = 0
        CIRCUIT_STATE.labels(service).set(0)

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._now() - self._opened_at >= self.open_seconds:
            self._move(CircuitState.HALF_OPEN)
        return self._state

    def admit(self) -> Permit | None:
        """A permit for a call to go out now, or None while the breaker is open or its
        half-open probes are all out. The permit's verdict must follow."""
        state = self.state
        if state is CircuitState.HALF_OPEN:
            if self._probes >= self.half_open_probes:
                return None
            self._probes += 1
        elif state is CircuitState.OPEN:
            return None
        return Permit(self, self._generation)

    def _succeeded(self, generation: int) -> None:
        if generation != self._generation:
            return
        if self._state is CircuitState.CLOSED:
            self._count(failed=False)
        else:  # a half-open probe
            self._move(CircuitState.CLOSED)
            self._forget()

    def _failed(self, generation: int) -> None:
        if generation != self._generation:
            return
        if self._state is CircuitState.HALF_OPEN:
            self._trip()
            return
        self._count(failed=True)
        if (
            self._failures >= self.failure_threshold
            and self._failures >= self.failure_rate * self._calls
        ):
            self._trip()

    def _released(self, generation: int) -> None:
        if generation == self._generation and self._state is CircuitState.HALF_OPEN:
            self._probes -= 1

    def _count(self, *, failed: bool) -> None:
        now = self._now()
        start = now - now % self._bucket_width
        if not self._buckets or self._buckets[-1].start != start:
            self._buckets.append(_Bucket(start))
            # A bucket leaves once all of it is older than the window.
            while self._buckets[0].start + self._bucket_width <= now - self.window:
                gone = self._buckets.popleft()
                self._calls -= gone.calls
                self._failures -= gone.failures
        bucket = self._buckets[-1]
        bucket.calls += 1
        self._calls += 1
        if failed:
            bucket.failures += 1
            self._failures += 1

    def _forget(self) -> None:
        self._buckets.clear()
        self._calls = 0
        self._failures = 0

    def _trip(self) -> None:
        self._opened_at = self._now()
        self._forget()
        self._move(CircuitState.OPEN)

    def _move(self, state: CircuitState) -> None:
        self._state = state
        self._generation += 1
        self._probes = 0
        CIRCUIT_STATE.labels(self.service).set(_GAUGE[state])
