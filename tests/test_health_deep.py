"""`/health/ready?deep=true`: every downstream service called over HTTP is checked for real
(the test double's `/health` and the LLM's `/models`, a port with nothing on it, a server
that never answers), circuit states come with them, and a service that is down makes the
answer `degraded` but never takes the instance out (200)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from agent_orchestrator.config import Settings
from agent_orchestrator.state import AppState
from tests.conftest import LLM_KEY, running_app
from tests.processes import free_port


@dataclass
class SilentServer:
    """A server that accepts connections and never answers; `arrivals` are the monotonic
    times at which its connections came."""

    port: int
    arrivals: list[float] = field(default_factory=list)


@pytest.fixture
async def silent_server() -> AsyncIterator[SilentServer]:
    held: list[asyncio.StreamWriter] = []
    silent = SilentServer(port=0)

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.arrivals.append(time.monotonic())
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    silent.port = int(server.sockets[0].getsockname()[1])
    try:
        yield silent
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_without_deep_no_service_is_asked(
    make_settings: Callable[..., Settings], double_url: str
) -> None:
    # The LLM's check is recorded by the double (a platform service's /health is not).
    settings = make_settings(llm_base_url=f"{double_url}/v1", llm_api_key=LLM_KEY)
    async with running_app(settings) as client, httpx.AsyncClient(base_url=double_url) as control:

        async def asked() -> int:
            found = await control.get("/_control/requests", params={"path": "/v1/models"})
            return int(found.json()["count"])

        await control.delete("/_control/requests")
        body = (await client.get("/health/ready")).json()
        assert "services" not in body
        assert await asked() == 0
        deep = (await client.get("/health/ready", params={"deep": "true"})).json()
        assert deep["services"]["llm"]["status"] == "ok"
        assert await asked() == 1


async def test_deep_readiness_checks_each_downstream_service(
    make_settings: Callable[..., Settings], double_url: str, silent_server: SilentServer
) -> None:
    nothing_there = free_port()
    silent = f"http://127.0.0.1:{silent_server.port}"
    settings = make_settings(
        conversation_service_url=double_url,
        agent_management_url=double_url,
        tool_registry_url=f"http://127.0.0.1:{nothing_there}",
        query_service_url=silent,
        embedding_service_url=silent,
        llm_base_url=f"{double_url}/v1",
        llm_api_key=LLM_KEY,
    )
    async with running_app(settings) as client, httpx.AsyncClient(base_url=double_url) as control:
        response = await client.get("/health/ready", params={"deep": "true"})
        assert response.status_code == 200, response.text  # degraded, still in rotation
        body = response.json()
        assert body["status"] == "degraded"
        services = body["services"]
        # Only what is called over HTTP: agent execution is local here (on the LLM).
        assert set(services) == {
            "conversation",
            "agent_management",
            "tools",
            "query",
            "embedding",
            "llm",
        }
        assert services["conversation"] == {"status": "ok", "circuit": "closed"}
        assert services["agent_management"] == {"status": "ok", "circuit": "closed"}
        assert services["llm"] == {"status": "ok", "circuit": "closed"}
        assert services["tools"]["status"] == "down"
        assert services["tools"]["error"]  # the connection was refused
        for name in ("query", "embedding"):
            assert services[name] == {
                "status": "down",
                "error": "TimeoutError",
                "circuit": "closed",
            }
        # The checks run at once: both silent services were asked before the first one's
        # 2 s wait ran out (one after the other, the second would come 2 s after the first).
        first, second = silent_server.arrivals
        assert second - first < 1.0, silent_server.arrivals

        # The LLM answering an error status is down too, with that status.
        fault = {"service": "llm", "status": 503}
        assert (await control.post("/_control/faults", json=fault)).status_code == 200
        try:
            deep = (await client.get("/health/ready", params={"deep": "true"})).json()
        finally:
            await control.delete("/_control/faults")
        assert deep["services"]["llm"] == {
            "status": "down",
            "http_status": 503,
            "circuit": "closed",
        }


async def test_an_open_breaker_makes_a_healthy_service_degraded(
    make_settings: Callable[..., Settings], double_url: str
) -> None:
    settings = make_settings(conversation_service_url=double_url, circuit_failure_threshold=2)
    async with running_app(settings) as client:
        assert (await client.get("/health/ready", params={"deep": "true"})).json()["status"] == "ok"
        state: AppState = client.app.state.core  # type: ignore[attr-defined]
        breaker = state.coordinator.breaker("conversation")
        for _ in range(2):
            permit = breaker.admit()
            assert permit is not None
            permit.failed()
        body = (await client.get("/health/ready", params={"deep": "true"})).json()
    assert body["status"] == "degraded"
    assert body["services"]["conversation"] == {"status": "degraded", "circuit": "open"}
