"""Which SQL the service sends, for tests that assert a statement is (not) run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from asyncpg.transaction import Transaction
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from agent_orchestrator.db.inline_session import InlineSessionMaker
from agent_orchestrator.db.prepared import PreparedStatement
from agent_orchestrator.state import AppState


def statements_sent(state: AppState) -> AbstractContextManager[list[str]]:
    """Every statement the service sends meanwhile (see `statements_sent_by`)."""
    return statements_sent_by(state.engine, state.db_factory)


@contextmanager
def statements_sent_by(
    engine: AsyncEngine, factory: async_sessionmaker[AsyncSession]
) -> Iterator[list[str]]:
    """Every statement sent meanwhile through the engine's connections or the factory's
    sessions, on one line and in lower case.

    The hot statements bypass SQLAlchemy (db/prepared.py), so its events alone miss them.
    Embedded mode's requests and tasks run on one SQLite connection, traced by the
    driver itself; on PostgreSQL, asyncpg logs neither prepared statements (SQLAlchemy's
    own path) nor executemany, so the hot statements are seen where the driver path
    sends them, and the rest through SQLAlchemy's events on the service's engine. There,
    asyncpg's own BEGIN, COMMIT and ROLLBACK show as "begin", "commit" and "rollback":
    each is a round trip too."""
    seen: list[str] = []

    def note(statement: str) -> None:
        seen.append(" ".join(statement.split()).lower())

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        note(statement)

    inline = factory if isinstance(factory, InlineSessionMaker) else None
    by_asyncpg = PreparedStatement.fetch

    async def fetch(self: PreparedStatement, driver: Any, params: Any) -> Any:
        note(self.sql)
        return await by_asyncpg(self, driver, params)

    steps = ("start", "commit", "rollback")
    transaction_steps = {name: getattr(Transaction, name) for name in steps}

    def traced_step(name: str, step: Any) -> Any:
        async def run(self: Transaction) -> None:
            note("begin" if name == "start" else name)
            await step(self)

        return run

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    if inline is not None:
        inline.driver_connection.set_trace_callback(note)
    else:
        PreparedStatement.fetch = fetch  # type: ignore[method-assign]
        for name, step in transaction_steps.items():
            setattr(Transaction, name, traced_step(name, step))
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
        if inline is not None:
            inline.driver_connection.set_trace_callback(None)
        else:
            PreparedStatement.fetch = by_asyncpg  # type: ignore[method-assign]
            for name, step in transaction_steps.items():
                setattr(Transaction, name, step)
