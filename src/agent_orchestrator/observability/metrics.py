"""Prometheus metrics, prefixed `nooble_orchestrator_` (the platform's documented names).

Labels stay bounded: route templates, never raw paths or ids. The HTTP ones are recorded by
the request layer (middleware/request.py).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram
from starlette.types import Scope

PREFIX = "nooble_orchestrator"

HTTP_REQUESTS = Counter(
    f"{PREFIX}_http_requests_total", "HTTP requests", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    f"{PREFIX}_http_request_duration_seconds", "HTTP request latency", ["method", "route"]
)
SESSIONS_CREATED = Counter(f"{PREFIX}_sessions_created_total", "Sessions created")
RATE_LIMITED = Counter(
    f"{PREFIX}_rate_limit_rejections_total",
    "Requests refused by a rate limit, by the limit that refused (ip, user, tenant, global)",
    ["scope"],
)
RATE_LIMIT_STORE_ERRORS = Counter(
    f"{PREFIX}_rate_limit_store_errors_total",
    "Requests let through unlimited because the rate-limit store failed",
)


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


# The labelled children per (method, route, status): `labels()` validates and looks them up
# under a lock on every call, a third of what recording a request cost. Bounded all the
# same (routes x statuses x methods); past the bound, `labels()` as before.
_HTTP_CHILDREN: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
_MAX_HTTP_CHILDREN = 1024


#: Methods counted under their own name; any other (the HTTP parser admits WebDAV's and
#: more) is counted as "other", so clients cannot mint label values.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def record_http_request(method: str, route: str, status: int, seconds: float) -> None:
    if method not in HTTP_METHODS:
        method = "other"
    key = (method, route, status)
    children = _HTTP_CHILDREN.get(key)
    if children is None:
        children = (
            HTTP_REQUESTS.labels(method, route, str(status)),
            HTTP_LATENCY.labels(method, route),
        )
        if len(_HTTP_CHILDREN) < _MAX_HTTP_CHILDREN:
            _HTTP_CHILDREN[key] = children
    children[0].inc()
    children[1].observe(seconds)


TASKS_FINISHED = Counter(
    f"{PREFIX}_tasks_finished_total", "Tasks that reached a terminal state", ["kind", "status"]
)
LLM_TOKENS = Counter(
    f"{PREFIX}_llm_tokens_total",
    "Tokens of finished turns' replies, as the agent execution reported them",
    ["kind"],
)
BUDGET_REFUSALS = Counter(
    f"{PREFIX}_token_budget_refusals_total",
    "Turns refused because their tenant's daily LLM token budget was spent, by where "
    "(api: before queueing; worker: a queued turn, as it started)",
    ["where"],
)
BUDGET_STORE_ERRORS = Counter(
    f"{PREFIX}_token_budget_store_errors_total",
    "Budget checks or usage records that failed (the turn was let through)",
)
BATCHES_FINISHED = Counter(
    f"{PREFIX}_batches_finished_total", "Batches whose every item ended", ["status"]
)
WEBHOOK_ATTEMPTS = Counter(
    f"{PREFIX}_webhook_attempts_total",
    "Webhook POSTs by outcome: accepted (2xx), rejected (an answer not retried), "
    "retried (5xx, 408, 425, 429, or no answer), refused (an address callbacks may not reach)",
    ["outcome"],
)
TASK_DURATION = Histogram(
    f"{PREFIX}_task_processing_seconds", "Time from claim to the end of an attempt", ["kind"]
)
TASKS_RECOVERED = Counter(
    f"{PREFIX}_tasks_recovered_total", "Tasks the reconciler re-delivered or closed", ["reason"]
)

SERVICE_CALL_SECONDS = Histogram(
    f"{PREFIX}_service_call_seconds", "Downstream step latency", ["service", "operation"]
)
SERVICE_CALL_FAILURES = Counter(
    f"{PREFIX}_service_call_failures_total", "Downstream steps that failed", ["service", "code"]
)
SERVICE_RETRIES_SHED = Counter(
    f"{PREFIX}_service_retries_shed_total",
    "Retries not made because the service's retry budget was in use",
    ["service"],
)
CHAT_TURNS = Counter(f"{PREFIX}_messages_processed_total", "Chat turns accepted", ["mode"])
CHAT_WAIT_ANSWERS = Counter(
    f"{PREFIX}_chat_wait_answers_total",
    "mode=wait answers, by where they came from: handed over by the worker or read back",
    ["source"],
)
