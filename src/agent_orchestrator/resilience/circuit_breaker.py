"""A circuit breaker per downstream service, per process.

closed -> open after FAILURE_THRESHOLD failures within WINDOW seconds; open -> half-open
after OPEN seconds, letting HALF_OPEN_PROBES calls through; a probe's success closes it,
a probe's failure opens it again. While open, calls fail fast with `circuit_open` and
never reach the service. Only failures that say the service is unwell count (timeouts,
connect errors, 429, 5xx); a 4xx is the caller's problem and leaves the breaker alone.

Written here rather than taken from pybreaker: pybreaker counts consecutive failures
only (no time window), has no asyncio half-open probe limit, and we need the state as a
metric and in deep health.
"""

from __future__ import annotations

import time
from collections import deque
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


class CircuitBreaker:
    def __init__(
        self,
        service: str,
        *,
        failure_threshold: int,
        window_seconds: float,
        open_seconds: float,
        half_open_probes: int,
    ) -> None:
        self.service = service
        self.failure_threshold = failure_threshold
        self.window = window_seconds
        self.open_seconds = open_seconds
        self.half_open_probes = half_open_probes
        self._now = time.monotonic
        self._failures: deque[float] = deque()
        self._state = CircuitState.CLOSED
        self._opened_at = 0.0
        self._probes = 0
        CIRCUIT_STATE.labels(service).set(0)

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._now() - self._opened_at >= self.open_seconds:
            self._move(CircuitState.HALF_OPEN)
        return self._state

    def try_acquire(self) -> bool:
        """May a call go out now? In half-open, each admitted probe must be followed by
        `record_success` or `record_failure`."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and self._probes < self.half_open_probes:
            self._probes += 1
            return True
        return False

    def record_success(self) -> None:
        # A success in the closed state does not wipe the window: the breaker trips on
        # FAILURE_THRESHOLD failures within WINDOW seconds, interleaved successes or not.
        if self._state is not CircuitState.CLOSED:
            self._move(CircuitState.CLOSED)
            self._failures.clear()

    def record_failure(self) -> None:
        now = self._now()
        if self._state is CircuitState.HALF_OPEN:
            self._trip(now)
            return
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.window:
            self._failures.popleft()
        if len(self._failures) >= self.failure_threshold:
            self._trip(now)

    def release_probe(self) -> None:
        """A probe that ended without a verdict (cancelled, or a 4xx) frees its slot."""
        if self._state is CircuitState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def _trip(self, now: float) -> None:
        self._opened_at = now
        self._failures.clear()
        self._move(CircuitState.OPEN)

    def _move(self, state: CircuitState) -> None:
        self._state = state
        self._probes = 0
        CIRCUIT_STATE.labels(self.service).set(_GAUGE[state])
