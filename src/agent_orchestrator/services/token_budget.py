"""Per-tenant budgets of LLM tokens per UTC day (TENANT_TOKEN_BUDGET, TENANT_TOKEN_BUDGETS).

A turn is refused before it is queued once its tenant's budget for the day is spent
(429 `budget_exceeded`, with `Retry-After` until the next UTC day), and checked again when
a worker starts it, so turns queued before the budget ran out stop too. A turn that
started runs to its end: a run overshoots by at most its one agent call. Usage is what
each turn's reply reports (prompt and completion tokens), added when the turn ends: in
Redis in production, shared by every process; in-process in embedded mode. If the store
cannot answer, turns pass (as with rate limits) and the failure is counted.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol

from redis.asyncio import Redis

from agent_orchestrator.errors import RateLimited
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.observability.metrics import (
    BUDGET_REFUSALS,
    BUDGET_STORE_ERRORS,
    LLM_TOKENS,
)

log = get_logger(__name__)

#: A day's usage is kept this long after the day began (the day, and one to spare).
KEEP_SECONDS = 2 * 86_400


class BudgetExceeded(RateLimited):
    code = "budget_exceeded"


class UsageStore(Protocol):
    async def used(self, tenant_id: str, day: str) -> int: ...
    async def add(self, tenant_id: str, day: str, tokens: int) -> None: ...


class MemoryUsage:
    def __init__(self) -> None:
        self._days: dict[str, dict[str, int]] = {}

    async def used(self, tenant_id: str, day: str) -> int:
        return self._days.get(day, {}).get(tenant_id, 0)

    async def add(self, tenant_id: str, day: str, tokens: int) -> None:
        if day not in self._days:  # a new day: keep it and the latest one before it
            self._days[day] = {}
            self._days = dict(sorted(self._days.items())[-2:])
        usage = self._days.get(day)
        if usage is None:  # older than both: no check will ask for it
            return
        usage[tenant_id] = usage.get(tenant_id, 0) + tokens


class RedisUsage:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self._redis = redis
        self._prefix = f"{namespace}:token-usage:"

    def _key(self, tenant_id: str, day: str) -> str:
        return f"{self._prefix}{day}:{tenant_id}"

    async def used(self, tenant_id: str, day: str) -> int:
        value = await self._redis.get(self._key(tenant_id, day))
        return int(value) if value is not None else 0

    async def add(self, tenant_id: str, day: str, tokens: int) -> None:
        key = self._key(tenant_id, day)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, tokens)
            pipe.expire(key, KEEP_SECONDS)  # every key expires, written in the same MULTI
            await pipe.execute()


def _today(now: datetime) -> str:
    return now.strftime("%Y%m%d")


def _seconds_to_tomorrow(now: datetime) -> int:
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((tomorrow - now).total_seconds()) + 1)


class TokenBudget:
    def __init__(self, store: UsageStore, default: int, per_tenant: dict[str, int]) -> None:
        self.store = store
        self.default = default
        self.per_tenant = per_tenant

    def limit_of(self, tenant_id: str) -> int:
        """Tokens per day for this tenant; 0 is no budget."""
        return self.per_tenant.get(tenant_id, self.default)

    async def check(self, tenant_id: str, where: str) -> None:
        """Raise BudgetExceeded when the tenant's budget for today is spent; `where`
        (`api`, `worker`) labels the refusal's metric."""
        limit = self.limit_of(tenant_id)
        if not limit:
            return
        now = datetime.now(UTC)
        try:
            used = await self.store.used(tenant_id, _today(now))
        except Exception as error:  # the store is away: let the turn through
            BUDGET_STORE_ERRORS.inc()
            log.warning("token budget store failed; turn let through", error=str(error))
            return
        if used < limit:
            return
        BUDGET_REFUSALS.labels(where).inc()
        retry_after = _seconds_to_tomorrow(now)
        raise BudgetExceeded(
            f"the tenant's budget of {limit} LLM tokens for today is spent; "
            f"it renews in {retry_after} s",
            details={"budget": limit, "used": used, "retry_after": retry_after},
            headers={"Retry-After": str(retry_after)},
        )

    async def charge(self, tenant_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Add what a finished turn's reply used."""
        LLM_TOKENS.labels("prompt").inc(prompt_tokens)
        LLM_TOKENS.labels("completion").inc(completion_tokens)
        tokens = prompt_tokens + completion_tokens
        if not self.limit_of(tenant_id) or tokens <= 0:
            return
        try:
            await self.store.add(tenant_id, _today(datetime.now(UTC)), tokens)
        except Exception as error:
            BUDGET_STORE_ERRORS.inc()
            log.warning("token usage not recorded", error=str(error), tokens=tokens)
