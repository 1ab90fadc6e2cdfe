"""PostgreSQL sessions that run the hot statements with asyncpg itself.

Through SQLAlchemy's `AsyncSession`, a one-row SELECT in autocommit cost 404-425 us of
client CPU here, against 207-283 us for the same statement sent by asyncpg on a
connection checked out of the same pool (a greenlet per call, the ORM session, the
execution context and the DBAPI adapter make the difference). A chat turn runs about a
dozen such statements between the API and the worker.

A `DriverSession` is an ordinary `AsyncSession` for everything but the statements marked
`hot(...)` (db/prepared.py). Those are compiled once for asyncpg with SQLAlchemy's
compiler and type processors, and sent by asyncpg on the session's own connection:
inside the session's transaction (which it starts the way SQLAlchemy's adapter does, at
the first statement), or on its own in an autocommit session. Errors are translated as
SQLAlchemy translates them (`IntegrityError` and so on), and a connection found closed is
invalidated with the pool's other connections, as after SQLAlchemy's own statement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, cast

from sqlalchemy import exc
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, AsyncSessionTransaction
from sqlalchemy.sql.base import Executable

from agent_orchestrator.db.prepared import PreparedResult, PreparedStatement, is_hot, prepared


class DriverSession(AsyncSession):
    _hot: tuple[AsyncConnection, Any] | None = None

    async def execute(
        self,
        statement: Any,
        params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Result[Any]:
        if is_hot(statement) and not kwargs:
            return cast(Result[Any], await self._run_hot(statement, params))
        return cast(Result[Any], await super().execute(statement, params, **kwargs))

    async def execute_last(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> PreparedResult:
        """A hot statement that is the last before `commit`. When it is also the first of
        the transaction it runs without BEGIN, on its own (one statement is atomic), and
        the commit then has nothing to send: one round trip instead of three. Nothing may
        run on the session between this and the commit."""
        return await self._run_hot(statement, params, begin=False)

    async def _run_hot(
        self,
        statement: Executable,
        params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
        *,
        begin: bool = True,
    ) -> PreparedResult:
        connection, adapted = await self._hot_connection()
        compiled = prepared(statement, connection.dialect)
        try:
            if begin and adapted._transaction is None:
                # As the adapter does before its first statement (a no-op in autocommit).
                await adapted._start_transaction()
            return await compiled.fetch(adapted.driver_connection, params)
        except exc.SQLAlchemyError:
            raise  # already SQLAlchemy's (a missing parameter, say)
        except Exception as error:
            await self._raise_translated(connection, adapted, compiled, params, error)

    async def _hot_connection(self) -> tuple[AsyncConnection, Any]:
        """The session's connection (joining or beginning its transaction, as any
        statement would) and its DBAPI adapter, kept until the transaction ends or a
        savepoint begins."""
        if self._hot is None:
            connection = await self.connection()
            raw = await connection.get_raw_connection()
            self._hot = (connection, raw.dbapi_connection)
        return self._hot

    async def _raise_translated(
        self,
        connection: AsyncConnection,
        adapted: Any,
        prepared: PreparedStatement,
        params: Any,
        error: Exception,
    ) -> NoReturn:
        dialect = connection.dialect
        try:
            adapted._handle_exception(error)  # raises the DBAPI-level error
        except Exception as translated:
            dbapi_error = dialect.loaded_dbapi.Error
            if not isinstance(translated, dbapi_error):
                raise
            closed = bool(adapted.driver_connection.is_closed())
            if closed:
                # As SQLAlchemy does on a disconnect: this connection, and the pool with
                # it (after a PostgreSQL restart every pooled connection is dead; a new
                # pool means one failed statement, not one per pooled connection).
                # Connections checked out elsewhere stay theirs and close when returned.
                self._hot = None
                await connection.invalidate(translated)
                await connection.engine.dispose()
            raise exc.DBAPIError.instance(
                prepared.sql,
                params,
                translated,
                dbapi_error,
                connection_invalidated=closed,
                dialect=dialect,
            ) from error
        raise AssertionError("_handle_exception returned")  # it always raises

    def begin_nested(self) -> AsyncSessionTransaction:
        # SQLAlchemy emits the SAVEPOINT when the nested transaction is first asked for
        # its connection: the next hot statement must ask again.
        self._hot = None
        return super().begin_nested()

    async def commit(self) -> None:
        self._hot = None
        await super().commit()

    async def rollback(self) -> None:
        self._hot = None
        await super().rollback()

    async def close(self) -> None:
        self._hot = None
        await super().close()
