"""Which SQL the service sends, for tests that assert a statement is (not) run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from agent_orchestrator.db.inline_session import InlineSessionMaker
from agent_orchestrator.db.prepared import PreparedStatement
from agent_orchestrator.state import AppState


@contextmanager
def statements_sent(state: AppState) -> Iterator[list[str]]:
    """Every statement sent meanwhile, on one line and in lower case.

    The hot statements bypass SQLAlchemy (db/prepared.py), so its events alone miss them.
    Embedded mode's requests and tasks run on one SQLite connection, traced by the
    driver itself; on PostgreSQL, asyncpg logs neither prepared statements (SQLAlchemy's
    own path) nor executemany, so the hot statements are seen where the driver path
    sends them, and the rest through SQLAlchemy's events on the service's engine."""
    seen: list[str] = []

    def note(statement: str) -> None:
        seen.append(" ".join(statement.split()).lower())

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        note(statement)

    engine = state.engine.sync_engine
    inline = state.db_factory if isinstance(state.db_factory, InlineSessionMaker) else None
    by_asyncpg = PreparedStatement.fetch

    async def fetch(self: PreparedStatement, driver: Any, params: Any) -> Any:
        note(self.sql)
        return await by_asyncpg(self, driver, params)

    event.listen(engine, "before_cursor_execute", record)
    if inline is not None:
        inline.driver_connection.set_trace_callback(note)
    else:
        PreparedStatement.fetch = fetch  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)
        if inline is not None:
            inline.driver_connection.set_trace_callback(None)
        else:
            PreparedStatement.fetch = by_asyncpg  # type: ignore[method-assign]
