"""What the batch tests share: how many items ran at once, by the ledger's own times, and
the webhook signature computed from the Standard Webhooks definition."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from typing import Any


def most_at_once(tasks: list[dict[str, Any]]) -> int:
    """The most tasks (as the task API shows them) running at one moment, from each
    one's claim (`started_at`) to its end (`finished_at`). An end sorts before a start at
    the same instant: a slot handed on is not an overlap."""
    spans = [
        (datetime.fromisoformat(t["started_at"]), datetime.fromisoformat(t["finished_at"]))
        for t in tasks
    ]
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = running = 0
    for _, change in edges:
        running += change
        most = max(most, running)
    return most


def signature_of(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    content = webhook_id.encode() + b"." + timestamp.encode() + b"." + body
    mac = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()
