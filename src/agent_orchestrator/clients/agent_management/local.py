"""Agent configuration without an agent management service: agents stored in our
database (per tenant), then agents declared in the AGENTS_FILE YAML (every tenant), then
the built-in `default` agent."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.clients.base import CallContext, DownstreamError
from agent_orchestrator.db.prepared import hot
from agent_orchestrator.db.tables import AgentRow
from agent_orchestrator.models.agent import AgentConfig

#: Built once: a turn asks for its agent every time (see db/repositories/rows.py).
_STORED_CONFIG = hot(
    select(AgentRow.__table__.c.config).where(
        AgentRow.__table__.c.tenant_id == bindparam("tenant_id"),
        AgentRow.__table__.c.id == bindparam("agent_id"),
    )
)

DEFAULT_AGENT = AgentConfig(
    id="default",
    name="Default agent",
    system_prompt="You are a helpful assistant.",
)


def load_agents_file(path: Path) -> dict[str, AgentConfig]:
    """Read `agents: [{id, name, system_prompt, ...}]`; a broken file stops start-up."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
        entries = document.get("agents", []) if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("top level must be a mapping with an `agents` list")
        agents = [AgentConfig.model_validate(entry) for entry in entries]
    except (OSError, yaml.YAMLError, ValueError, ValidationError) as error:
        raise ValueError(f"AGENTS_FILE {path}: {error}") from error
    return {agent.id: agent for agent in agents}


class LocalAgentManagement:
    service = "agent_management"

    def __init__(
        self, factory: async_sessionmaker[AsyncSession], declared: dict[str, AgentConfig]
    ) -> None:
        self.factory = factory
        self.declared = {DEFAULT_AGENT.id: DEFAULT_AGENT, **declared}

    async def get_agent(self, ctx: CallContext, *, agent_id: str) -> AgentConfig:
        async with self.factory() as db:
            params = {"tenant_id": ctx.tenant_id, "agent_id": agent_id}
            config = (await db.execute(_STORED_CONFIG, params)).scalar_one_or_none()
        if config is not None:
            return AgentConfig.model_validate({**config, "id": agent_id})
        agent = self.declared.get(agent_id)
        if agent is None:
            raise DownstreamError(
                self.service, "not_found", f"no agent {agent_id!r}", retryable=False, status=404
            )
        return agent
