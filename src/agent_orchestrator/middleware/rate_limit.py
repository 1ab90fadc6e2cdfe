"""The HTTP face of the rate limits (services/rate_limiter.py): which requests they apply
to, and a decision's headers and 429 (`Decision.headers`, `Decision.refusal`) written by
the request layer itself, before the app runs.
"""

from __future__ import annotations

from starlette.types import Send

from agent_orchestrator.errors import error_body
from agent_orchestrator.middleware.context import send_error
from agent_orchestrator.services.rate_limiter import Decision

#: Limited: the API. Not limited: health, metrics and the API document (probes and
#: scrapers), and `/internal/*` (platform services with the service token).
LIMITED_PREFIX = "/api/"


def rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode(), value.encode()) for name, value in decision.headers().items()]


async def send_rate_limited(send: Send, decision: Decision, correlation_id: str) -> None:
    refusal = decision.refusal()
    body = error_body(refusal.code, refusal.message, refusal.details, correlation_id)
    await send_error(send, refusal.status_code, body, rate_limit_headers(decision))
