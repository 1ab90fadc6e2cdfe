"""Keyset paging shared by every list query: newest first, ties broken by id."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from agent_orchestrator.models.pagination import decode_cursor, encode_cursor

RowT = TypeVar("RowT")


def keyset_page(
    query: Select[Any],
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[uuid.UUID],
    *,
    limit: int,
    cursor: str | None,
    newest_first: bool = True,
) -> Select[Any]:
    if cursor:
        stamp, last_id = decode_cursor(cursor)
        if newest_first:
            query = query.where(
                or_(created_at < stamp, and_(created_at == stamp, row_id < last_id))
            )
        else:
            query = query.where(
                or_(created_at > stamp, and_(created_at == stamp, row_id > last_id))
            )
    order = (created_at.desc(), row_id.desc()) if newest_first else (created_at, row_id)
    return query.order_by(*order).limit(limit + 1)


def split_page(rows: list[RowT], limit: int, key: Any) -> tuple[list[RowT], str | None]:
    """Rows fetched with limit+1: the extra row only tells that another page exists."""
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    created_at, row_id = key(page[-1])
    return page, encode_cursor(created_at, row_id)
