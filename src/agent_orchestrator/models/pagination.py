"""Keyset pagination: an opaque cursor holding the last row's (created_at, id)."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Generic, TypeVar

from pydantic import BaseModel

from agent_orchestrator.errors import ValidationFailed, field_problem

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        stamp, row_id = base64.urlsafe_b64decode(padded).decode().split("|", 1)
        moment = datetime.fromisoformat(stamp)
        if moment.tzinfo is None:
            raise ValueError("naive timestamp")
        # In UTC, as the columns hold it: a forged offset at either end of the calendar
        # (0001-01-01T00:00+14:00) has no UTC time and must be refused here, not overflow
        # in the database layer.
        return moment.astimezone(UTC), uuid.UUID(row_id)
    except (ValueError, OverflowError) as exc:
        raise ValidationFailed(
            "cursor is not valid",
            details=[field_problem("cursor", "query", "not a cursor returned by this API")],
        ) from exc
