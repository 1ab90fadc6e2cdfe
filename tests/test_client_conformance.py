"""Conformance of the downstream clients (docs/contracts/): one suite per client Protocol,
run against every implementation of it that exists.

- Local providers run on a migrated SQLite database (agent execution on the echo model,
  and on the OpenAI-compatible LLM client pointed at the double).
- HTTP clients run against the downstream double (tests/doubles/downstream.py), started
  once for this module as its own process, so hangs, cut streams and disconnects happen
  on real sockets.

Then what every HTTP client shares: the headers it sends, the mapping of failures onto
`DownstreamError` (codes, `retryable`, `Retry-After`), timeouts, unreachable services and
bodies that are not the contract's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from sqlalchemy import insert

from agent_orchestrator.clients.agent_execution import AgentExecutionClient
from agent_orchestrator.clients.agent_execution.http import HttpAgentExecutionClient
from agent_orchestrator.clients.agent_execution.local import LocalAgentExecution
from agent_orchestrator.clients.agent_management import AgentManagementClient
from agent_orchestrator.clients.agent_management.http import HttpAgentManagementClient
from agent_orchestrator.clients.agent_management.local import (
    LocalAgentManagement,
    load_agents_file,
)
from agent_orchestrator.clients.base import CallContext, DownstreamError, HttpServiceClient
from agent_orchestrator.clients.conversation import ConversationClient
from agent_orchestrator.clients.conversation.http import HttpConversationClient
from agent_orchestrator.clients.conversation.local import LocalConversation
from agent_orchestrator.clients.directory import HTTP_CLIENTS, build_directory
from agent_orchestrator.clients.embedding import EmbeddingClient
from agent_orchestrator.clients.embedding.http import HttpEmbeddingClient
from agent_orchestrator.clients.identity import IdentityClient
from agent_orchestrator.clients.ingestion import IngestionClient, IngestionJob
from agent_orchestrator.clients.llm import LLMProvider
from agent_orchestrator.clients.llm.echo import EchoModel
from agent_orchestrator.clients.llm.openai_compat import OpenAICompatibleLLM
from agent_orchestrator.clients.query import QueryClient
from agent_orchestrator.clients.tools import ToolsClient
from agent_orchestrator.clients.tools.http import HttpToolsClient
from agent_orchestrator.clients.workflow import WorkflowClient, WorkflowRun
from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import create_engine, dispose_sessions, session_factory
from agent_orchestrator.db.migrate import upgrade
from agent_orchestrator.db.tables import AgentRow, SessionRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.models.agent import (
    AgentConfig,
    ConversationMessage,
    ExecutionEvent,
    ReplyChunk,
    ReplyDone,
    Source,
)
from tests.doubles.process import free_port, running_double

pytestmark = pytest.mark.e2e  # starts the downstream double as a real process

SERVICE_TOKEN = "tok"
LLM_KEY = "llm-key"
TENANT = "acme"
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")

RESEARCHER: dict[str, Any] = {
    "id": "researcher",
    "name": "Researcher",
    "system_prompt": "Answer with citations.",
    "model": "gpt-4o-mini",
    "temperature": 0.2,
    "knowledge": {"collection_ids": ["handbook"], "top_k": 5},
    "tools": ["echo"],
    "requires": ["query"],
}


def ctx(tenant: str = TENANT, **fields: Any) -> CallContext:
    return CallContext(tenant_id=tenant, correlation_id=f"corr-{uuid.uuid4().hex[:8]}", **fields)


# ---------------------------------------------------------------------------------------
# The double (one process for the module) and a migrated SQLite database (per test)


@dataclass
class Double:
    url: str
    control: httpx.Client

    def fault(self, service: str, **spec: Any) -> None:
        self.control.post("/_control/faults", json={"service": service, **spec}).raise_for_status()

    def requests(self, service: str) -> list[dict[str, Any]]:
        answer = self.control.get("/_control/requests", params={"service": service})
        answer.raise_for_status()
        return list(answer.json()["requests"])

    def streams(self, service: str) -> dict[str, Any]:
        answer = self.control.get("/_control/streams", params={"service": service})
        answer.raise_for_status()
        return dict(answer.json())


@pytest.fixture(scope="module")
def double_url() -> Iterator[str]:
    with running_double(service_token=SERVICE_TOKEN, llm_api_key=LLM_KEY) as base_url:
        yield base_url


@pytest.fixture
def double(double_url: str) -> Iterator[Double]:
    with httpx.Client(base_url=double_url, timeout=5) as control:
        control.post("/_control/reset").raise_for_status()
        yield Double(double_url, control)


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrated once; each test gets a copy of the file."""
    path = tmp_path_factory.mktemp("conformance") / "template.db"

    async def migrate() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{path}")
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    # May first be requested from inside a running event loop (getfixturevalue).
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, migrate()).result()
    return path


@pytest.fixture
async def sqlite_factory(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[Any]:
    path = tmp_path / "orchestrator.db"
    shutil.copyfile(sqlite_template, path)
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    factory = session_factory(engine)
    try:
        yield factory
    finally:
        dispose_sessions(factory)
        await engine.dispose()


async def drain(
    events: AsyncIterator[ExecutionEvent],
) -> tuple[list[ExecutionEvent], DownstreamError | None]:
    """Every event of a stream, and the error that ended it, if one did."""
    received: list[ExecutionEvent] = []
    try:
        async for event in events:
            received.append(event)
    except DownstreamError as error:
        return received, error
    return received, None


def assert_complete(events: list[ExecutionEvent], message: str) -> str:
    """Chunks in index order, then exactly one ReplyDone, last; returns the reply."""
    assert events, "no events"
    *chunks, done = events
    assert isinstance(done, ReplyDone)
    assert chunks
    assert all(isinstance(c, ReplyChunk) for c in chunks)
    assert [c.index for c in chunks if isinstance(c, ReplyChunk)] == list(range(len(chunks)))
    reply = "".join(c.content for c in chunks if isinstance(c, ReplyChunk))
    assert message in reply
    return reply


# ---------------------------------------------------------------------------------------
# Conversation: local provider and HTTP client


@dataclass
class ConversationImpl:
    client: ConversationClient
    #: A session the implementation can write to (the local one stores only the
    #: orchestrator's own sessions; the service creates them on the first message).
    new_session: Callable[[str], Awaitable[str]]


@pytest.fixture(params=["local", "http"])
async def conversation(
    request: pytest.FixtureRequest, sqlite_factory: Any
) -> AsyncIterator[ConversationImpl]:
    if request.param == "local":
        factory = sqlite_factory

        async def new_local_session(tenant: str) -> str:
            return await local_session(factory, tenant)

        yield ConversationImpl(LocalConversation(factory), new_local_session)
        return

    double: Double = request.getfixturevalue("double")

    async def new_remote_session(tenant: str) -> str:
        return str(uuid.uuid4())

    client = HttpConversationClient(double.url, SERVICE_TOKEN)
    try:
        yield ConversationImpl(client, new_remote_session)
    finally:
        await client.aclose()


async def local_session(factory: Any, tenant: str) -> str:
    """A session row of our own database: the local provider writes only to those."""
    now = utcnow()
    session_id = uuid.uuid4()
    async with factory() as db:
        db.add(
            SessionRow(
                id=session_id,
                tenant_id=tenant,
                user_id="user-1",
                agent_id=None,
                state="active",
                metadata_={},
                created_at=now,
                last_activity_at=now,
                expires_at=now + timedelta(hours=1),
                closed_at=None,
            )
        )
        await db.commit()
    return str(session_id)


async def save(
    impl: ConversationImpl, session_id: str, role: str, content: str, message_id: str | None = None
) -> str:
    message_id = message_id or str(uuid.uuid4())
    await impl.client.save_message(
        ctx(),
        session_id=session_id,
        message_id=message_id,
        role=role,
        content=content,
        task_id=None,
        metadata={"source": "test"},
    )
    return message_id


class TestConversationConformance:
    async def test_history_is_oldest_first_and_limited(
        self, conversation: ConversationImpl
    ) -> None:
        session = await conversation.new_session(TENANT)
        ids = [
            await save(conversation, session, "user", "one"),
            await save(conversation, session, "assistant", "two"),
            await save(conversation, session, "user", "three"),
        ]
        history = await conversation.client.get_history(ctx(), session_id=session, limit=50)
        assert all(isinstance(m, ConversationMessage) for m in history)
        assert [(m.id, m.role, m.content) for m in history] == [
            (ids[0], "user", "one"),
            (ids[1], "assistant", "two"),
            (ids[2], "user", "three"),
        ]
        latest = await conversation.client.get_history(ctx(), session_id=session, limit=2)
        assert [m.content for m in latest] == ["two", "three"]

    async def test_save_is_idempotent_on_id(self, conversation: ConversationImpl) -> None:
        session = await conversation.new_session(TENANT)
        message_id = await save(conversation, session, "assistant", "first")
        await save(conversation, session, "assistant", "second", message_id=message_id)
        history = await conversation.client.get_history(ctx(), session_id=session, limit=50)
        assert [(m.id, m.content) for m in history] == [(message_id, "first")]

    async def test_unwritten_session_and_other_tenant_are_empty(
        self, conversation: ConversationImpl
    ) -> None:
        empty = await conversation.new_session(TENANT)
        assert await conversation.client.get_history(ctx(), session_id=empty, limit=10) == []
        session = await conversation.new_session(TENANT)
        await save(conversation, session, "user", "mine")
        other = await conversation.client.get_history(ctx("globex"), session_id=session, limit=10)
        assert other == []

    async def test_unknown_role_is_a_validation_error(self, conversation: ConversationImpl) -> None:
        session = await conversation.new_session(TENANT)
        with pytest.raises(DownstreamError) as caught:
            await save(conversation, session, "narrator", "once upon a time")
        assert caught.value.code == "validation_error"
        assert caught.value.retryable is False


class TestLocalConversation:
    """What only the local provider does (its sessions are the orchestrator's own)."""

    async def test_history_leaves_out_the_turn_being_answered(self, sqlite_factory: Any) -> None:
        impl = ConversationImpl(LocalConversation(sqlite_factory), _no_sessions)
        session = await local_session(sqlite_factory, TENANT)
        await save(impl, session, "user", "earlier")
        task_id = str(uuid.uuid4())
        await impl.client.save_message(
            ctx(),
            session_id=session,
            message_id=str(uuid.uuid4()),
            role="user",
            content="now",
            task_id=task_id,
            metadata={},
        )
        answering = await impl.client.get_history(ctx(task_id=task_id), session_id=session, limit=9)
        assert [m.content for m in answering] == ["earlier"]

    async def test_unknown_session_and_bad_ids(self, sqlite_factory: Any) -> None:
        impl = ConversationImpl(LocalConversation(sqlite_factory), _no_sessions)
        with pytest.raises(DownstreamError) as caught:
            await save(impl, str(uuid.uuid4()), "user", "hello")
        assert (caught.value.code, caught.value.retryable) == ("not_found", False)
        with pytest.raises(DownstreamError) as caught:
            await save(impl, "not-a-uuid", "user", "hello")
        assert (caught.value.code, caught.value.retryable) == ("validation_error", False)
        history = await impl.client.get_history(ctx(), session_id="not-a-uuid", limit=5)
        assert history == []


async def _no_sessions(tenant: str) -> str:
    raise AssertionError("these tests make their sessions themselves")


# ---------------------------------------------------------------------------------------
# Agent management: local provider (database, AGENTS_FILE, default) and HTTP client


@pytest.fixture(params=["local", "http"])
async def agents(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_factory: Any
) -> AsyncIterator[AgentManagementClient]:
    if request.param == "local":
        agents_file = tmp_path / "agents.yaml"
        agents_file.write_text(
            "agents:\n"
            "  - id: researcher\n"
            "    name: Researcher\n"
            "    system_prompt: Answer with citations.\n"
            "    model: gpt-4o-mini\n"
            "    temperature: 0.2\n"
            "    knowledge: {collection_ids: [handbook], top_k: 5}\n"
            "    tools: [echo]\n"
            "    requires: [query]\n"
        )
        yield LocalAgentManagement(sqlite_factory, load_agents_file(agents_file))
        return
    double: Double = request.getfixturevalue("double")
    double.control.post("/_control/agents", json=RESEARCHER).raise_for_status()
    client = HttpAgentManagementClient(double.url, SERVICE_TOKEN)
    try:
        yield client
    finally:
        await client.aclose()


class TestAgentManagementConformance:
    async def test_default_agent(self, agents: AgentManagementClient) -> None:
        agent = await agents.get_agent(ctx(), agent_id="default")
        assert agent == AgentConfig(
            id="default", name="Default agent", system_prompt="You are a helpful assistant."
        )

    async def test_declared_agent(self, agents: AgentManagementClient) -> None:
        agent = await agents.get_agent(ctx(), agent_id="researcher")
        assert agent == AgentConfig.model_validate(RESEARCHER)
        assert agent.knowledge is not None
        assert agent.knowledge.collection_ids == ["handbook"]

    async def test_unknown_agent_is_not_found(self, agents: AgentManagementClient) -> None:
        with pytest.raises(DownstreamError) as caught:
            await agents.get_agent(ctx(), agent_id="nobody")
        assert caught.value.code == "not_found"
        assert caught.value.retryable is False


async def test_an_agent_stored_in_the_database_wins_over_the_declared_one(
    sqlite_factory: Any, tmp_path: Path
) -> None:
    """The local provider reads the tenant's row first: its JSON config comes back as the
    agent (through embedded mode's prepared statement), for that tenant only."""
    agents_file = tmp_path / "agents.yaml"
    agents_file.write_text("agents:\n  - id: researcher\n    name: Declared\n")
    stored = {"name": "Stored researcher", "system_prompt": "Cite.", "temperature": 0.1}
    async with sqlite_factory() as db:
        await db.execute(
            insert(AgentRow.__table__),
            {
                "tenant_id": ctx().tenant_id,
                "id": "researcher",
                "config": stored,
                "created_at": utcnow(),
                "updated_at": utcnow(),
            },
        )
        await db.commit()
    local = LocalAgentManagement(sqlite_factory, load_agents_file(agents_file))
    agent = await local.get_agent(ctx(), agent_id="researcher")
    assert agent == AgentConfig.model_validate({**stored, "id": "researcher"})
    other_tenant = await local.get_agent(ctx(tenant="tenant-b"), agent_id="researcher")
    assert other_tenant.name == "Declared"


def test_broken_agents_file_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "agents.yaml"
    broken.write_text("agents: {id: not-a-list}\n")
    with pytest.raises(ValueError, match=r"agents\.yaml"):
        load_agents_file(broken)


# ---------------------------------------------------------------------------------------
# Agent execution: local on the echo model, local on the OpenAI-compatible LLM, HTTP


@dataclass
class ExecutionImpl:
    client: AgentExecutionClient
    #: The double's service whose faults reach this implementation (None: not the double).
    fault_service: str | None
    cut_code: str
    closeable: Any = None


def _execution(kind: str, request: pytest.FixtureRequest) -> ExecutionImpl:
    if kind == "local-echo":
        return ExecutionImpl(LocalAgentExecution(EchoModel()), None, "")
    double: Double = request.getfixturevalue("double")
    if kind == "local-llm":
        llm = OpenAICompatibleLLM(f"{double.url}/v1", api_key=LLM_KEY, default_model="m")
        return ExecutionImpl(LocalAgentExecution(llm), "llm", "llm_stream_cut", llm)
    client = HttpAgentExecutionClient(double.url, SERVICE_TOKEN)
    return ExecutionImpl(client, "agent_execution", "stream_cut", client)


@pytest.fixture(params=["local-echo", "local-llm", "http"])
async def execution(request: pytest.FixtureRequest) -> AsyncIterator[ExecutionImpl]:
    impl = _execution(request.param, request)
    yield impl
    if impl.closeable is not None:
        await impl.closeable.aclose()


@pytest.fixture(params=["local-llm", "http"])
async def remote_execution(request: pytest.FixtureRequest) -> AsyncIterator[ExecutionImpl]:
    """The implementations whose stream comes over a socket from the double."""
    impl = _execution(request.param, request)
    yield impl
    await impl.closeable.aclose()


DEFAULT_AGENT = AgentConfig(id="default", name="Default agent", system_prompt="Be brief.")
HISTORY = [
    ConversationMessage(role="user", content="earlier question"),
    ConversationMessage(role="assistant", content="earlier answer"),
]


def execute(impl: ExecutionImpl, message: str) -> AsyncIterator[ExecutionEvent]:
    return impl.client.execute(
        ctx(),
        agent=DEFAULT_AGENT,
        history=HISTORY,
        message=message,
        sources=[Source(title="Refunds", snippet="Refunds take 5 days.", score=0.9)],
    )


class TestAgentExecutionConformance:
    async def test_streams_chunks_then_one_done(self, execution: ExecutionImpl) -> None:
        events, error = await drain(execute(execution, "how do refunds work"))
        assert error is None
        assert_complete(events, "how do refunds work")

    async def test_without_history_or_sources(self, execution: ExecutionImpl) -> None:
        events, error = await drain(
            execution.client.execute(
                ctx(), agent=DEFAULT_AGENT, history=None, message="hello there", sources=None
            )
        )
        assert error is None
        assert_complete(events, "hello there")

    async def test_cut_stream(self, remote_execution: ExecutionImpl, double: Double) -> None:
        assert remote_execution.fault_service is not None
        double.fault(remote_execution.fault_service, cut_after_chunks=2)
        events, error = await drain(execute(remote_execution, "one two three four five"))
        assert error is not None
        assert (error.code, error.retryable) == (remote_execution.cut_code, True)
        assert not any(isinstance(e, ReplyDone) for e in events)
        assert len(events) == 2

    async def test_error_event_ends_the_stream_with_its_code(
        self, remote_execution: ExecutionImpl, double: Double
    ) -> None:
        assert remote_execution.fault_service is not None
        double.fault(remote_execution.fault_service, error_after_chunks=1, status=503)
        events, error = await drain(execute(remote_execution, "one two three"))
        assert error is not None
        expected = "llm_error" if remote_execution.fault_service == "llm" else "service_unavailable"
        assert (error.code, error.retryable) == (expected, True)
        assert [type(e) for e in events] == [ReplyChunk]

    async def test_closing_early_disconnects(
        self, remote_execution: ExecutionImpl, double: Double
    ) -> None:
        service = remote_execution.fault_service
        assert service is not None
        double.fault(service, chunk_delay_ms=300)
        events = execute(remote_execution, "a long answer with many words in it")
        async for event in events:
            assert isinstance(event, ReplyChunk)
            break
        await events.aclose()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 1.0
        report = double.streams(service)
        while report["client_disconnected"] < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            report = double.streams(service)
        assert report["client_disconnected"] == 1, report
        assert report["active"] == 0


async def test_http_execution_sends_the_contract_body(double: Double) -> None:
    client = HttpAgentExecutionClient(double.url, SERVICE_TOKEN)
    try:
        events, error = await drain(
            execute(ExecutionImpl(client, "agent_execution", "stream_cut"), "new message")
        )
    finally:
        await client.aclose()
    assert error is None
    assert_complete(events, "new message")
    body = double.requests("agent_execution")[-1]["json"]
    assert body["stream"] is True
    assert body["agent"] == DEFAULT_AGENT.model_dump()
    assert body["messages"] == [
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "new message"},
    ]
    assert body["context"]["sources"][0]["title"] == "Refunds"


# ---------------------------------------------------------------------------------------
# LLM providers: the echo model and any OpenAI-compatible endpoint


@pytest.fixture(params=["echo", "openai-compatible"])
async def llm(request: pytest.FixtureRequest) -> AsyncIterator[LLMProvider]:
    if request.param == "echo":
        provider: LLMProvider = EchoModel()
    else:
        double: Double = request.getfixturevalue("double")
        provider = OpenAICompatibleLLM(f"{double.url}/v1", api_key=LLM_KEY, default_model="m")
    try:
        yield provider
    finally:
        await provider.aclose()


PROMPT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "what is the capital of France"},
]


class TestLLMConformance:
    async def test_streams_chunks_then_one_done(self, llm: LLMProvider) -> None:
        events, error = await drain(llm.stream(PROMPT, model="chosen", temperature=0.2))
        assert error is None
        reply = assert_complete(events, "what is the capital of France")
        done = events[-1]
        assert isinstance(done, ReplyDone)
        assert done.finish_reason == "stop"
        assert done.usage.completion_tokens == len(events) - 1
        if llm.name == "echo":
            assert "echo model" in reply
            assert done.model == "echo"
        else:
            assert done.model == "chosen"


async def test_echo_model_says_what_it_is() -> None:
    events, _ = await drain(EchoModel().stream(PROMPT, model=None, temperature=None))
    text = "".join(e.content for e in events if isinstance(e, ReplyChunk))
    assert "[echo model]" in text
    assert "LLM_BASE_URL" in text


async def test_openai_compatible_request(double: Double) -> None:
    llm = OpenAICompatibleLLM(f"{double.url}/v1", api_key=LLM_KEY, default_model="default-m")
    try:
        _, error = await drain(llm.stream(PROMPT, model=None, temperature=0.3))
    finally:
        await llm.aclose()
    assert error is None
    recorded = double.requests("llm")[-1]
    assert recorded["path"] == "/v1/chat/completions"
    assert recorded["headers"]["authorization"] == f"Bearer {LLM_KEY}"
    assert "x-tenant-id" not in recorded["headers"]
    assert recorded["json"]["model"] == "default-m"
    assert recorded["json"]["stream"] is True
    assert recorded["json"]["stream_options"] == {"include_usage": True}
    assert recorded["json"]["temperature"] == 0.3
    assert recorded["json"]["messages"] == PROMPT


LLM_FAULTS = [
    pytest.param({"status": 500}, "llm_unavailable", True, None, id="500"),
    pytest.param({"status": 503}, "llm_unavailable", True, None, id="503"),
    pytest.param({"status": 429, "retry_after": 2}, "llm_rate_limited", True, 2.0, id="429"),
    pytest.param({"status": 404}, "llm_model_not_found", False, None, id="404"),
]


@pytest.mark.parametrize(("spec", "code", "retryable", "retry_after"), LLM_FAULTS)
async def test_llm_error_mapping(
    double: Double, spec: dict[str, Any], code: str, retryable: bool, retry_after: float | None
) -> None:
    double.fault("llm", **spec)
    llm = OpenAICompatibleLLM(f"{double.url}/v1", api_key=LLM_KEY, default_model="m")
    try:
        events, error = await drain(llm.stream(PROMPT, model=None, temperature=None))
    finally:
        await llm.aclose()
    assert events == []
    assert error is not None
    assert (error.code, error.retryable, error.retry_after) == (code, retryable, retry_after)
    assert error.status == spec["status"]


async def test_llm_wrong_key_is_unauthorized(double: Double) -> None:
    llm = OpenAICompatibleLLM(f"{double.url}/v1", api_key="wrong", default_model="m")
    try:
        _, error = await drain(llm.stream(PROMPT, model=None, temperature=None))
    finally:
        await llm.aclose()
    assert error is not None
    assert (error.code, error.retryable, error.status) == ("llm_unauthorized", False, 401)


async def test_llm_hang_times_out(double: Double) -> None:
    double.fault("llm", hang=True)
    llm = OpenAICompatibleLLM(f"{double.url}/v1", api_key=LLM_KEY, default_model="m", timeout=0.5)
    started = time.monotonic()
    try:
        _, error = await drain(llm.stream(PROMPT, model=None, temperature=None))
    finally:
        await llm.aclose()
    assert error is not None
    assert (error.code, error.retryable) == ("llm_timeout", True)
    assert time.monotonic() - started < 3


async def test_llm_unreachable() -> None:
    llm = OpenAICompatibleLLM(f"http://127.0.0.1:{free_port()}/v1", api_key=None, default_model="m")
    try:
        _, error = await drain(llm.stream(PROMPT, model=None, temperature=None))
    finally:
        await llm.aclose()
    assert error is not None
    assert (error.code, error.retryable) == ("llm_unreachable", True)


# ---------------------------------------------------------------------------------------
# Query, embedding, ingestion, workflow, tools, identity: the HTTP clients (no local
# provider exists; a new implementation joins a suite by joining its fixture's params)


def _http_only(service: str) -> Any:
    """The `service` fixture of a suite whose only implementation is the HTTP client."""

    @pytest.fixture(params=["http"], name=service)
    async def implementation(double: Double) -> AsyncIterator[Any]:
        client = http_client(service, double.url)
        try:
            yield client
        finally:
            await client.aclose()

    return implementation


query = _http_only("query")
embedding = _http_only("embedding")
ingestion = _http_only("ingestion")
workflow = _http_only("workflow")
tools = _http_only("tools")
identity = _http_only("identity")


class TestQueryConformance:
    async def test_results_best_first(self, query: QueryClient) -> None:
        results = await query.search(
            ctx(), query="refunds", collection_ids=["handbook", "faq"], top_k=3
        )
        assert len(results) == 3
        assert all(isinstance(r, Source) for r in results)
        scores = [r.score or 0.0 for r in results]
        assert scores == sorted(scores, reverse=True)
        assert "refunds" in results[0].snippet

    async def test_no_match_is_empty(self, query: QueryClient) -> None:
        assert await query.search(ctx(), query="refunds", collection_ids=[], top_k=3) == []


class TestEmbeddingConformance:
    async def test_one_vector_per_text_in_order(self, embedding: EmbeddingClient) -> None:
        vectors = await embedding.embed(ctx(), texts=["alpha", "beta", "alpha"])
        assert len(vectors) == 3
        assert len({len(v) for v in vectors}) == 1
        assert all(isinstance(x, float) for v in vectors for x in v)
        assert vectors[0] == vectors[2]
        assert vectors[0] != vectors[1]


async def _until_final(
    read: Callable[[], Awaitable[IngestionJob | WorkflowRun]],
) -> list[IngestionJob | WorkflowRun]:
    seen = []
    for _ in range(10):
        seen.append(await read())
        if seen[-1].final:
            break
    return seen


class TestIngestionConformance:
    async def test_job_runs_to_success(self, ingestion: IngestionClient) -> None:
        job = await ingestion.ingest(
            ctx(), documents=[{"id": "doc-1", "content": "text", "metadata": {"source": "t"}}]
        )
        assert job.status in ("queued", "running")
        seen = await _until_final(lambda: ingestion.status(ctx(), job_id=job.job_id))
        assert seen[-1].status == "succeeded"
        assert all(s.status in ("queued", "running") for s in seen[:-1])

    async def test_failed_job_carries_its_error(self, ingestion: IngestionClient) -> None:
        job = await ingestion.ingest(
            ctx(), documents=[{"id": "d", "content": "x", "metadata": {"double_fail": True}}]
        )
        final = (await _until_final(lambda: ingestion.status(ctx(), job_id=job.job_id)))[-1]
        assert final.status == "failed"
        assert isinstance(final, IngestionJob)
        assert final.error is not None
        assert final.error.code

    async def test_idempotency_key_returns_the_original_job(
        self, ingestion: IngestionClient, double: Double
    ) -> None:
        documents = [{"id": "doc-1", "content": "text"}]
        first = await ingestion.ingest(ctx(), documents=documents, idempotency_key="key-1")
        again = await ingestion.ingest(ctx(), documents=documents, idempotency_key="key-1")
        other = await ingestion.ingest(ctx(), documents=documents)
        assert first.job_id == again.job_id != other.job_id
        sent = [r["headers"].get("idempotency-key") for r in double.requests("ingestion")]
        assert sent == ["key-1", "key-1", None]

    async def test_unknown_job_and_other_tenant(self, ingestion: IngestionClient) -> None:
        job = await ingestion.ingest(ctx(), documents=[{"id": "doc-1", "content": "text"}])
        for tenant, job_id in ((TENANT, "job-nope"), ("globex", job.job_id)):
            with pytest.raises(DownstreamError) as caught:
                await ingestion.status(ctx(tenant), job_id=job_id)
            assert (caught.value.code, caught.value.retryable) == ("not_found", False)

    async def test_invalid_documents_are_refused_before_sending(
        self, ingestion: IngestionClient, double: Double
    ) -> None:
        for documents in ([], [{"content": "no id"}]):
            with pytest.raises(DownstreamError) as caught:
                await ingestion.ingest(ctx(), documents=documents)
            assert (caught.value.code, caught.value.retryable) == ("validation_error", False)
        assert double.requests("ingestion") == []


class TestWorkflowConformance:
    async def test_run_to_success_with_output(self, workflow: WorkflowClient) -> None:
        run = await workflow.start(ctx(), workflow_id="index-docs", input={"document_ids": ["d"]})
        assert run.status in ("queued", "running")
        assert run.output is None
        seen = await _until_final(lambda: workflow.status(ctx(), run_id=run.run_id))
        final = seen[-1]
        assert isinstance(final, WorkflowRun)
        assert final.status == "succeeded"
        assert final.output == {"workflow_id": "index-docs", "input": {"document_ids": ["d"]}}

    async def test_failed_run(self, workflow: WorkflowClient) -> None:
        run = await workflow.start(ctx(), workflow_id="w", input={"double_fail": True})
        final = (await _until_final(lambda: workflow.status(ctx(), run_id=run.run_id)))[-1]
        assert final.status == "failed"
        assert isinstance(final, WorkflowRun)
        assert final.output is None
        assert final.error is not None

    async def test_idempotency_key_returns_the_original_run(
        self, workflow: WorkflowClient, double: Double
    ) -> None:
        first = await workflow.start(ctx(), workflow_id="w", input={}, idempotency_key="k")
        again = await workflow.start(ctx(), workflow_id="w", input={}, idempotency_key="k")
        assert first.run_id == again.run_id
        assert [r["headers"].get("idempotency-key") for r in double.requests("workflow")] == [
            "k",
            "k",
        ]

    async def test_unknown_run(self, workflow: WorkflowClient) -> None:
        with pytest.raises(DownstreamError) as caught:
            await workflow.status(ctx(), run_id="run-nope")
        assert (caught.value.code, caught.value.retryable) == ("not_found", False)


class TestToolsConformance:
    async def test_list(self, tools: ToolsClient) -> None:
        listed = {tool.id: tool for tool in await tools.list(ctx())}
        assert {"add", "echo"} <= set(listed)
        assert listed["add"].parameters["required"] == ["a", "b"]
        assert listed["add"].description

    async def test_invoke(self, tools: ToolsClient) -> None:
        assert await tools.invoke(ctx(), tool_id="add", arguments={"a": 2, "b": 3}) == 5
        assert await tools.invoke(ctx(), tool_id="echo", arguments={"x": [1]}) == {"x": [1]}

    @pytest.mark.parametrize(
        ("tool_id", "arguments", "code"),
        [("nope", {}, "not_found"), ("add", {"a": "two"}, "validation_error")],
    )
    async def test_invoke_errors(
        self, tools: ToolsClient, tool_id: str, arguments: dict[str, Any], code: str
    ) -> None:
        with pytest.raises(DownstreamError) as caught:
            await tools.invoke(ctx(), tool_id=tool_id, arguments=arguments)
        assert (caught.value.code, caught.value.retryable) == (code, False)


class TestIdentityConformance:
    async def test_active_token(self, identity: IdentityClient) -> None:
        info = await identity.introspect(ctx(), token="tok:acme:alice:chat.write,tasks.read")
        assert info.active is True
        assert (info.sub, info.tenant_id) == ("alice", "acme")
        assert info.scopes == ["chat.write", "tasks.read"]
        assert isinstance(info.exp, int)

    async def test_inactive_token_is_an_answer(self, identity: IdentityClient) -> None:
        info = await identity.introspect(ctx(), token="garbage")
        assert (info.active, info.sub, info.tenant_id, info.scopes, info.exp) == (
            False,
            None,
            None,
            [],
            None,
        )


# ---------------------------------------------------------------------------------------
# What every HTTP client shares: headers, failure mapping, timeouts, unreachable service,
# bodies that are not the contract's shape


@dataclass(frozen=True)
class Operation:
    service: str
    name: str
    call: Callable[[Any, CallContext], Awaitable[Any]]

    def __str__(self) -> str:
        return f"{self.service}.{self.name}"


async def _stream(client: HttpAgentExecutionClient, context: CallContext) -> None:
    events, error = await drain(
        client.execute(context, agent=DEFAULT_AGENT, history=None, message="hi", sources=None)
    )
    if error is not None:
        raise error
    assert isinstance(events[-1], ReplyDone)


OPERATIONS = [
    Operation(
        "conversation",
        "get_history",
        lambda c, x: c.get_history(x, session_id="s-1", limit=5),
    ),
    Operation(
        "conversation",
        "save_message",
        lambda c, x: c.save_message(
            x,
            session_id="s-1",
            message_id="m-1",
            role="user",
            content="hi",
            task_id=None,
            metadata={},
        ),
    ),
    Operation("agent_management", "get_agent", lambda c, x: c.get_agent(x, agent_id="default")),
    Operation("agent_execution", "execute", _stream),
    Operation(
        "query", "search", lambda c, x: c.search(x, query="q", collection_ids=["a"], top_k=2)
    ),
    Operation("embedding", "embed", lambda c, x: c.embed(x, texts=["a", "b"])),
    Operation(
        "ingestion",
        "ingest",
        lambda c, x: c.ingest(x, documents=[{"id": "d", "content": "c"}], idempotency_key="k"),
    ),
    Operation("ingestion", "status", lambda c, x: c.status(x, job_id="job-1")),
    Operation("workflow", "start", lambda c, x: c.start(x, workflow_id="w", input={})),
    Operation("workflow", "status", lambda c, x: c.status(x, run_id="run-1")),
    Operation("tools", "list", lambda c, x: c.list(x)),
    Operation("tools", "invoke", lambda c, x: c.invoke(x, tool_id="echo", arguments={})),
    Operation("identity", "introspect", lambda c, x: c.introspect(x, token="tok:a:b")),
]
FIRST_OPERATIONS = list({op.service: op for op in reversed(OPERATIONS)}.values())


def http_client(service: str, url: str, token: str | None = SERVICE_TOKEN, **kw: Any) -> Any:
    _, client_type = HTTP_CLIENTS[service]
    return client_type(url, token, **kw)


async def failure(client: Any, operation: Operation, context: CallContext | None = None) -> Any:
    """The DownstreamError `operation` fails with on `client` (which is closed after)."""
    try:
        with pytest.raises(DownstreamError) as caught:
            await operation.call(client, context or ctx())
    finally:
        await client.aclose()
    return caught.value


def test_every_http_client_is_registered_and_covered() -> None:
    expected = {
        "conversation",
        "agent_management",
        "agent_execution",
        "query",
        "embedding",
        "ingestion",
        "workflow",
        "tools",
        "identity",
    }
    assert set(HTTP_CLIENTS) == expected
    assert {op.service for op in OPERATIONS} == expected
    assert all(issubclass(t, HttpServiceClient) for _, t in HTTP_CLIENTS.values())
    assert all(t.service == name for name, (_, t) in HTTP_CLIENTS.items())


async def test_directory_uses_a_configured_url(
    make_settings: Callable[..., Settings], sqlite_factory: Any
) -> None:
    url = "http://downstream.invalid:9000"
    services, closeable = build_directory(
        make_settings(embedding_service_url=url, tool_registry_url=url), sqlite_factory
    )
    try:
        assert isinstance(services["embedding"], HttpEmbeddingClient)
        assert isinstance(services["tools"], HttpToolsClient)
        for absent in ("query", "ingestion", "workflow", "identity"):
            assert services[absent] is None
        assert isinstance(services["conversation"], LocalConversation)
    finally:
        for item in closeable:
            await item.aclose()


@pytest.mark.parametrize("operation", OPERATIONS, ids=str)
async def test_headers(double: Double, operation: Operation) -> None:
    client = http_client(operation.service, double.url)
    context = ctx()
    try:
        # The status of an unknown job or run answers 404; the request was sent all the same.
        with contextlib.suppress(DownstreamError):
            await operation.call(client, context)
    finally:
        await client.aclose()
    recorded = double.requests(operation.service)
    assert len(recorded) == 1
    headers = recorded[0]["headers"]
    assert headers["authorization"] == f"Bearer {SERVICE_TOKEN}"
    assert headers["x-tenant-id"] == TENANT
    assert headers["x-correlation-id"] == context.correlation_id
    assert TRACEPARENT.match(headers["traceparent"])
    assert headers["traceparent"] == context.traceparent


STATUS_FAULTS = [
    pytest.param({"status": 500}, "internal_error", True, None, id="500"),
    pytest.param({"status": 503}, "service_unavailable", True, None, id="503"),
    pytest.param({"status": 429, "retry_after": 2}, "rate_limited", True, 2.0, id="429"),
    pytest.param({"status": 404}, "not_found", False, None, id="404"),
    pytest.param({"status": 401}, "unauthorized", False, None, id="401"),
    pytest.param({"status": 422}, "validation_error", False, None, id="422"),
]


@pytest.mark.parametrize(("spec", "code", "retryable", "retry_after"), STATUS_FAULTS)
@pytest.mark.parametrize("operation", OPERATIONS, ids=str)
async def test_status_mapping(
    double: Double,
    operation: Operation,
    spec: dict[str, Any],
    code: str,
    retryable: bool,
    retry_after: float | None,
) -> None:
    double.fault(operation.service, **spec)
    error = await failure(http_client(operation.service, double.url), operation)
    assert error.service == operation.service
    assert (error.code, error.retryable, error.status) == (code, retryable, spec["status"])
    assert error.retry_after == retry_after


@pytest.mark.parametrize("operation", FIRST_OPERATIONS, ids=str)
async def test_wrong_service_token_is_unauthorized(double: Double, operation: Operation) -> None:
    error = await failure(http_client(operation.service, double.url, token="wrong"), operation)
    assert (error.code, error.retryable, error.status) == ("unauthorized", False, 401)


@pytest.mark.parametrize("operation", FIRST_OPERATIONS, ids=str)
async def test_hang_times_out(double: Double, operation: Operation) -> None:
    double.fault(operation.service, hang=True)
    client = http_client(operation.service, double.url, timeout=0.5)
    started = time.monotonic()
    error = await failure(client, operation)
    assert (error.code, error.retryable) == ("timeout", True)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("operation", FIRST_OPERATIONS, ids=str)
async def test_unreachable_is_retryable(operation: Operation) -> None:
    error = await failure(
        http_client(operation.service, f"http://127.0.0.1:{free_port()}"), operation
    )
    assert (error.code, error.retryable) == ("unreachable", True)


@pytest.mark.parametrize("operation", FIRST_OPERATIONS, ids=str)
async def test_unsendable_header_is_invalid_request(double: Double, operation: Operation) -> None:
    # Streamed or not, a call that cannot be sent fails in the one error shape.
    unsendable = CallContext(tenant_id=TENANT, correlation_id="a\x01b")
    error = await failure(http_client(operation.service, double.url), operation, unsendable)
    assert (error.code, error.retryable) == ("invalid_request", False)
    assert double.requests(operation.service) == []


async def test_llm_unsendable_body_is_invalid_request(double: Double) -> None:
    llm = OpenAICompatibleLLM(f"{double.url}/v1", api_key=LLM_KEY, default_model="m")
    try:
        _, error = await drain(llm.stream(PROMPT, model=None, temperature=float("nan")))
    finally:
        await llm.aclose()
    assert error is not None
    assert (error.code, error.retryable) == ("invalid_request", False)
    assert double.requests("llm") == []


@contextlib.asynccontextmanager
async def _answering(status: int, body: bytes, content_type: str) -> AsyncIterator[str]:
    """A local server answering every request with this response; yields its URL."""

    async def answer(request: web.BaseRequest) -> web.Response:
        return web.Response(status=status, body=body, content_type=content_type)

    server = RawTestServer(answer)
    await server.start_server()
    try:
        yield str(server.make_url("/")).rstrip("/")
    finally:
        await server.close()


INVALID_BODIES = [
    pytest.param(b'{"unexpected": true}', id="wrong-shape"),
    pytest.param(b"<html>oops</html>", id="not-json"),
    pytest.param(b"[1, 2]", id="not-an-object"),
]


@pytest.mark.parametrize("body", INVALID_BODIES)
@pytest.mark.parametrize(
    "operation", [op for op in OPERATIONS if op.service != "agent_execution"], ids=str
)
async def test_invalid_body_is_invalid_response(operation: Operation, body: bytes) -> None:
    status = 201 if operation.name == "save_message" else 200
    async with _answering(status, body, "application/json") as url:
        error = await failure(http_client(operation.service, url), operation)
    assert (error.code, error.retryable) == ("invalid_response", False)


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"data: not json\n\n", id="not-json"),
        pytest.param(b'data: {"type": "chunk", "content": 5}\n\n', id="bad-chunk"),
        pytest.param(b'data: {"type": "done", "usage": {"prompt_tokens": "x"}}\n\n', id="bad-done"),
    ],
)
async def test_invalid_execution_event_is_invalid_response(stream: bytes) -> None:
    async with _answering(200, stream, "text/event-stream") as url:
        client = HttpAgentExecutionClient(url, SERVICE_TOKEN)
        try:
            with pytest.raises(DownstreamError) as caught:
                await _stream(client, ctx())
        finally:
            await client.aclose()
    assert (caught.value.code, caught.value.retryable) == ("invalid_response", False)


async def test_embedding_vector_count_must_match() -> None:
    answer = b'{"model": "m", "embeddings": [[1.0]]}'
    async with _answering(200, answer, "application/json") as url:
        client = HttpEmbeddingClient(url, SERVICE_TOKEN)
        try:
            with pytest.raises(DownstreamError) as caught:
                await client.embed(ctx(), texts=["a", "b"])
        finally:
            await client.aclose()
    assert caught.value.code == "invalid_response"


async def test_ids_are_one_path_segment(double: Double) -> None:
    client = HttpAgentManagementClient(double.url, SERVICE_TOKEN)
    try:
        with pytest.raises(DownstreamError) as caught:
            await client.get_agent(ctx(), agent_id="../default?x=1")
    finally:
        await client.aclose()
    assert caught.value.code == "not_found"
    assert double.requests("agent_management")[0]["path"] == "/v1/agents/../default?x=1"


async def test_invalid_llm_chunk_is_invalid_response() -> None:
    answer = b'data: {"choices": [{"delta": "x"}]}\n\n'
    async with _answering(200, answer, "text/event-stream") as url:
        llm = OpenAICompatibleLLM(f"{url}/v1", api_key=None, default_model="m")
        try:
            _, error = await drain(llm.stream(PROMPT, model=None, temperature=None))
        finally:
            await llm.aclose()
    assert error is not None
    assert (error.code, error.retryable) == ("invalid_response", False)
