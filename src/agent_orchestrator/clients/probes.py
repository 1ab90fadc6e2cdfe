"""What `/health/ready?deep=true` asks of the downstream services this process calls over
HTTP: `GET <base>/health` of each platform service whose `*_URL` is set (2xx: up;
docs/contracts/README.md), and `GET <base>/models` of an OpenAI-compatible LLM provider
(the one cheap request every such server answers)."""

from __future__ import annotations

from typing import Any

from agent_orchestrator.clients.agent_execution.local import LocalAgentExecution
from agent_orchestrator.clients.base import HttpServiceClient
from agent_orchestrator.clients.exchange import Exchange
from agent_orchestrator.clients.llm.openai_compat import OpenAICompatibleLLM


def probe_targets(services: dict[str, Any]) -> dict[str, tuple[Exchange, str]]:
    """Service name -> (its connection pool, the path to probe), for remote ones only:
    local providers run in this process and are as healthy as it is."""
    targets: dict[str, tuple[Exchange, str]] = {}
    for name, client in services.items():
        if isinstance(client, HttpServiceClient):
            targets[name] = (client.exchange, "health")
        elif isinstance(client, LocalAgentExecution) and isinstance(
            client.llm, OpenAICompatibleLLM
        ):
            targets["llm"] = (client.llm.exchange, "models")
    return targets


class UnhealthyAnswer(Exception):
    """The service answered, but not 2xx."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.http_status = status


async def probe(exchange: Exchange, path: str) -> None:
    """Returns when the service answers 2xx; raises otherwise (the caller bounds the wait)."""
    reply = await exchange.fetch("GET", path, {}, None)
    if not 200 <= reply.status < 300:
        raise UnhealthyAnswer(reply.status)
