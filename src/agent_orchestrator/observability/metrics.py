"""Prometheus metrics, prefixed `nooble_orchestrator_` (the platform's documented names).

Labels stay bounded: route templates, never raw paths or ids.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "nooble_orchestrator"

HTTP_REQUESTS = Counter(
    f"{PREFIX}_http_requests_total", "HTTP requests", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    f"{PREFIX}_http_request_duration_seconds", "HTTP request latency", ["method", "route"]
)
SESSIONS_CREATED = Counter(f"{PREFIX}_sessions_created_total", "Sessions created")


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = _route_template(scope)
            HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            HTTP_LATENCY.labels(scope["method"], route).observe(time.perf_counter() - started)


TASKS_FINISHED = Counter(
    f"{PREFIX}_tasks_finished_total", "Tasks that reached a terminal state", ["kind", "status"]
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
CHAT_TURNS = Counter(f"{PREFIX}_messages_processed_total", "Chat turns accepted", ["mode"])
