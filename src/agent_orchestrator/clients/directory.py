"""Which implementation serves each downstream service in this process: the HTTP client
when its `*_URL` is set, else the local provider when there is one, else nothing (plans
then skip optional steps on it, and fail required ones with `service_unavailable`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agent_orchestrator.clients.agent_execution.http import HttpAgentExecutionClient
from agent_orchestrator.clients.agent_execution.local import LocalAgentExecution
from agent_orchestrator.clients.agent_management.http import HttpAgentManagementClient
from agent_orchestrator.clients.agent_management.local import (
    LocalAgentManagement,
    load_agents_file,
)
from agent_orchestrator.clients.base import HttpServiceClient
from agent_orchestrator.clients.conversation.http import HttpConversationClient
from agent_orchestrator.clients.conversation.local import LocalConversation
from agent_orchestrator.clients.embedding.http import HttpEmbeddingClient
from agent_orchestrator.clients.identity.http import HttpIdentityClient
from agent_orchestrator.clients.ingestion.http import HttpIngestionClient
from agent_orchestrator.clients.llm import LLMProvider
from agent_orchestrator.clients.llm.echo import EchoModel
from agent_orchestrator.clients.llm.openai_compat import OpenAICompatibleLLM
from agent_orchestrator.clients.query.http import HttpQueryClient
from agent_orchestrator.clients.tools.http import HttpToolsClient
from agent_orchestrator.clients.workflow.http import HttpWorkflowClient
from agent_orchestrator.config import Settings

HTTP_CLIENTS: dict[str, tuple[str, type[HttpServiceClient]]] = {
    "conversation": ("conversation_service_url", HttpConversationClient),
    "agent_management": ("agent_management_url", HttpAgentManagementClient),
    "agent_execution": ("agent_execution_service_url", HttpAgentExecutionClient),
    "query": ("query_service_url", HttpQueryClient),
    "embedding": ("embedding_service_url", HttpEmbeddingClient),
    "ingestion": ("ingestion_service_url", HttpIngestionClient),
    "workflow": ("workflow_engine_url", HttpWorkflowClient),
    "tools": ("tool_registry_url", HttpToolsClient),
    "identity": ("identity_service_url", HttpIdentityClient),
}

if TYPE_CHECKING:
    # Every implementation satisfies its service's Protocol (checked by mypy, not run).
    from agent_orchestrator.clients.agent_execution import AgentExecutionClient
    from agent_orchestrator.clients.agent_management import AgentManagementClient
    from agent_orchestrator.clients.conversation import ConversationClient
    from agent_orchestrator.clients.embedding import EmbeddingClient
    from agent_orchestrator.clients.identity import IdentityClient
    from agent_orchestrator.clients.ingestion import IngestionClient
    from agent_orchestrator.clients.query import QueryClient
    from agent_orchestrator.clients.tools import ToolsClient
    from agent_orchestrator.clients.workflow import WorkflowClient

    _conversation: tuple[type[ConversationClient], ...] = (
        HttpConversationClient,
        LocalConversation,
    )
    _agents: tuple[type[AgentManagementClient], ...] = (
        HttpAgentManagementClient,
        LocalAgentManagement,
    )
    _execution: tuple[type[AgentExecutionClient], ...] = (
        HttpAgentExecutionClient,
        LocalAgentExecution,
    )
    _query: type[QueryClient] = HttpQueryClient
    _embedding: type[EmbeddingClient] = HttpEmbeddingClient
    _ingestion: type[IngestionClient] = HttpIngestionClient
    _workflow: type[WorkflowClient] = HttpWorkflowClient
    _tools: type[ToolsClient] = HttpToolsClient
    _identity: type[IdentityClient] = HttpIdentityClient
    _llm: tuple[type[LLMProvider], ...] = (EchoModel, OpenAICompatibleLLM)


def build_llm(settings: Settings) -> LLMProvider:
    if settings.llm_base_url:
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        return OpenAICompatibleLLM(
            settings.llm_base_url,
            api_key=key,
            default_model=settings.llm_model,
            timeout=settings.llm_timeout,
        )
    return EchoModel(chunk_delay=settings.echo_chunk_delay)


def build_directory(
    settings: Settings, factory: async_sessionmaker[AsyncSession]
) -> tuple[dict[str, Any], list[Any]]:
    """The service map, and everything in it that must be closed on shutdown."""
    token = settings.service_token.get_secret_value() if settings.service_token else None
    services: dict[str, Any] = {}
    closeable: list[Any] = []
    for name, (url_field, client_type) in HTTP_CLIENTS.items():
        url = getattr(settings, url_field)
        if url:
            client = client_type(url, token, timeout=settings.downstream_timeout)
            services[name] = client
            closeable.append(client)
    if "conversation" not in services:
        services["conversation"] = LocalConversation(factory)
    if "agent_management" not in services:
        declared = load_agents_file(settings.agents_file) if settings.agents_file else {}
        services["agent_management"] = LocalAgentManagement(factory, declared)
    if "agent_execution" not in services:
        llm = build_llm(settings)
        services["agent_execution"] = LocalAgentExecution(llm)
        closeable.append(llm)
    for name in ("query", "embedding", "ingestion", "workflow", "tools", "identity"):
        services.setdefault(name, None)
    return services, closeable
