"""Alembic migrations on an empty SQLite file and an empty PostgreSQL database: up to head,
the schema they build is the one `db/tables.py` declares, and down to base again."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import create_engine
from agent_orchestrator.db.migrate import (
    alembic_config,
    current_revision,
    head_revision,
    is_up_to_date,
    upgrade,
)
from agent_orchestrator.db.tables import Base

FOUNDATION_TABLES = {"sessions", "messages", "audit_entries"}


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path, make_settings: Callable[..., Settings]
) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        url = request.getfixturevalue("pg_empty_database")
    engine = create_engine(make_settings(database_url=url).resolved_database_url())
    try:
        yield engine
    finally:
        await engine.dispose()


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))


async def _downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(run)


async def _schema_drift(engine: AsyncEngine) -> list[object]:
    def compare(connection: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))

    async with engine.connect() as connection:
        return await connection.run_sync(compare)


async def test_upgrade_to_head_and_back_to_base(engine: AsyncEngine) -> None:
    assert await _tables(engine) == set()
    assert await current_revision(engine) is None
    assert not await is_up_to_date(engine)

    await upgrade(engine)
    tables = await _tables(engine)
    assert tables >= FOUNDATION_TABLES | {"alembic_version"}
    assert tables - {"alembic_version"} == set(Base.metadata.tables), "migrations == tables.py"
    assert await current_revision(engine) == head_revision()
    assert await is_up_to_date(engine)
    assert await _schema_drift(engine) == [], "columns, types and indexes match tables.py"

    await upgrade(engine)  # a second run is a no-op
    assert await is_up_to_date(engine)

    await _downgrade(engine)
    assert (await _tables(engine)) & FOUNDATION_TABLES == set()
    assert await _tables(engine) <= {"alembic_version"}
    assert await current_revision(engine) is None
    assert not await is_up_to_date(engine)

    await upgrade(engine)  # and the round trip is repeatable
    assert await _tables(engine) >= FOUNDATION_TABLES
    assert await is_up_to_date(engine)


async def test_foundation_revision_alone(engine: AsyncEngine) -> None:
    """The first revision creates exactly the foundation tables; later ones only add."""
    await upgrade(engine, "0001")
    assert await _tables(engine) - {"alembic_version"} == FOUNDATION_TABLES
    assert await current_revision(engine) == "0001"
    if head_revision() != "0001":
        assert not await is_up_to_date(engine)
    await _downgrade(engine)
    assert await _tables(engine) <= {"alembic_version"}
