"""`/internal/v1/*`: for other platform services, authenticated by the service token only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from agent_orchestrator.middleware.auth import require_service
from agent_orchestrator.models.principal import Principal
from agent_orchestrator.routes.openapi import errors

router = APIRouter(prefix="/internal/v1", tags=["internal"], responses=errors(401))

ServicePrincipal = Annotated[Principal, Depends(require_service)]


@router.get("/ping")
async def ping(principal: ServicePrincipal) -> dict[str, str]:
    return {"status": "ok", "tenant_id": principal.tenant_id}
