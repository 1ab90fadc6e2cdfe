"""The circuit breaker against a reference model (hypothesis stateful testing; reliability
F8): random interleavings of calls setting out, finishing (success, failure, no verdict)
and time passing, with several calls in flight at once, on a controlled clock. After
every step the breaker's state and admissions equal the model's, which states the rules
plainly:

- closed -> open when, among the calls of the window, at least FAILURE_THRESHOLD failed
  and the failures are at least FAILURE_RATE of the calls;
- a call is in the window until the end of its bucket (WINDOW / 10) is WINDOW old;
- open -> half-open after OPEN seconds; half-open admits at most HALF_OPEN_PROBES calls;
  a probe's success closes it (forgetting the window), a probe's failure opens it again;
- a call's verdict counts only in the state it was admitted in.

Plus the drills the model alone does not make plain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent_orchestrator.resilience.circuit_breaker import BUCKETS, CircuitBreaker, CircuitState

WINDOW = 10.0
OPEN = 4.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker_on(clock: Clock, *, threshold: int, rate: float, probes: int) -> CircuitBreaker:
    breaker = CircuitBreaker(
        "model",
        failure_threshold=threshold,
        failure_rate=rate,
        window_seconds=WINDOW,
        open_seconds=OPEN,
        half_open_probes=probes,
    )
    breaker._now = clock  # the breaker's only clock
    return breaker


@dataclass
class Model:
    threshold: int
    rate: float
    probes: int
    state: CircuitState = CircuitState.CLOSED
    opened_at: float = 0.0
    probes_out: int = 0
    generation: int = 0
    calls: list[tuple[float, bool]] = field(default_factory=list)  # (time, failed)

    def current(self, now: float) -> CircuitState:
        if self.state is CircuitState.OPEN and now - self.opened_at >= OPEN:
            self.move(CircuitState.HALF_OPEN)
        return self.state

    def move(self, state: CircuitState) -> None:
        self.state = state
        self.generation += 1
        self.probes_out = 0
        self.calls = []

    def admit(self, now: float) -> int | None:
        state = self.current(now)
        if state is CircuitState.OPEN:
            return None
        if state is CircuitState.HALF_OPEN:
            if self.probes_out >= self.probes:
                return None
            self.probes_out += 1
        return self.generation

    def verdict(self, generation: int, outcome: str, now: float) -> None:
        if generation != self.generation:
            return
        if self.state is CircuitState.HALF_OPEN:
            if outcome == "success":
                self.move(CircuitState.CLOSED)
            elif outcome == "failure":
                self.opened_at = now
                self.move(CircuitState.OPEN)
            else:
                self.probes_out -= 1
            return
        if outcome == "released":
            return
        self.calls.append((now, outcome == "failure"))
        width = WINDOW / BUCKETS
        in_window = [failed for at, failed in self.calls if at - at % width + width > now - WINDOW]
        failures = sum(in_window)
        tripped = failures >= self.threshold and failures >= self.rate * len(in_window)
        if outcome == "failure" and tripped:
            self.opened_at = now
            self.move(CircuitState.OPEN)


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.breaker: CircuitBreaker | None = None
        self.model: Model | None = None
        self.in_flight: list[tuple[object, int]] = []  # (permit, model generation)

    @precondition(lambda self: self.breaker is None)
    @rule(
        threshold=st.integers(1, 6),
        rate=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
        probes=st.integers(1, 3),
    )
    def configure(self, threshold: int, rate: float, probes: int) -> None:
        self.breaker = breaker_on(self.clock, threshold=threshold, rate=rate, probes=probes)
        self.model = Model(threshold, rate, probes)

    @precondition(lambda self: self.breaker is not None)
    @rule()
    def set_out(self) -> None:
        assert self.breaker is not None
        assert self.model is not None
        permit = self.breaker.admit()
        expected = self.model.admit(self.clock.now)
        assert (permit is None) == (expected is None)
        if permit is not None and expected is not None:
            self.in_flight.append((permit, expected))

    @precondition(lambda self: self.in_flight)
    @rule(
        which=st.integers(0, 100),
        outcome=st.sampled_from(["success", "failure", "failure", "released"]),
    )
    def finish(self, which: int, outcome: str) -> None:
        assert self.model is not None
        permit, generation = self.in_flight.pop(which % len(self.in_flight))
        getattr(permit, {"success": "succeeded", "failure": "failed"}.get(outcome, outcome))()
        self.model.verdict(generation, outcome, self.clock.now)

    @rule(seconds=st.sampled_from([0.0, 0.25, 0.75, 1.0, 2.5, 4.0, 9.0, 9.75, 10.0, 12.0]))
    def wait(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def same_state(self) -> None:
        if self.breaker is not None and self.model is not None:
            assert self.breaker.state is self.model.current(self.clock.now)


TestBreakerFollowsItsRules = BreakerMachine.TestCase
TestBreakerFollowsItsRules.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None, derandomize=True
)


def test_occasional_failures_among_many_calls_do_not_open_it() -> None:
    """Five failures among a thousand calls in the window: a count-only breaker would
    open; at FAILURE_RATE 0.5 it stays closed, and opens once failures are half."""
    clock = Clock()
    breaker = breaker_on(clock, threshold=5, rate=0.5, probes=1)
    for i in range(1000):
        permit = breaker.admit()
        assert permit is not None
        if i % 200 == 0:
            permit.failed()
        else:
            permit.succeeded()
        clock.now += 0.001
    assert breaker.state is CircuitState.CLOSED
    failures = 5
    while breaker.state is CircuitState.CLOSED:
        permit = breaker.admit()
        assert permit is not None
        permit.failed()
        failures += 1
    assert failures == 1000 - 5  # the failure that made them half of the calls
    assert breaker.admit() is None


def test_a_late_success_does_not_close_an_open_breaker() -> None:
    clock = Clock()
    breaker = breaker_on(clock, threshold=2, rate=0.5, probes=1)
    straggler = breaker.admit()
    assert straggler is not None
    for _ in range(2):
        permit = breaker.admit()
        assert permit is not None
        permit.failed()
    assert breaker.state is CircuitState.OPEN
    straggler.succeeded()  # set out before the breaker opened
    assert breaker.state is CircuitState.OPEN
    assert breaker.admit() is None


def test_a_failure_leaves_the_window_when_its_bucket_is_window_old() -> None:
    """WINDOW 10 s in buckets of 1 s: a failure at 1000.0 still counts at 1010.75 (its
    bucket ends at 1001.0, which is not yet 10 s old) and no longer at 1011.0."""
    for second_at, opens in ((1010.75, True), (1011.0, False)):
        clock = Clock()
        breaker = breaker_on(clock, threshold=2, rate=0.0, probes=1)
        first = breaker.admit()
        assert first is not None
        first.failed()
        clock.now = second_at
        second = breaker.admit()
        assert second is not None
        second.failed()
        assert (breaker.state is CircuitState.OPEN) is opens, second_at
