"""Orchestration plans: a small DAG of calls to downstream services, as data.

A step names a service and one of its client's operations, where its inputs come from
(`Ref("request.message")`, `Ref("steps.agent.knowledge")`), which steps it waits for, an
optional condition, its timeout and retry policy, and whether the task can do without it
(`required=False`: a failure degrades the answer instead of failing the task).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Ref:
    """A value from the request (`request.x`) or an earlier step's output (`steps.s.y`)."""

    path: str
    default: Any = None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    initial: float = 0.2
    max_delay: float = 5.0


@dataclass(frozen=True)
class ServiceCall:
    step: str
    service: str
    operation: str
    inputs: dict[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    when: Ref | None = None
    timeout: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    required: bool = True
    #: The operation yields events (agent execution); `timeout` is then the longest wait
    #: for the next event, not for the whole reply.
    stream: bool = False


@dataclass(frozen=True)
class OrchestrationPlan:
    name: str
    steps: tuple[ServiceCall, ...]

    def __post_init__(self) -> None:
        names = [step.step for step in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"plan {self.name}: step names repeat")
        seen: set[str] = set()
        for step in self.steps:  # listed in an order where dependencies come first
            missing = [dep for dep in step.depends_on if dep not in seen]
            if missing:
                raise ValueError(
                    f"plan {self.name}: {step.step} depends on {missing} "
                    "which are not earlier steps"
                )
            seen.add(step.step)

    def step(self, name: str) -> ServiceCall:
        return next(step for step in self.steps if step.step == name)


class StepOutcome(BaseModel):
    step: str
    service: str
    operation: str
    status: str  # succeeded | failed | skipped
    attempts: int = 0
    latency_ms: float | None = None
    error: dict[str, Any] | None = None
    output: Any = None
