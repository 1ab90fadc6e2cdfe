"""The hot-path data layer: statements built once, detached rows, service-call upserts,
and embedded mode's inline SQLite sessions (one transaction at a time)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Executable, func, inspect, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.config import Settings
from agent_orchestrator.db import wal_checkpoints
from agent_orchestrator.db.engine import (
    _sqlite_pragmas,
    create_engine,
    session_factory,
    single_statement_factory,
)
from agent_orchestrator.db.inline_session import InlineSession, InlineSessionMaker
from agent_orchestrator.db.migrate import upgrade
from agent_orchestrator.db.prepared import OPTION, PreparedResult, PreparedStatement, hot
from agent_orchestrator.db.repositories.sessions import SESSIONS, SessionRepository
from agent_orchestrator.db.repositories.tasks import _GET as TASKS_GET
from agent_orchestrator.db.repositories.tasks import _SERVICE_CALLS as SERVICE_CALLS
from agent_orchestrator.db.repositories.tasks import Add, Guard, TaskRepository
from agent_orchestrator.db.tables import ServiceCallRow, SessionRow, TaskRow
from agent_orchestrator.db.types import UtcDateTime, utcnow
from agent_orchestrator.ids import new_id
from tests.rows import task_row


def unmarked(statement: Executable) -> Executable:
    return statement.execution_options(**{OPTION: False})


def _task(**overrides: Any) -> TaskRow:
    return task_row("tenant-a", **{"input": {"message": "hi"}, **overrides})


def _call(task: TaskRow, step: str, status: str, attempts: int) -> ServiceCallRow:
    now = utcnow()
    return ServiceCallRow(
        id=new_id(),
        task_id=task.id,
        tenant_id=task.tenant_id,
        step=step,
        service="conversation",
        operation="get_history",
        status=status,
        attempts=attempts,
        latency_ms=1.5,
        error=None,
        started_at=now,
        finished_at=now,
    )


async def test_service_calls_keep_one_row_per_step_with_the_latest_attempt(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    task = _task()
    async with factory() as db:
        repo = TaskRepository(db)
        await repo.add(task)
        await repo.replace_service_calls(
            task.tenant_id,
            task.id,
            [_call(task, "history", "failed", 3), _call(task, "agent", "succeeded", 1)],
        )
        await db.commit()
    async with factory() as db:
        repo = TaskRepository(db)
        await repo.replace_service_calls(
            task.tenant_id, task.id, [_call(task, "history", "succeeded", 1)]
        )
        await db.commit()
    async with factory() as db:
        calls = await TaskRepository(db).service_calls(task.tenant_id, task.id)
    assert sorted((c.step, c.status, c.attempts) for c in calls) == [
        ("agent", "succeeded", 1),
        ("history", "succeeded", 1),
    ]


async def test_transition_adds_to_columns_and_respects_its_guard(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    task = _task()
    async with factory() as db:
        await TaskRepository(db).add(task)
        await db.commit()
    now = utcnow()
    async with factory() as db:
        repo = TaskRepository(db)
        lost = await repo.transition(
            task.tenant_id,
            task.id,
            sources=["queued"],
            values={"status": "running", "attempt": Add(1)},
            guard=Guard(delivery=2),  # someone re-delivered it meanwhile
        )
        won = await repo.transition(
            task.tenant_id,
            task.id,
            sources=["queued"],
            values={"status": "running", "attempt": Add(1), "lease_owner": "w1"},
            guard=Guard(delivery=1, due_at=now, not_cancelled=True),
        )
        again = await repo.transition(
            task.tenant_id,
            task.id,
            sources=["queued"],
            values={"status": "running", "attempt": Add(1)},
        )
        await db.commit()
    assert lost is None
    assert again is None
    assert won is not None
    assert (won.status, won.attempt, won.lease_owner) == ("running", 1, "w1")
    assert inspect(won).transient  # detached values, never flushed behind our back
    async with factory() as db:
        stored = await TaskRepository(db).get(task.tenant_id, task.id)
    assert stored is not None  # the committed row, not only the returned copy
    assert (stored.status, stored.attempt, stored.lease_owner) == ("running", 1, "w1")


async def test_session_rows_map_metadata_both_ways(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    now = utcnow()
    row = SessionRow(
        id=new_id(),
        tenant_id="tenant-a",
        user_id="user-1",
        agent_id=None,
        state="active",
        metadata_={"topic": "billing"},
        created_at=now,
        last_activity_at=now,
        expires_at=now + timedelta(hours=1),
        closed_at=None,
    )
    async with factory() as db:
        await SessionRepository(db).add(row)
        await db.commit()
    async with factory() as db:
        repo = SessionRepository(db)
        loaded = await repo.get("tenant-a", row.id)
        assert loaded is not None
        assert loaded.metadata_ == {"topic": "billing"}
        await repo.update(loaded, metadata_={"topic": "refunds"}, state="processing")
        assert loaded.metadata_ == {"topic": "refunds"}  # the caller's row follows
        await db.commit()
    async with factory() as db:
        stored = await SessionRepository(db).get("tenant-a", row.id)
        assert stored is not None
        assert (stored.metadata_, stored.state) == ({"topic": "refunds"}, "processing")
        assert await SessionRepository(db).get("tenant-b", row.id) is None


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_inline_sessions_run_one_transaction_at_a_time(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    first = factory()
    assert isinstance(first, InlineSession)
    order: list[str] = []
    task = _task()
    await TaskRepository(first).add(task)  # first now holds the connection

    async def second() -> None:
        async with factory() as db:
            row = await TaskRepository(db).get(task.tenant_id, task.id)
            order.append("second read " + ("committed" if row else "nothing"))

    waiting = asyncio.create_task(second())
    await asyncio.sleep(0.05)
    assert order == []  # still waiting for the first transaction to end
    order.append("first commits")
    await first.commit()
    await waiting
    await first.close()
    assert order == ["first commits", "second read committed"]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_inline_session_lets_go_on_rollback_close_and_error(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    task = _task()
    async with factory() as db:
        await TaskRepository(db).add(task)
        await db.rollback()  # nothing written, and the connection is free again

    async def fail_mid_transaction() -> None:
        async with factory() as db:
            await TaskRepository(db).add(task)
            raise RuntimeError("the handler failed mid-transaction")

    with pytest.raises(RuntimeError):
        await fail_mid_transaction()
    async with asyncio.timeout(2):  # neither left the lock held
        async with factory() as db:
            found = await db.execute(select(TaskRow.id).where(TaskRow.id == task.id))
            assert found.first() is None


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_inline_sessions_share_one_held_connection_and_no_failed_transaction(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    """Sessions bind to the one SQLite connection the maker keeps checked out (not back to
    the pool after every transaction); a transaction that failed on it must be gone for
    the next session, whatever the first left behind."""
    pool = factory.sync_engine.pool  # type: ignore[attr-defined]
    first, clash = _task(idempotency_key="k2"), _task(idempotency_key="k2")
    async with factory() as db:
        await TaskRepository(db).add(first)
        await db.commit()
    assert pool.checkedout() == 1  # held between sessions

    async def fail_mid_transaction() -> None:
        async with factory() as db:
            await TaskRepository(db).add(_task())  # written, then rolled back
            await TaskRepository(db).add(clash)  # the same idempotency key: refused

    with pytest.raises(Exception, match="UNIQUE"):
        await fail_mid_transaction()
    later = _task()
    async with factory() as db:
        await TaskRepository(db).add(later)
        await db.commit()
    assert await _stored_task_ids(factory) == {first.id, later.id}
    assert pool.checkedout() == 1


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_an_inline_session_that_let_go_cannot_join_anothers_transaction(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    """A method InlineSession does not override (AsyncSession.scalar) runs without the
    lock: it must fail, not read or write inside the transaction another session holds
    on the shared connection."""
    earlier = factory()
    await TaskRepository(earlier).add(_task())
    await earlier.commit()  # lets go of the lock
    holder = factory()
    await TaskRepository(holder).add(_task())  # uncommitted, on the shared connection
    try:
        with pytest.raises(Exception, match="QueuePool limit"):
            await earlier.scalar(select(func.count()).select_from(TaskRow))
    finally:
        await holder.rollback()
        await holder.close()
        await earlier.close()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_inline_savepoint_rolls_back_alone(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    kept, dropped = _task(), _task(idempotency_key="k1")
    clash = _task(idempotency_key="k1")
    async with factory() as db:
        repo = TaskRepository(db)
        await repo.add(kept)
        await repo.add(dropped)
        with pytest.raises(Exception, match="UNIQUE"):
            async with db.begin_nested():
                await repo.add(clash)
        await db.commit()
    ids = await _stored_task_ids(factory)
    assert ids == {kept.id, dropped.id}
    assert clash.id not in ids


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_single_statement_sessions_commit_each_statement_on_postgresql(
    settings: Settings,
) -> None:
    engine = create_engine(settings.resolved_database_url())
    transactional = session_factory(engine)
    single = single_statement_factory(engine, transactional)
    task = _task()
    try:
        async with single() as db:
            await TaskRepository(db).add(task)  # no commit: autocommit wrote it already
            async with transactional() as other:
                seen = await TaskRepository(other).get(task.tenant_id, task.id)
            assert seen is not None
            await db.rollback()  # nothing left to undo
        async with transactional() as db:
            assert await TaskRepository(db).get(task.tenant_id, task.id) is not None
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_single_statement_sessions_are_the_inline_ones_on_sqlite(
    factory: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    engine = create_engine(settings.resolved_database_url())
    try:
        assert single_statement_factory(engine, factory) is factory
    finally:
        await engine.dispose()


def test_row_codec_new_matches_the_constructor_and_refuses_unknown_names() -> None:
    values: dict[str, Any] = {
        "id": new_id(),
        "tenant_id": "tenant-a",
        "user_id": "user-1",
        "state": "active",
        "metadata_": {"topic": "billing"},
        "created_at": utcnow(),
    }
    made, constructed = SESSIONS.new(**values), SessionRow(**values)
    assert SESSIONS.values(made) == SESSIONS.values(constructed)
    assert SESSIONS.values(constructed)["agent_id"] is None  # never set: None
    constructed.agent_id = "helper"
    assert SESSIONS.values(constructed)["agent_id"] == "helper"  # set later: seen
    assert SESSIONS.values(made)["metadata"] == {"topic": "billing"}  # by column name
    assert made.agent_id is None  # not given: None
    assert made.closed_at is None
    assert inspect(made).transient
    with pytest.raises(TypeError, match="'metadata'"):
        SESSIONS.new(metadata={"topic": "billing"})  # the column's name, not the attribute's


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 26, 8, 1, 2, 345678, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=UTC),  # no microseconds: still six digits
        datetime(999, 3, 4, 5, 6, 7, 8, tzinfo=UTC),  # a year of three digits
        datetime(2026, 11, 26, 1, 2, 3, 999999, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
def test_sqlite_stores_datetimes_as_sqlalchemys_datetime_does(moment: datetime) -> None:
    """UtcDateTime formats SQLite's text itself (db/types.py): it must be the text that
    SQLAlchemy's DATETIME stored before, or rows written before and after would compare
    and sort differently; and it must read back as the same instant."""
    dialect = sqlite.dialect()
    column = UtcDateTime().dialect_impl(dialect)
    bind, result = column.bind_processor(dialect), column.result_processor(dialect, None)
    assert bind is not None
    assert result is not None
    naive_utc = moment.astimezone(UTC).replace(tzinfo=None)
    assert bind(moment) == sqlite.DATETIME().bind_processor(dialect)(naive_utc)
    assert result(bind(moment)) == moment
    assert bind(None) is None
    with pytest.raises(ValueError, match="naive"):
        bind(naive_utc)


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("orm_first", [True, False])
async def test_inline_core_and_orm_statements_share_one_transaction(
    factory: async_sessionmaker[AsyncSession], orm_first: bool
) -> None:
    """Core statements run on the held Connection, ORM ones through a Session that joins
    (or began) the same transaction: they commit together and roll back together,
    whichever ran first."""
    committed, dropped = _task(), _task()
    listing = select(TaskRow).where(TaskRow.tenant_id == "tenant-a")

    async def write(task: TaskRow) -> list[TaskRow]:
        if orm_first:  # the Session begins the transaction, the Connection's joins it
            await db.execute(listing)
        await TaskRepository(db).add(task)
        return list((await db.execute(listing)).scalars())

    async with factory() as db:
        assert [row.id for row in await write(committed)] == [committed.id]
        await db.commit()
    async with factory() as db:
        assert {row.id for row in await write(dropped)} == {committed.id, dropped.id}
        await db.rollback()
    assert await _stored_task_ids(factory) == {committed.id}


async def test_prepared_statements_read_and_write_as_sqlalchemy_does(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    """A hot statement run by the driver (sqlite3 or asyncpg) stores what SQLAlchemy would
    store and reads back what SQLAlchemy would read (the same type processors)."""
    task = _task(input={"message": "hé", "n": [1, 2]}, not_before=utcnow())
    async with factory() as db:
        repo = TaskRepository(db)
        await repo.add(task)  # prepared INSERT
        await repo.replace_service_calls(  # prepared upsert, float latencies
            task.tenant_id, task.id, [_call(task, "history", "succeeded", 1)]
        )
        await db.commit()
    params = {"tenant_id": task.tenant_id, "task_id": task.id}
    async with factory() as db:
        for statement in (TASKS_GET, SERVICE_CALLS):
            by_driver = await db.execute(statement, params)
            assert isinstance(by_driver, PreparedResult)  # the driver path ran it
            prepared = by_driver.mappings().all()
            # The same statement without the mark: SQLAlchemy's own execution.
            plain = (await db.execute(unmarked(statement), params)).mappings().all()
            assert len(prepared) == 1
            assert prepared == [dict(row) for row in plain]
        row = (await db.execute(TASKS_GET, params)).mappings().one_or_none()
    assert row is not None
    assert row["input"] == {"message": "hé", "n": [1, 2]}
    assert row["not_before"] == task.not_before  # timezone-aware UTC, as written
    assert isinstance(row["id"], uuid.UUID)


async def test_hot_writes_commit_and_roll_back_with_their_transaction(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    dropped, kept = _task(), _task()
    async with factory() as db:
        await TaskRepository(db).add(dropped)
        await db.rollback()
    async with factory() as db:
        await TaskRepository(db).add(kept)
        assert (
            await db.execute(TASKS_GET, {"tenant_id": "tenant-a", "task_id": kept.id})
        ).mappings().one_or_none() is not None
        await db.commit()
    assert await _stored_task_ids(factory) == {kept.id}


async def test_prepared_statement_errors_are_sqlalchemy_errors(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    task = _task()
    async with factory() as db:
        await TaskRepository(db).add(task)
        with pytest.raises(IntegrityError, match=r"UNIQUE|duplicate key"):
            await TaskRepository(db).add(task)  # the same id again
        await db.rollback()
    async with factory() as db:
        with pytest.raises(InvalidRequestError, match="'task_id'"):
            await db.execute(TASKS_GET, {"tenant_id": "tenant-a"})


def test_a_statement_that_renders_per_call_cannot_be_prepared() -> None:
    statuses = select(TaskRow.__table__).where(TaskRow.__table__.c.status.in_(["a", "b"]))
    with pytest.raises(ValueError, match="fixed SQL"):
        PreparedStatement(hot(statuses), sqlite.dialect())


def _in_file(path: str, task: TaskRow) -> bool:
    """Whether the database file alone holds the task (immutable: the log is ignored, and
    the file is read afresh by a new connection each time)."""
    file_only = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        query = "SELECT count(*) FROM tasks WHERE id = ?"
        return bool(file_only.execute(query, (task.id.hex,)).fetchone() == (1,))
    except sqlite3.OperationalError:  # not even the tables are in the file yet
        return False
    finally:
        file_only.close()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_embedded_commits_leave_wal_checkpoints_to_a_thread(settings: Settings) -> None:
    """The inline connection never checkpoints in a commit (the event loop would wait for
    the disk); the checkpointer thread copies the log into the database file soon after."""
    engine = create_engine(settings.resolved_database_url())
    await upgrade(engine)
    maker = InlineSessionMaker(engine, _sqlite_pragmas, checkpoint_interval=0.05)
    task = _task()
    try:
        pragma = maker.driver_connection.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert pragma == (0,)
        async with maker() as db:
            await TaskRepository(db).add(task)
            await db.commit()
        # The database file shows the row only once a checkpoint has copied it there.
        path = engine.url.database
        assert path is not None
        async with asyncio.timeout(5):
            while not _in_file(path, task):
                await asyncio.sleep(0.02)
    finally:
        maker.dispose()
        await engine.dispose()
    assert not any(thread.name == "sqlite-wal-checkpoints" for thread in threading.enumerate())


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_embedded_wal_starts_over_under_steady_writes(settings: Settings) -> None:
    """Commits that never pause (each transaction begins as soon as the last one ends and
    the loop has run what was ready) still let the log start over: it holds a small part
    of what was written, not every page since start-up, and every row is kept."""
    engine = create_engine(settings.resolved_database_url())
    await upgrade(engine)
    maker = InlineSessionMaker(engine, _sqlite_pragmas, checkpoint_interval=0.05)
    assert maker.checkpointer is not None
    maker.checkpointer.restart_frames = 20
    path = engine.url.database
    assert path is not None
    ids = []
    try:
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.5
        while loop.time() < until:
            async with maker() as db:
                task = _task()
                await TaskRepository(db).add(task)
                await db.commit()
            ids.append(task.id)
            await asyncio.sleep(0)  # as requests do between transactions
        restarts = maker.checkpointer.restarts
        log_pages = _log_pages(path)  # right away: what the log holds now
        async with maker() as db:
            stored = (await db.execute(select(func.count()).select_from(TaskRow))).scalar_one()
    finally:
        maker.dispose()
        await engine.dispose()
    assert stored == len(ids)
    assert restarts >= 3, restarts
    # A transaction writes about 7 pages (the table's and its indexes'): a log that was
    # never started over holds ~7 per transaction (seen: 73,644 pages for 10,312); one
    # started over, the pages since the last restart.
    assert log_pages < len(ids) / 2, (log_pages, len(ids))


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_embedded_wal_restart_waits_for_an_open_transaction(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RESTART is due while a transaction holds the inline sessions' lock: the
    checkpointer gives up within LOCK_WAIT instead of waiting on (or breaking into) the
    transaction, the event loop keeps running meanwhile, and once the transaction ends
    the log starts over; the lock is never left taken."""
    monkeypatch.setattr(wal_checkpoints, "LOCK_WAIT", 0.1)
    engine = create_engine(settings.resolved_database_url())
    await upgrade(engine)
    maker = InlineSessionMaker(engine, _sqlite_pragmas, checkpoint_interval=0.05)
    assert maker.checkpointer is not None
    maker.checkpointer.restart_frames = 1
    loop = asyncio.get_running_loop()
    try:
        async with maker() as db:
            await TaskRepository(db).add(_task())
            # Several rounds come and go while this transaction is open.
            ticks, until = 0, loop.time() + 0.6
            while loop.time() < until:
                await asyncio.sleep(0.01)
                ticks += 1
            assert maker.checkpointer.restarts == 0
            await db.commit()
        assert ticks > 30  # the loop ran on: nothing blocked it
        async with asyncio.timeout(5):
            while maker.checkpointer.restarts == 0:
                async with maker() as db:  # a fresh session finds the lock free
                    await TaskRepository(db).add(_task())
                    await db.commit()
                await asyncio.sleep(0.02)
        assert not maker.lock.locked()
    finally:
        maker.dispose()
        await engine.dispose()


async def _stored_task_ids(factory: async_sessionmaker[AsyncSession]) -> set[uuid.UUID]:
    """The ids of every task row the database holds, read in a session of its own."""
    async with factory() as db:
        return {row[0] for row in await db.execute(select(TaskRow.id))}


def _log_pages(path: str) -> int:
    """Pages in the log now (a PASSIVE checkpoint's count; retried while the
    checkpointer's own one runs)."""
    reader = sqlite3.connect(path)
    try:
        while True:
            busy, pages, _ = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not busy:
                return int(pages)
    finally:
        reader.close()


@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize("autocommit", [False, True], ids=["transactional", "single"])
async def test_after_a_postgresql_restart_one_hot_statement_fails_not_one_per_connection(
    factory: async_sessionmaker[AsyncSession], settings: Settings, autocommit: bool
) -> None:
    """Every pooled connection dies (as in a restart): the first hot statement fails as
    SQLAlchemy's would (connection invalidated) and takes the pool with it, so the next
    sessions get new connections instead of the other dead ones."""
    if autocommit:
        factory = single_statement_factory(factory.kw["bind"], factory)
    task = _task()
    async with factory() as db:
        await TaskRepository(db).add(task)
        await db.commit()
    params = {"tenant_id": task.tenant_id, "task_id": task.id}

    async def read(hold: asyncio.Event | None = None) -> None:
        async with factory() as db:
            await db.execute(TASKS_GET, params)
            if hold is not None:
                await hold.wait()  # keep the connection until the others have theirs

    hold = asyncio.Event()
    readers = [asyncio.create_task(read(hold)) for _ in range(3)]
    await asyncio.sleep(0.3)
    hold.set()
    await asyncio.gather(*readers)  # the pool now holds three idle connections
    database = settings.resolved_database_url().rsplit("/", 1)[1]
    admin = await asyncpg.connect(settings.resolved_database_url().replace("+asyncpg", ""))
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await admin.close()
    with pytest.raises(DBAPIError) as caught:
        await read()
    assert caught.value.connection_invalidated
    for _ in range(3):
        await read()  # new connections, not the other dead ones
