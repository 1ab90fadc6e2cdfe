"""Rows a unit of work writes with its commit, in one statement on PostgreSQL.

A chat turn's request inserts its task, its session, the user message and the audit
entries, and reads none of them back before it commits. Sent one by one they cost BEGIN,
four INSERTs and COMMIT: six round trips to PostgreSQL. Held until the commit, they go as
one statement (`WITH w0 AS (INSERT ...), w1 AS (INSERT ...) INSERT ...`) that is also the
transaction's only one when nothing was read first, so BEGIN and COMMIT have nothing to
send: one round trip. PostgreSQL checks foreign keys at the end of the statement, so a
message may come before its session in it. On SQLite (one connection in the process, no
round trips) the groups are inserted one after the other, in the order they were held.

A held row is invisible to reads of the same unit of work until the commit: hold only
rows that nothing reads back before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Insert, insert
from sqlalchemy.ext.asyncio import AsyncSession

from agent_orchestrator.db.driver_session import DriverSession
from agent_orchestrator.db.prepared import hot
from agent_orchestrator.db.repositories.rows import RowCodec
from agent_orchestrator.db.tables import Base

#: Rows of one table, in the order they were held.
Group = tuple[RowCodec[Any], list[Base]]
_Shape = tuple[tuple[RowCodec[Any], int], ...]

#: Statements kept per shape (tables and row counts): a request writes one of a few.
MAX_SHAPES = 64
#: Parameters of one statement at most (asyncpg takes 32,767); more go one group at a time.
MAX_PARAMETERS = 4000

_statements: dict[_Shape, Insert] = {}


def hold(groups: list[Group], codec: RowCodec[Any], rows: Sequence[Base]) -> None:
    """Add `rows` to `groups`: to the last group when it is of the same table."""
    if not rows:
        return
    if groups and groups[-1][0] is codec:
        groups[-1][1].extend(rows)
    else:
        groups.append((codec, list(rows)))


async def insert_held(db: AsyncSession, groups: list[Group]) -> None:
    """Write the groups, as the last statement(s) before `db` commits."""
    groups = [(codec, rows) for codec, rows in groups if rows]
    if not groups:
        return
    if isinstance(db, DriverSession) and (statement := _statement(groups)) is not None:
        params: dict[str, Any] = {}
        for k, (codec, rows) in enumerate(groups):
            for i, row in enumerate(rows):
                params.update(codec.prefixed(row, _prefix(k, i)))
        await db.execute_last(statement, params)
        return
    for codec, rows in groups:
        await codec.add(db, *rows)


def _prefix(group: int, row: int) -> str:
    return f"w{group}_{row}_"


def _statement(groups: list[Group]) -> Insert | None:
    shape = tuple((codec, len(rows)) for codec, rows in groups)
    found = _statements.get(shape)
    if found is not None:
        return found
    if len(_statements) >= MAX_SHAPES:
        return None
    if sum(len(codec.columns) * count for codec, count in shape) > MAX_PARAMETERS:
        return None
    parts = [
        insert(codec.table).values([codec.bound_row(_prefix(k, i)) for i in range(count)])
        for k, (codec, count) in enumerate(shape)
    ]
    statement = parts[-1]
    for k, part in enumerate(parts[:-1]):
        statement = statement.add_cte(part.cte(f"w{k}"))
    statement = _statements[shape] = hot(statement)
    return statement
