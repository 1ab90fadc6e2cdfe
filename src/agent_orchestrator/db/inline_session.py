"""Embedded-mode sessions: SQLite driven synchronously on the event loop, with no greenlet.

SQLAlchemy's AsyncSession runs each call in a new greenlet and bridges every driver call
back to the loop. With SQLite, whose calls return in tens of microseconds and never wait
on a network, that bridge is pure overhead: measured here, a session that opens, runs one
SELECT and commits costs 196 us through AsyncSession against 81 us through a plain
Session, and each further statement 50 us against 24 us. Embedded mode (one process, one
SQLite connection) therefore hands out `InlineSession`s: the AsyncSession interface this
service uses, answered by a synchronous Session on its own pysqlite engine.

One transaction at a time, as the single pooled connection enforced before: a session
takes the connection's lock at its first statement and gives it back when its transaction
ends (commit, rollback, close). Code must still never hold one session while opening
another; that now waits `LOCK_TIMEOUT` and fails, as the pool's timeout did. The maker
keeps that connection checked out and each session binds to it while it holds the lock,
so a transaction costs no pool checkout, check-in and reset.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, cast

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from agent_orchestrator.db.prepared import is_hot, prepared
from agent_orchestrator.db.wal_checkpoints import INTERVAL, JOURNAL_SIZE_LIMIT, WalCheckpointer

#: As long as the pool used to wait for its one connection before giving up.
LOCK_TIMEOUT = 60.0


class InlineSessionMaker(async_sessionmaker[AsyncSession]):
    def __init__(
        self, engine: AsyncEngine, pragmas: Any, *, checkpoint_interval: float = INTERVAL
    ) -> None:
        super().__init__(engine, expire_on_commit=False)
        url = engine.url.set(drivername="sqlite+pysqlite")
        # pool_timeout=0: the lock serialises sessions, so a wait here would be a bug, and
        # it would block the event loop; fail at once instead.
        self.sync_engine: Engine = create_engine(
            url,
            pool_size=1,
            max_overflow=0,
            pool_timeout=0,
            connect_args={"check_same_thread": False},
        )
        event.listen(self.sync_engine, "connect", pragmas)
        event.listen(self.sync_engine, "connect", _leave_checkpoints_to_the_thread)
        database = url.database
        self.checkpointer = (
            WalCheckpointer(database, checkpoint_interval)
            if database and database != ":memory:"
            else None
        )
        self.lock = asyncio.Lock()
        self._connection: Connection | None = None

    def __call__(self, **local_kw: Any) -> AsyncSession:
        return InlineSession(self)

    @property
    def connection(self) -> Connection:
        """The one SQLite connection, kept open: sessions bind to it instead of checking
        it out of the pool and back in (and resetting it) for every transaction, which
        cost more than the statements of a short transaction (measured here: 27 us for
        a one-SELECT transaction on a held connection, 94 us through the pool)."""
        if self._connection is None or self._connection.closed:
            self._connection = self.sync_engine.connect()
            if self.checkpointer is not None:
                try:
                    loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None
                self.checkpointer.start(loop, self.lock)
        return self._connection

    @property
    def driver_connection(self) -> sqlite3.Connection:
        """The sqlite3 connection under `connection`, for prepared statements."""
        driver = self.connection.connection.dbapi_connection
        assert isinstance(driver, sqlite3.Connection)
        return driver

    def dispose(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self.sync_engine.dispose()


def _leave_checkpoints_to_the_thread(dbapi_connection: Any, _record: Any) -> None:
    # See wal_checkpoints.py.
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")
    dbapi_connection.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")


class InlineSession(AsyncSession):
    """Overrides what this service calls; anything else falls back to AsyncSession's
    greenlet path, which also works here (the driver never needs the loop).

    Core statements (those on tables: every statement of the hot path) run on the held
    Connection itself. The ORM Session costs more than the statement on SQLite: measured
    here, an INSERT and its commit took 166 us through a Session against 85 us on the
    Connection, a one-SELECT transaction 99 us against 44 us. A Session is made only for
    ORM statements (`select(TaskRow)` in the paged listings); it joins the Connection's
    transaction, so both kinds commit or roll back together."""

    def __init__(self, maker: InlineSessionMaker) -> None:
        # AsyncSession.__init__ would build a second Session on the async engine.
        self._async_bind = maker.kw["bind"]
        self._async_binds = {}
        self._maker = maker
        self._orm: Session | None = None
        self._holding = False

    @property
    def sync_session(self) -> Session:  # type: ignore[override]
        """The ORM Session, made at first use; bound to the Connection only while this
        session holds the lock (see `_let_go`)."""
        if self._orm is None:
            bind = self._maker.connection if self._holding else self._maker.sync_engine
            self._orm = Session(bind=bind, expire_on_commit=False)
        return self._orm

    @property
    def _proxied(self) -> Session:  # type: ignore[override]
        return self.sync_session

    def get_bind(self, *args: Any, **kwargs: Any) -> Engine:
        return self._maker.sync_engine

    async def _hold(self) -> Connection:
        if not self._holding:
            lock = self._maker.lock
            if lock.locked():
                async with asyncio.timeout(LOCK_TIMEOUT):
                    await lock.acquire()
            else:
                # Free: acquire returns at once, and the deadline's timer would cost more
                # than the transaction's statements (its timer handle is made, scheduled
                # and cancelled every time). The one way this still waits is behind a
                # waiter that was handed the lock but has not run yet; the deadline exists
                # to turn a nested session into an error, and that nested acquirer finds
                # the lock taken, so it still gets one.
                await lock.acquire()
            self._holding = True
            if self._orm is not None:
                # Bound only while holding the lock: the connection serves one session
                # at a time.
                self._orm.bind = self._maker.connection
        return self._maker.connection

    def _let_go(self) -> None:
        if self._holding:
            self._holding = False
            if self._orm is not None:
                # Back to the engine, whose one pooled connection the maker holds: a
                # method this class does not override (AsyncSession.scalar, get, ...)
                # that would run without the lock now fails at once instead of joining
                # another session's transaction on the shared connection.
                self._orm.bind = self._maker.sync_engine
            self._maker.lock.release()

    async def execute(  # type: ignore[override]
        self,
        statement: Any,
        params: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Result[Any]:
        connection = await self._hold()
        if is_hot(statement) and not kwargs:
            compiled = prepared(statement, self._maker.sync_engine.dialect)
            return cast(Result[Any], compiled.run(self._maker.driver_connection, params))
        # The attribute SQLAlchemy itself reads to route a statement to the ORM.
        if statement._propagate_attrs.get("compile_state_plugin") == "orm":
            return self.sync_session.execute(statement, params, **kwargs)
        return connection.execute(statement, params, **kwargs)

    async def flush(self, objects: Any = None) -> None:
        if self._orm is not None:
            await self._hold()
            self._orm.flush(objects)

    async def commit(self) -> None:
        try:
            if self._orm is not None:
                await self._hold()  # objects added (not executed) are flushed now
                # Commits the transaction if the Session began it, else (it joined one
                # the Connection began) leaves that to the Connection below.
                self._orm.commit()
            if self._holding:
                self._maker.connection.commit()
                # What prepared statements began without SQLAlchemy (a no-op otherwise).
                self._maker.driver_connection.commit()
        finally:
            self._let_go()

    async def rollback(self) -> None:
        try:
            if self._orm is not None:
                self._orm.rollback()
            if self._holding:
                self._maker.connection.rollback()
                self._maker.driver_connection.rollback()
        finally:
            self._let_go()

    async def close(self) -> None:
        try:
            if self._orm is not None:
                self._orm.close()
            if self._holding:  # what was not committed is dropped
                self._maker.connection.rollback()
                self._maker.driver_connection.rollback()
        finally:
            self._let_go()

    @asynccontextmanager
    async def begin_nested(self) -> AsyncIterator[Any]:  # type: ignore[override]
        connection = await self._hold()
        if self._orm is not None:
            with self._orm.begin_nested() as savepoint:
                yield savepoint
        else:
            with connection.begin_nested() as nested:
                yield nested

    async def __aenter__(self) -> InlineSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # No shielded task as AsyncSession's: closing here never awaits, so a
        # cancellation cannot land half-way through it.
        await self.close()
