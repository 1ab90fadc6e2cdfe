"""Engine and unit of work. Commit happens at the edge; work that must follow the commit
(enqueueing a task, publishing an event) is registered with `after_commit`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from agent_orchestrator.db.driver_session import DriverSession
from agent_orchestrator.db.held_inserts import Group, hold, insert_held
from agent_orchestrator.db.inline_session import InlineSessionMaker
from agent_orchestrator.db.repositories.audit import ENTRIES
from agent_orchestrator.db.repositories.rows import RowCodec, RowT
from agent_orchestrator.db.tables import AuditEntryRow, Base
from agent_orchestrator.observability.logging import get_logger

log = get_logger(__name__)

AfterCommit = Callable[[], Awaitable[None]]


def create_engine(
    url: str, *, pool_size: int = 10, pre_ping: bool = False, **connect_args: Any
) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # Requests and tasks use `InlineSession`s (see inline_session.py and
        # session_factory); this engine only serves migrations and health checks, through
        # aiosqlite, on one connection of its own.
        engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=60)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # Off by default: a ping per checkout was a tenth of a worker's CPU per task. After
        # a PostgreSQL restart the first statement on a stale connection fails, SQLAlchemy
        # then discards the whole pool, and the work is retried (a request gets one 5xx, a
        # task's delivery is re-sent by the reconciler). DB_POOL_PRE_PING=true trades the
        # CPU for never seeing that error.
        pool_pre_ping=pre_ping,
        connect_args=connect_args,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the writer; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    if engine.dialect.name == "sqlite":
        return InlineSessionMaker(engine, _sqlite_pragmas)
    return async_sessionmaker(engine, expire_on_commit=False, class_=DriverSession)


def single_statement_factory(
    engine: AsyncEngine, transactional: async_sessionmaker[AsyncSession]
) -> async_sessionmaker[AsyncSession]:
    """Sessions for work that is one statement (a conditional UPDATE, a lookup). On
    PostgreSQL they run in autocommit: one round trip instead of BEGIN, statement, COMMIT,
    and a single statement is atomic by itself. Never use them for several statements
    that must commit together. On SQLite they are the ordinary inline sessions."""
    if isinstance(transactional, InlineSessionMaker):
        return transactional
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    return async_sessionmaker(autocommit, expire_on_commit=False, class_=DriverSession)


def dispose_sessions(factory: async_sessionmaker[AsyncSession]) -> None:
    """Close what a factory holds of its own (embedded mode's SQLite connection)."""
    if isinstance(factory, InlineSessionMaker):
        factory.dispose()


class UnitOfWork:
    """One transaction: commit on success, roll back on error, then run after-commit hooks."""

    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self.factory = factory
        self._after_commit: list[AfterCommit] = []
        self._held: list[Group] = []
        self._audit_entries: list[AuditEntryRow] = []
        self.session: AsyncSession

    def after_commit(self, hook: AfterCommit) -> None:
        self._after_commit.append(hook)

    def insert_at_commit(self, codec: RowCodec[Any], *rows: Base) -> None:
        """New rows written with the commit, together with the transaction's other held
        rows (db/held_inserts.py: one statement on PostgreSQL). Reads of this unit of work
        do not see them before it commits, and an error they cause (a duplicate key)
        comes from the commit."""
        hold(self._held, codec, rows)

    async def insert_unless_raced(
        self, codec: RowCodec[RowT], row: RowT, winner: Callable[[], Awaitable[RowT | None]]
    ) -> RowT | None:
        """Insert `row` now, in a savepoint, so that a concurrent request that inserted the
        same unique key first (an Idempotency-Key) does not poison this transaction.
        Returns None when `row` went in, else the row that won (`winner()`); re-raises
        when there is none."""
        try:
            async with self.session.begin_nested():
                await codec.add(self.session, row)
        except IntegrityError:
            existing = await winner()
            if existing is None:
                raise
            return existing
        return None

    def audit(self, entry: AuditEntryRow) -> None:
        """An audit entry, written with the commit (so never without the change it
        records), after the held rows and in one INSERT with the transaction's other
        entries: a turn that creates its session audits both at once."""
        self._audit_entries.append(entry)

    async def commit(self) -> None:
        """Commit now (and run the hooks), for a route that must act on committed work
        before it returns, such as waiting for the task it just queued."""
        await self._commit()
        await self._run_hooks()

    async def rollback(self) -> None:
        """Undo the transaction so far, the rows and audit entries it held included."""
        self._held.clear()
        self._audit_entries.clear()
        await self.session.rollback()

    async def _commit(self) -> None:
        held, self._held = self._held, []
        hold(held, ENTRIES, self._audit_entries)
        self._audit_entries = []
        await insert_held(self.session, held)
        await self.session.commit()

    async def __aenter__(self) -> UnitOfWork:
        self.session = self.factory()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                await self._commit()
            else:
                await self.rollback()
        finally:
            await self.session.close()
        if exc_type is None:
            await self._run_hooks()

    async def _run_hooks(self) -> None:
        hooks, self._after_commit = self._after_commit, []
        for hook in hooks:
            try:
                await hook()
            except Exception:
                # The commit stands; a lost hook (e.g. an enqueue) is repaired by the
                # reconciler, so it must not turn a success into an error response.
                log.exception("after_commit hook failed")
