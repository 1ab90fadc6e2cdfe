"""Fixtures on real services: PostgreSQL (a fresh database per test, cloned from a migrated
template), Redis (a fresh namespace per test) and SQLite files. Nothing is skipped when a
service is missing: the fixture fails and says which one."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.app import create_app
from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import create_engine, dispose_sessions, session_factory
from agent_orchestrator.db.migrate import upgrade
from agent_orchestrator.middleware.auth import TokenVerifier
from agent_orchestrator.models.principal import USER_SCOPES
from agent_orchestrator.state import build_verifier
from tests.doubles.process import running_double
from tests.processes import UNREACHED_RATE_LIMITS

PG_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TEMPLATE_DB = f"ao_template_{os.getpid()}"


def _pg_url_for(database: str) -> str:
    return PG_URL.rsplit("/", 1)[0] + "/" + database


async def _admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_URL)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is required at {PG_URL} ({exc}); .ci/run starts it")


def _run_in_thread(coroutine_function: Callable[[], Any]) -> None:
    # Session fixtures may first be requested from inside a running event loop.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coroutine_function()).result()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """One migrated database per test run; each test gets a copy (CREATE DATABASE TEMPLATE)."""

    async def create() -> None:
        admin = await _admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
            await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        finally:
            await admin.close()
        engine = create_engine(
            _pg_url_for(TEMPLATE_DB).replace("postgresql://", "postgresql+asyncpg://")
        )
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    async def drop() -> None:
        admin = await _admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
        finally:
            await admin.close()

    _run_in_thread(create)
    yield TEMPLATE_DB
    _run_in_thread(drop)


def _temporary_database(prefix: str, template: str | None = None) -> Iterator[str]:
    """Create a database (a copy of `template`, or empty), yield its URL, drop it."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""

    async def run(statement: str) -> None:
        admin = await _admin()
        try:
            await admin.execute(statement)
        finally:
            await admin.close()

    _run_in_thread(lambda: run(f'CREATE DATABASE "{name}"{clause}'))
    yield _pg_url_for(name)
    _run_in_thread(lambda: run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_database(pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database (a copy of the run's template)."""
    yield from _temporary_database("ao_test", pg_template)


@pytest.fixture
def pg_empty_database() -> Iterator[str]:
    """A fresh PostgreSQL database with no schema at all (for migration tests)."""
    yield from _temporary_database("ao_empty")


@pytest.fixture
def redis_namespace() -> Iterator[str]:
    namespace = f"aotest-{uuid.uuid4().hex[:10]}"

    async def check() -> None:
        client = Redis.from_url(REDIS_URL)
        try:
            await client.ping()
        except Exception as exc:
            pytest.fail(f"Redis is required at {REDIS_URL} ({exc}); .ci/run starts it")
        finally:
            await client.aclose()

    async def clean() -> None:
        client = Redis.from_url(REDIS_URL)
        try:
            # SAQ keeps jobs and abort marks under `saq:job:` / `saq:abort:` + queue name.
            for pattern in (
                f"{namespace}*",
                f"saq:{namespace}*",
                f"saq:job:{namespace}:*",
                f"saq:abort:{namespace}:*",
            ):
                keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
                if keys:
                    await client.delete(*keys)
        finally:
            await client.aclose()

    _run_in_thread(check)
    yield namespace
    _run_in_thread(clean)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


#: The credentials `make_settings` configures, and the ones `double_url` requires.
SERVICE_TOKEN = "test-service-token"
LLM_KEY = "test-llm-key"


@pytest.fixture(scope="module")
def double_url() -> Iterator[str]:
    """The downstream test double (its own process, one per test module), requiring the
    service token and the LLM key that settings from `make_settings` send."""
    with running_double(service_token=SERVICE_TOKEN, llm_api_key=LLM_KEY) as base_url:
        yield base_url


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "secret_key": "test-secret-key-0123456789abcdef0123456789",
            "service_token": SERVICE_TOKEN,
            "_env_file": None,
            **{name.lower(): int(value) for name, value in UNREACHED_RATE_LIMITS.items()},
        }
        values.update(overrides)
        return Settings(**values)

    return factory


@pytest.fixture
def make_backend_settings(
    backend: str, make_settings: Callable[..., Settings], request: pytest.FixtureRequest
) -> Callable[..., Settings]:
    """Like `make_settings`, on the test's backend: embedded (SQLite, in-process) or
    production-like (a fresh PostgreSQL database + a fresh Redis namespace)."""
    base: dict[str, Any] = {}
    if backend == "postgresql":
        base = {
            "database_url": request.getfixturevalue("pg_database"),
            "redis_uri": REDIS_URL,
            "redis_namespace": request.getfixturevalue("redis_namespace"),
        }

    def factory(**overrides: Any) -> Settings:
        return make_settings(**{**base, **overrides})

    return factory


@pytest.fixture
def settings(make_backend_settings: Callable[..., Settings]) -> Settings:
    """Embedded (SQLite, in-process) or production-like (PostgreSQL + Redis) settings."""
    return make_backend_settings()


@pytest.fixture
async def factory(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """The service's sessions on a migrated database of the test's backend."""
    engine = create_engine(settings.resolved_database_url())
    await upgrade(engine)
    made = session_factory(engine)
    try:
        yield made
    finally:
        dispose_sessions(made)
        await engine.dispose()


@asynccontextmanager
async def running_app(
    settings: Settings, *, run_worker: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan, served in-process; `run_worker=False` for the API
    process alone (nothing claims a task unless the test does)."""
    app = create_app(settings, run_worker=run_worker)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings) as http:
        yield http


TokenFactory = Callable[..., str]


def token_factory(verifier: TokenVerifier) -> TokenFactory:
    """Tokens signed by `verifier`: tenant-a / user-1 / every user scope / 600 s by default."""

    def issue(
        tenant: str = "tenant-a",
        user: str = "user-1",
        scopes: list[str] | None = None,
        ttl: int = 600,
    ) -> str:
        return verifier.issue(
            tenant_id=tenant,
            user_id=user,
            scopes=list(USER_SCOPES) if scopes is None else scopes,
            ttl_seconds=ttl,
            now=time.time(),
        )

    return issue


@pytest.fixture
def make_token(settings: Settings) -> TokenFactory:
    return token_factory(build_verifier(settings))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class TcpProxy:
    """A TCP relay to a real server that a test can cut (refuse new connections, drop the
    open ones) and restore: a dependency outage without mocks."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._links:
            writer.close()
        self._links.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def close(self) -> None:
        await self.cut()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._links |= {writer, upstream_writer}
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def redis_proxy() -> AsyncIterator[TcpProxy]:
    """A cuttable path to the test Redis; `redis_url(proxy)` is its REDIS_URI."""
    target = urlsplit(REDIS_URL)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    yield proxy
    await proxy.close()


def redis_url(proxy: TcpProxy) -> str:
    return f"redis://127.0.0.1:{proxy.port}{urlsplit(REDIS_URL).path}"


def clean_env(**variables: str) -> dict[str, str]:
    """An environment holding nothing of the caller's but PATH, unreached rate limits, plus
    `variables`."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        **UNREACHED_RATE_LIMITS,
        **variables,
    }


@pytest.fixture
def token(make_settings: Callable[..., Settings]) -> TokenFactory:
    """Tokens for embedded-only tests (`make_token` follows `backend`, so a test using it
    runs on both backends)."""
    return token_factory(build_verifier(make_settings()))
