"""The HTTP face of the rate limits (services/rate_limiter.py): which requests they apply
to, the client address they key on, and the headers and 429 a decision becomes.

Headers follow the IETF draft "RateLimit header fields for HTTP" in its widely deployed
form: `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds) describe
the limit with the least room left; a 429 adds `Retry-After` (seconds).
"""

from __future__ import annotations

import math

from starlette.types import Send

from agent_orchestrator.errors import error_body
from agent_orchestrator.middleware.context import send_error
from agent_orchestrator.services.rate_limiter import Decision

#: Limited: the API. Not limited: health, metrics and the API document (probes and
#: scrapers), and `/internal/*` (platform services with the service token).
LIMITED_PREFIX = "/api/"


def rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"ratelimit-limit", str(decision.limit.per_minute).encode()),
        (b"ratelimit-remaining", str(decision.remaining).encode()),
        (b"ratelimit-reset", str(math.ceil(decision.reset_after)).encode()),
    ]
    if not decision.allowed:
        headers.append((b"retry-after", str(decision.retry_after).encode()))
    return headers


async def send_rate_limited(send: Send, decision: Decision, correlation_id: str) -> None:
    body = error_body("rate_limited", decision.message(), decision.details(), correlation_id)
    await send_error(send, 429, body, rate_limit_headers(decision))
