"""What a downstream call costs beyond its bytes: the per-call work the HTTP clients must
not do (import lookups, a new connection per streamed reply). The double runs as its own
process, so connections and reads happen on real sockets."""

from __future__ import annotations

import asyncio
import importlib.abc
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

import pytest
import uvloop

from agent_orchestrator.clients.agent_execution.http import HttpAgentExecutionClient
from agent_orchestrator.clients.agent_management.http import HttpAgentManagementClient
from agent_orchestrator.clients.base import CallContext
from agent_orchestrator.clients.conversation.http import HttpConversationClient
from agent_orchestrator.clients.llm.openai_compat import OpenAICompatibleLLM
from agent_orchestrator.models.agent import AgentConfig, ReplyDone
from tests.conftest import TcpProxy
from tests.doubles.process import running_double

pytestmark = pytest.mark.e2e

TOKEN = "hot-path-token"
AGENT = AgentConfig(id="default", system_prompt="Be brief.")


@pytest.fixture(scope="module")
def double_url() -> Iterator[str]:
    with running_double(service_token=TOKEN) as base_url:
        yield base_url


def ctx() -> CallContext:
    return CallContext(tenant_id="acme", correlation_id="corr-1")


class _ImportSpy(importlib.abc.MetaPathFinder):
    """Records every module name the import system searches for (an import that is
    already in sys.modules never gets here)."""

    def __init__(self) -> None:
        self.searched: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        self.searched.append(fullname)
        return None


async def _one_turn_of_calls(base_url: str) -> None:
    conversation = HttpConversationClient(base_url, TOKEN)
    agents = HttpAgentManagementClient(base_url, TOKEN)
    execution = HttpAgentExecutionClient(base_url, TOKEN)
    session = str(uuid.uuid4())
    try:
        await conversation.get_history(ctx(), session_id=session, limit=10)
        await agents.get_agent(ctx(), agent_id="default")
        events = execution.execute(ctx(), agent=AGENT, history=[], message="hi", sources=[])
        assert isinstance([event async for event in events][-1], ReplyDone)
        await conversation.save_message(
            ctx(),
            session_id=session,
            message_id=str(uuid.uuid4()),
            role="user",
            content="hi",
            task_id=None,
            metadata={},
        )
    finally:
        for client in (conversation, agents, execution):
            await client.aclose()


async def test_calls_search_the_import_path_for_nothing(double_url: str) -> None:
    # A failing optional import inside a library (httpcore asking for sniffio) is not
    # cached by Python: it costs a filesystem search on every call.
    await _one_turn_of_calls(double_url)  # whatever is imported lazily, once
    spy = _ImportSpy()
    sys.meta_path.insert(0, spy)
    try:
        await _one_turn_of_calls(double_url)
    finally:
        sys.meta_path.remove(spy)
    assert spy.searched == []


class _CountingProxy(TcpProxy):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.accepted = 0

    async def _accept(self, reader: Any, writer: Any) -> None:
        self.accepted += 1
        await super()._accept(reader, writer)


@pytest.fixture
async def proxy(double_url: str) -> AsyncIterator[_CountingProxy]:
    host, port = double_url.removeprefix("http://").split(":")
    relay = _CountingProxy(host, int(port))
    await relay.start()
    yield relay
    await relay.close()


async def test_a_finished_stream_leaves_its_connection_for_the_next_call(
    proxy: _CountingProxy,
) -> None:
    client = HttpAgentExecutionClient(f"http://127.0.0.1:{proxy.port}", TOKEN)
    try:
        for message in ("one", "two", "three"):
            events = client.execute(ctx(), agent=AGENT, history=[], message=message, sources=[])
            assert isinstance([event async for event in events][-1], ReplyDone)
            await asyncio.sleep(0.05)  # the body's end follows `done` at once
    finally:
        await client.aclose()
    assert proxy.accepted == 1


def test_calls_work_on_uvloop(double_url: str) -> None:
    # The worker and the API run on uvloop, whose transports are not asyncio's classes.
    uvloop.run(_one_turn_of_calls(double_url))


async def test_a_finished_llm_stream_leaves_its_connection_for_the_next_call(
    proxy: _CountingProxy,
) -> None:
    llm = OpenAICompatibleLLM(f"http://127.0.0.1:{proxy.port}/v1", api_key=None, default_model="m")
    try:
        for message in ("one", "two", "three"):
            prompt = [{"role": "user", "content": message}]
            events = [event async for event in llm.stream(prompt, model=None, temperature=None)]
            assert isinstance(events[-1], ReplyDone)
            await asyncio.sleep(0.05)  # the body's end follows [DONE] at once
    finally:
        await llm.aclose()
    assert proxy.accepted == 1
