"""W3C Trace Context (https://www.w3.org/TR/trace-context/) carried from the client to the
downstream services: the trace a client started continues through the queue and every
attempt of the task, so a tracing backend that sees both ends joins them.

- The request layer keeps a valid incoming `traceparent` for the request (`INCOMING`);
  an invalid one is ignored, as the recommendation asks, and never refused.
- A task is given its trace when it is submitted: the client's, else a new one. It is
  stored in the task's input, so every attempt and every worker shares it.
- Each plan run sends it on with a parent id of its own: the trace id and the flags are
  the client's, the parent is this service.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

# version 00 exactly; a later version may append fields, which are then dropped.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16

#: The current request's valid `traceparent`, normalised to version 00; None without one.
INCOMING: ContextVar[str | None] = ContextVar("incoming_traceparent", default=None)


def parse_traceparent(value: str) -> str | None:
    """The header as version 00 (`00-<trace-id>-<parent-id>-<flags>`), or None when it is
    not a valid traceparent: wrong shape, upper-case hex, version ff, extra fields on
    version 00, or an all-zero trace or parent id."""
    found = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if found is None:
        return None
    version, trace_id, parent_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None
    return f"00-{trace_id}-{parent_id}-{flags}"


def new_traceparent() -> str:
    """A new trace, sampled."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def trace_for_task() -> str:
    """The trace a new task joins: the current request's, else a new one."""
    return INCOMING.get() or new_traceparent()


def continue_trace(stored: object) -> str:
    """The `traceparent` to send downstream for a task's trace: its trace id and flags,
    a new parent id. A task stored before traces were kept gets a new trace."""
    parsed = parse_traceparent(stored) if isinstance(stored, str) else None
    if parsed is None:
        return new_traceparent()
    return f"{parsed[:36]}{os.urandom(8).hex()}{parsed[52:]}"
