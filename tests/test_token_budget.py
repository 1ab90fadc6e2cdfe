"""Per-tenant LLM token budgets (reliability S8) on both backends: once a tenant's
daily budget is spent its new turns and batches are refused (429 `budget_exceeded`), a
turn queued before that stops when a worker starts it, a run that started overshoots by
at most its one call, and other tenants go on. The usage stores behave alike."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from agent_orchestrator.config import Settings
from agent_orchestrator.services.token_budget import (
    KEEP_SECONDS,
    MemoryUsage,
    RedisUsage,
    UsageStore,
)
from tests.chat_helpers import chat, first_chunk, settled
from tests.conftest import REDIS_URL, TokenFactory, auth, running_app

#: Each echo turn below reports about 20 tokens: two turns spend a budget of 30.
BUDGET = 30


def usage_of(answer: dict[str, object]) -> int:
    usage = answer["message"]["metadata"]["usage"]  # type: ignore[index]
    return int(usage["prompt_tokens"]) + int(usage["completion_tokens"])


async def test_a_spent_budget_refuses_new_turns_of_that_tenant_only(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    settings = make_backend_settings(
        tenant_token_budget=BUDGET, tenant_token_budgets='{"tenant-c": 0}'
    )
    async with running_app(settings) as client:
        headers = auth(make_token())
        spent = 0
        while spent < BUDGET:  # turns run while anything is left, the last one over it
            answer = await chat(client, headers, expect=200, message="hi", mode="wait")
            assert answer["task"]["status"] == "succeeded"
            spent += usage_of(answer)
        refused = await client.post(
            "/api/v1/chat", json={"message": "one more", "mode": "wait"}, headers=headers
        )
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "budget_exceeded"
        assert error["details"]["budget"] == BUDGET
        assert error["details"]["used"] == spent
        assert 0 < int(refused.headers["Retry-After"]) <= 86_401
        assert refused.headers["Retry-After"] == str(error["details"]["retry_after"])
        batch = await client.post(
            "/api/v1/batch", json={"items": [{"message": "x"}]}, headers=headers
        )
        assert batch.status_code == 429
        assert batch.json()["error"]["code"] == "budget_exceeded"

        for tenant, turns in (("tenant-b", 1), ("tenant-c", 3)):  # own budget; c has none
            other = auth(make_token(tenant=tenant))
            for _ in range(turns):
                answer = await chat(client, other, expect=200, message="hi", mode="wait")
                assert answer["task"]["status"] == "succeeded"


async def test_a_turn_queued_before_the_budget_ran_out_stops_when_it_starts(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """The first turn holds the session (it streams for a while); the second waits
    behind it. Once the first has started, the tenant's usage reaches the budget: the
    first runs to its end (a run overshoots by its one call at most), the second fails
    `budget_exceeded` as its worker starts it, before any call."""
    settings = make_backend_settings(tenant_token_budget=BUDGET, echo_chunk_delay=0.02)
    async with running_app(settings) as client:
        headers = auth(make_token())
        first = await chat(client, headers, message=" ".join(["word"] * 30))
        second = await chat(client, headers, message="then", session_id=first["session_id"])
        await first_chunk(client, "tenant-a", first["task_id"])
        budget = client.app.state.core.budget  # type: ignore[attr-defined]
        await budget.charge("tenant-a", BUDGET, 0)  # another turn of the tenant's, elsewhere
        ran = await settled(client, headers, first["task_id"])
        stopped = await settled(client, headers, second["task_id"])
    assert ran["status"] == "succeeded"
    assert stopped["status"] == "failed"
    assert stopped["error"]["code"] == "budget_exceeded"
    assert stopped["service_calls"] == []  # no call was made for it


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[UsageStore]:
    if request.param == "memory":
        yield MemoryUsage()
        return
    redis = Redis.from_url(REDIS_URL)
    namespace = f"test-usage-{uuid.uuid4().hex[:8]}"
    try:
        yield RedisUsage(redis, namespace)
        keys = [key async for key in redis.scan_iter(f"{namespace}:*")]
        assert keys
        for key in keys:  # every key expires
            assert 0 < await redis.ttl(key) <= KEEP_SECONDS
        await redis.delete(*keys)
    finally:
        await redis.aclose()


async def test_usage_adds_up_per_tenant_and_day(store: UsageStore) -> None:
    assert await store.used("acme", "20261126") == 0
    await store.add("acme", "20261126", 12)
    await store.add("acme", "20261126", 30)
    await store.add("other", "20261126", 5)
    await store.add("acme", "20261127", 7)
    assert await store.used("acme", "20261126") == 42  # the day before is still kept
    assert await store.used("other", "20261126") == 5
    assert await store.used("acme", "20261127") == 7


async def test_an_unreachable_store_lets_turns_through(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    settings = make_backend_settings(tenant_token_budget=1)
    async with running_app(settings) as client:
        budget = client.app.state.core.budget  # type: ignore[attr-defined]
        broken = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
        budget.store = RedisUsage(broken, "nowhere")
        errors = "nooble_orchestrator_token_budget_store_errors_total"
        before = REGISTRY.get_sample_value(errors) or 0.0
        try:
            headers = auth(make_token())
            for _ in range(2):  # over a budget of 1, had the store answered
                answer = await chat(client, headers, expect=200, message="hi", mode="wait")
                assert answer["task"]["status"] == "succeeded"
        finally:
            await broken.aclose()
    # Each turn's check at the API and at its start, and its usage record, failed.
    assert (REGISTRY.get_sample_value(errors) or 0.0) - before == 6


async def test_no_budget_is_the_default(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    for _ in range(3):
        answer = await chat(client, headers, expect=200, message="hi", mode="wait")
        assert answer["task"]["status"] == "succeeded"
    assert client.app.state.core.budget.limit_of("tenant-a") == 0  # type: ignore[attr-defined]


async def test_memory_keeps_the_latest_two_days_only() -> None:
    store = MemoryUsage()
    for day in ("20261124", "20261125", "20261126"):
        await store.add("acme", day, 1)
    assert await store.used("acme", "20261124") == 0  # let go: no check asks for it
    assert await store.used("acme", "20261125") == 1
    await store.add("acme", "20261123", 5)  # older than both days kept
    assert await store.used("acme", "20261123") == 0
