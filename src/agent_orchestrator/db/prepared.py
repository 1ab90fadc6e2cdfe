"""Hot statements, compiled once and run by the database driver directly.

On the held connection (inline_session.py), SQLAlchemy's execution machinery still cost
more than SQLite's own work: measured here, a one-row SELECT by key took 43 us through
`Connection.execute` against 10 us through the driver, the parameters and result rows
converted by the same type processors. A chat turn runs about a dozen such statements.

So the statements every turn runs are marked `hot(...)` where they are built. On SQLite,
an inline session compiles a marked statement once (SQLAlchemy's compiler, SQLAlchemy's
bind and result processors of each column type) and then runs it with `sqlite3` itself;
on PostgreSQL a `DriverSession` does the same with asyncpg (driver_session.py). A marked
statement's result offers what the repositories read of it: `mappings()` (`one_or_none`,
`all`, iteration), `scalar_one_or_none()` and `rowcount`. Driver errors are raised as
SQLAlchemy's, so `IntegrityError` means the same on every path.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Float, exc, literal
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.types import TypeEngine

OPTION = "inline_prepared"
_MISSING = object()

StatementT = TypeVar("StatementT", bound=Executable)
Processor = Callable[[Any], Any] | None
#: A hot statement with the parameters of one execution.
Bound = tuple[Executable, dict[str, Any]]


def hot(statement: StatementT) -> StatementT:
    """Mark a statement built once (a module constant, or kept in a cache) for the
    prepared path. Never mark one built per call: each is compiled once and kept."""
    return statement.execution_options(**{OPTION: True})


def is_hot(statement: Executable) -> bool:
    return bool(statement.get_execution_options().get(OPTION))


def fixed_in(column: ColumnElement[Any], values: Iterable[Any]) -> ColumnElement[bool]:
    """`column IN (values)` for a hot statement: the values as literals. An IN list of
    plain values is an expanding parameter, rendered per call, which a statement compiled
    once cannot be (PreparedStatement refuses it)."""
    return column.in_([literal(value) for value in values])


_compiled: dict[tuple[str, str, Executable], PreparedStatement] = {}


def prepared(statement: Executable, dialect: Dialect) -> PreparedStatement:
    """The statement compiled for this database and driver, once per process (hot
    statements are built once, so this holds a few dozen)."""
    key = (dialect.name, dialect.driver, statement)
    found = _compiled.get(key)
    if found is None:
        found = _compiled[key] = PreparedStatement(statement, dialect)
    return found


class PreparedResult:
    """The rows (as column key -> value mappings) or the row count of one execution."""

    def __init__(self, rows: list[dict[str, Any]], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def mappings(self) -> PreparedResult:
        return self

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows)

    def all(self) -> list[dict[str, Any]]:
        return list(self._rows)

    def one_or_none(self) -> dict[str, Any] | None:
        if len(self._rows) > 1:
            raise exc.MultipleResultsFound("more than one row where one was expected")
        return self._rows[0] if self._rows else None

    def scalar_one_or_none(self) -> Any:
        row = self.one_or_none()
        return None if row is None else next(iter(row.values()))


class PreparedStatement:
    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        assert isinstance(statement, ClauseElement)
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        if compiled.positiontup is None or "POSTCOMPILE" in compiled.string:
            # An expanding IN renders per call; build such lists from literal() values.
            raise ValueError(f"a hot statement must compile to fixed SQL: {compiled.string}")
        self.sql = compiled.string
        self._names = tuple(compiled.positiontup)
        binds = compiled.binds
        self._defaults = {
            name: binds[name].value for name in self._names if not binds[name].required
        }
        self._bind_processors: tuple[Processor, ...] = tuple(
            binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in self._names
        )
        columns = _result_columns(statement)
        self._keys = tuple(column.key for column in columns)
        self._result_processors: tuple[Processor, ...] = tuple(
            _result_processor(column.type, dialect) for column in columns
        )

    def run(
        self,
        connection: sqlite3.Connection,
        params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    ) -> PreparedResult:
        try:
            if isinstance(params, Sequence):
                cursor = connection.executemany(self.sql, [self._bound(one) for one in params])
            else:
                cursor = connection.execute(self.sql, self._bound(params or {}))
            rows = cursor.fetchall() if self._keys else []
        except sqlite3.Error as error:
            raise exc.DBAPIError.instance(
                self.sql, params, error, sqlite3.Error, connection_invalidated=False
            ) from error
        return PreparedResult([self._mapping(row) for row in rows], cursor.rowcount)

    async def fetch(
        self, driver: Any, params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
    ) -> PreparedResult:
        """Run on an asyncpg connection; its errors are the caller's to translate (see
        driver_session.py)."""
        if isinstance(params, Sequence):
            await driver.executemany(self.sql, [self._bound(one) for one in params])
            return PreparedResult([], -1)
        values = self._bound(params or {})
        if self._keys:
            records = await driver.fetch(self.sql, *values)
            return PreparedResult([self._mapping(record) for record in records], len(records))
        status: str = await driver.execute(self.sql, *values)  # "INSERT 0 1", "UPDATE 2"
        count = status.rsplit(" ", 1)[-1]
        return PreparedResult([], int(count) if count.isdigit() else -1)

    def _bound(self, params: Mapping[str, Any]) -> list[Any]:
        values = []
        for name, process in zip(self._names, self._bind_processors, strict=True):
            value = params.get(name, _MISSING)
            if value is _MISSING:
                value = self._defaults.get(name, _MISSING)
                if value is _MISSING:
                    raise exc.InvalidRequestError(f"a value is required for parameter {name!r}")
            values.append(value if process is None else process(value))
        return values

    def _mapping(self, row: Sequence[Any]) -> dict[str, Any]:
        return {
            key: value if process is None else process(value)
            for key, process, value in zip(self._keys, self._result_processors, row, strict=True)
        }


def _result_processor(type_: TypeEngine[Any], dialect: Dialect) -> Processor:
    if isinstance(type_, Float) and dialect.name == "postgresql":
        # asyncpg's processor choice needs the driver's type code; a Float column is
        # double precision, which asyncpg returns as a float already.
        return None
    return type_.dialect_impl(dialect).result_processor(dialect, None)


def _result_columns(statement: ClauseElement) -> list[Any]:
    """What the statement returns: a SELECT's columns, an INSERT/UPDATE's RETURNING
    (none without one)."""
    selected = getattr(statement, "selected_columns", None)
    if selected is None:
        selected = getattr(statement, "exported_columns", None)
    return [] if selected is None else list(selected)
