"""Rows a unit of work holds until its commit (db/held_inserts.py): written together with
the commit, atomically, never after a rollback; on PostgreSQL in one statement."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.config import Settings
from agent_orchestrator.db import held_inserts
from agent_orchestrator.db.engine import (
    UnitOfWork,
)
from agent_orchestrator.db.repositories.messages import MESSAGES, MessageRepository
from agent_orchestrator.db.repositories.sessions import SESSIONS, SessionRepository
from agent_orchestrator.db.repositories.tasks import TASKS, TaskRepository
from agent_orchestrator.db.tables import AuditEntryRow, MessageRow, SessionRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.ids import new_id
from tests.rows import chat_task, session_row
from tests.sql_trace import statements_sent_by

TENANT = "tenant-held"


def _session() -> SessionRow:
    return session_row(TENANT, metadata_={"k": "v"})


def _message(session: SessionRow, **values: Any) -> MessageRow:
    return MESSAGES.new(
        **{
            "id": new_id(),
            "session_id": session.id,
            "tenant_id": TENANT,
            "role": "user",
            "content": "hello",
            "task_id": None,
            "metadata_": {},
            "created_at": utcnow(),
            **values,
        }
    )


def _audit() -> AuditEntryRow:
    return AuditEntryRow(
        id=new_id(),
        tenant_id=TENANT,
        actor_id="user-1",
        actor_kind="user",
        action="test.held",
        resource_type="session",
        resource_id=None,
        outcome="success",
        correlation_id=None,
        details={},
        created_at=utcnow(),
    )


async def _count(factory: async_sessionmaker[AsyncSession], table: Any) -> int:
    async with factory() as db:
        query = select(func.count()).select_from(table).where(table.c.tenant_id == TENANT)
        return int((await db.execute(query)).scalar_one())


async def test_held_rows_are_written_with_the_commit(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    session = _session()
    task, first, second = chat_task(session), _message(session), _message(session, role="assistant")
    async with UnitOfWork(factory) as uow:
        uow.insert_at_commit(SESSIONS, session)
        uow.insert_at_commit(TASKS, task)
        uow.insert_at_commit(MESSAGES, first)
        uow.insert_at_commit(MESSAGES, second)  # the same group: one multi-row INSERT
        uow.audit(_audit())
        uow.audit(_audit())
        # Held: not in the database before the commit, not even for this transaction.
        assert await SessionRepository(uow.session).get(TENANT, session.id) is None
    async with factory() as db:
        stored = await SessionRepository(db).get(TENANT, session.id)
        assert stored is not None
        assert stored.metadata_ == {"k": "v"}
        assert await TaskRepository(db).get(TENANT, task.id) is not None
        listed = await MessageRepository(db).latest(TENANT, session.id, 10)
    assert sorted(m.id for m in listed) == sorted([first.id, second.id])
    assert await _count(factory, AuditEntryRow.__table__) == 2


async def test_a_failing_row_fails_the_commit_and_writes_nothing(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    session = _session()
    taken = _message(session)
    async with UnitOfWork(factory) as uow:
        uow.insert_at_commit(SESSIONS, session)
        uow.insert_at_commit(MESSAGES, taken)
    task = chat_task(session)
    duplicate = _message(session, id=taken.id)

    async def commit_with_the_duplicate() -> None:
        async with UnitOfWork(factory) as uow:
            uow.insert_at_commit(TASKS, task)
            uow.insert_at_commit(MESSAGES, duplicate)
            uow.audit(_audit())

    with pytest.raises(IntegrityError):
        await commit_with_the_duplicate()
    async with factory() as db:
        assert await TaskRepository(db).get(TENANT, task.id) is None
    assert await _count(factory, AuditEntryRow.__table__) == 0


async def test_a_rollback_drops_the_held_rows(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    session = _session()
    async with UnitOfWork(factory) as uow:
        uow.insert_at_commit(SESSIONS, session)
        uow.audit(_audit())
        await uow.rollback()
    async with factory() as db:
        assert await SessionRepository(db).get(TENANT, session.id) is None
    assert await _count(factory, AuditEntryRow.__table__) == 0


async def test_held_rows_join_a_transaction_that_read_first(
    factory: async_sessionmaker[AsyncSession],
) -> None:
    session = _session()
    async with UnitOfWork(factory) as uow:
        assert await SessionRepository(uow.session).get(TENANT, session.id) is None
        uow.insert_at_commit(SESSIONS, session)
        uow.insert_at_commit(MESSAGES, _message(session))
    async with factory() as db:
        assert len(await MessageRepository(db).latest(TENANT, session.id, 10)) == 1


async def test_without_a_kept_statement_the_groups_go_one_by_one(
    factory: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too many parameters for one statement (or too many shapes kept): each group is
    its own INSERT, with the same result."""
    monkeypatch.setattr(held_inserts, "MAX_PARAMETERS", 1)
    session = _session()
    async with UnitOfWork(factory) as uow:
        uow.insert_at_commit(SESSIONS, session)
        uow.insert_at_commit(MESSAGES, _message(session), _message(session))
    async with factory() as db:
        assert len(await MessageRepository(db).latest(TENANT, session.id, 10)) == 2


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_on_postgresql_held_rows_are_one_statement_and_one_round_trip(
    factory: async_sessionmaker[AsyncSession], settings: Settings
) -> None:
    """No BEGIN, no COMMIT: the statement is the transaction. The message comes before
    its session in the statement, and PostgreSQL checks the key at the statement's end."""
    session = _session()
    with statements_sent_by(factory.kw["bind"], factory) as sent:
        async with UnitOfWork(factory) as uow:
            uow.insert_at_commit(MESSAGES, _message(session))
            uow.insert_at_commit(SESSIONS, session)
            uow.audit(_audit())
    assert len(sent) == 1, sent
    assert sent[0].startswith("with w0 as (insert into messages"), sent
    assert sent[0].count("insert into") == 3, sent
    async with factory() as db:
        assert len(await MessageRepository(db).latest(TENANT, session.id, 10)) == 1
