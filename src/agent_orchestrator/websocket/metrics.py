"""WebSocket gauges and counters. Labels are bounded: close codes, refusal reasons and the
fixed set of client message types, never ids or addresses."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from agent_orchestrator.observability.metrics import PREFIX

CONNECTIONS = Gauge(
    f"{PREFIX}_websocket_connections_active", "Open WebSocket connections (accepted, not closed)"
)
SUBSCRIPTIONS = Gauge(
    f"{PREFIX}_websocket_subscriptions_active", "Event subscriptions held by WebSocket connections"
)
REFUSED = Counter(
    f"{PREFIX}_websocket_refused_total",
    "WebSocket handshakes refused or closed at once",
    ["reason"],
)
CLOSED = Counter(
    f"{PREFIX}_websocket_closed_by_server_total",
    "WebSocket connections the server closed",
    ["code"],
)
RECEIVED = Counter(
    f"{PREFIX}_websocket_messages_received_total", "Client messages by type", ["type"]
)
