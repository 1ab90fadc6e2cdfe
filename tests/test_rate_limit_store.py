"""The rate-limit stores: one conformance suite run against the in-process store and the
Redis script (real Redis), the policy that picks the limits of a request, and a
hypothesis state machine of the in-process store against a token-bucket model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from agent_orchestrator.config import Settings
from agent_orchestrator.models.principal import Principal, PrincipalKind
from agent_orchestrator.services.rate_limit_redis import RedisRateStore
from agent_orchestrator.services.rate_limiter import (
    Limit,
    MemoryRateStore,
    RateLimiter,
    RateStore,
    decide,
)
from tests.conftest import REDIS_URL, TcpProxy, redis_url


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RateStore]:
    if request.param == "memory":
        yield MemoryRateStore()
        return
    namespace = request.getfixturevalue("redis_namespace")
    client = Redis.from_url(REDIS_URL)
    shared = RedisRateStore(client, namespace)
    try:
        yield shared
    finally:
        await shared.aclose()
        await client.aclose()


async def test_a_limit_admits_a_minute_at_once_then_refuses(store: RateStore) -> None:
    limit = Limit("tenant", "tenant:a", 5)  # one request every 12 s, five at once
    fills = []
    for _ in range(5):
        answer = await store.acquire([limit])
        assert answer.denied is None
        fills.append(answer.fills[0])
    # Each request moves the bucket one interval further from full.
    assert [round(fill / limit.interval) for fill in fills] == [1, 2, 3, 4, 5]
    refused = await store.acquire([limit])
    assert refused.denied == 0
    # The sixth fits once one interval has passed since the first.
    assert limit.interval - 1_000_000 < refused.wait <= limit.interval


async def test_a_refusal_takes_nothing_from_the_other_limits(store: RateStore) -> None:
    narrow = Limit("user", "user:1:a:u", 1)
    wide = Limit("global", "global", 10)
    assert (await store.acquire([narrow, wide])).denied is None
    for _ in range(3):
        assert (await store.acquire([narrow, wide])).denied == 0
    # The wide bucket was charged once, by the admitted request only.
    alone = await store.acquire([wide])
    assert alone.denied is None
    assert round(alone.fills[0] / wide.interval) == 2


async def test_a_refusal_names_the_limit_with_the_longest_wait(store: RateStore) -> None:
    short = Limit("user", "user:short", 60)  # interval 1 s
    long = Limit("tenant", "tenant:long", 1)  # interval 60 s
    for _ in range(60):
        assert (await store.acquire([short])).denied is None
    assert (await store.acquire([long])).denied is None
    refused = await store.acquire([short, long])
    assert refused.denied == 1
    assert refused.wait > 58_000_000


async def test_the_wait_it_reports_is_the_wait_that_works(store: RateStore) -> None:
    limit = Limit("ip", "ip:192.0.2.1", 120)  # interval 0.5 s
    while (answer := await store.acquire([limit])).denied is None:
        pass
    assert 0 < answer.wait <= limit.interval
    await asyncio.sleep(answer.wait / 1_000_000 + 0.02)
    assert (await store.acquire([limit])).denied is None
    assert (await store.acquire([limit])).denied == 0


async def test_concurrent_requests_never_exceed_the_limit(store: RateStore) -> None:
    limit = Limit("tenant", "tenant:flood", 50)  # refills one every 1.2 s
    started = time.monotonic()
    answers = await asyncio.gather(*(store.acquire([limit]) for _ in range(400)))
    elapsed = time.monotonic() - started
    admitted = sum(answer.denied is None for answer in answers)
    assert 50 <= admitted <= 50 + int(elapsed / 1.2) + 1


@pytest.mark.redis
async def test_redis_keys_always_carry_an_expiry(redis_namespace: str) -> None:
    client = Redis.from_url(REDIS_URL)
    try:
        store = RedisRateStore(client, redis_namespace)
        limits = [Limit("user", "user:ttl", 3), Limit("global", "global", 1000)]
        await asyncio.gather(*(store.acquire(limits) for _ in range(50)))
        keys = [key async for key in client.scan_iter(match=f"{redis_namespace}:rl:*")]
        assert sorted(keys) == sorted(store.key(limit).encode() for limit in limits)
        for key in keys:
            ttl = await client.pttl(key)
            # Until the bucket is full again: at most a minute, never without one (-1).
            assert 0 < ttl <= 60_000, (key, ttl)
        # A full bucket's key is gone: the store holds only clients seen within a minute.
        quick = Limit("ip", "ip:quick", 60_000)  # interval 1 ms
        await store.acquire([quick])
        await asyncio.sleep(0.05)
        assert await client.exists(store.key(quick)) == 0
    finally:
        await store.aclose()
        await client.aclose()


def test_memory_store_forgets_full_buckets() -> None:
    now = [0]
    store = MemoryRateStore(clock=lambda: now[0])
    for index in range(1023):
        store.acquire_now([Limit("ip", f"ip:{index}", 60)])
    assert len(store) == 1023
    now[0] = 2_000_000  # two intervals later: every one of those buckets is full again
    store.acquire_now([Limit("ip", "ip:new", 60)])
    assert len(store) == 1  # the sweep kept only the bucket still filling


def _principal(tenant: str = "acme", user: str = "u1") -> Principal:
    return Principal(tenant_id=tenant, user_id=user, scopes=frozenset(), kind=PrincipalKind.USER)


def _limiter(**values: Any) -> RateLimiter:
    return RateLimiter(Settings(_env_file=None, **values))  # type: ignore[call-arg]


def test_policy_applies_the_narrowest_limits_first() -> None:
    limits = _limiter().limits_for(_principal(), "192.0.2.9")
    assert [(limit.scope, limit.per_minute) for limit in limits] == [
        ("ip", 300),
        ("user", 60),
        ("tenant", 100),
        ("global", 1000),
    ]


def test_policy_counts_a_caller_without_a_valid_token_by_address_only() -> None:
    limits = _limiter().limits_for(None, "192.0.2.9")
    assert [(limit.scope, limit.key) for limit in limits] == [("ip", "ip:192.0.2.9")]


def test_policy_tenant_overrides_and_zero_turns_a_limit_off() -> None:
    limiter = _limiter(tenant_rate_limits={"big": 5000, "free": 0}, ip_rate_limit=0)
    scopes = {
        tenant: {
            limit.scope: limit.per_minute
            for limit in limiter.limits_for(_principal(tenant), "192.0.2.9")
        }
        for tenant in ("big", "free", "other")
    }
    assert scopes["big"] == {"user": 60, "tenant": 5000, "global": 1000}
    assert scopes["free"] == {"user": 60, "global": 1000}
    assert scopes["other"] == {"user": 60, "tenant": 100, "global": 1000}


def test_policy_user_keys_cannot_collide_across_tenants() -> None:
    limiter = _limiter()
    first = limiter.limits_for(_principal("a:b", "c"), None)
    second = limiter.limits_for(_principal("a", "b:c"), None)
    assert first[0].scope == second[0].scope == "user"
    assert first[0].key != second[0].key


def test_decision_reports_the_limit_with_least_room() -> None:
    store = MemoryRateStore()
    limits = [Limit("user", "user:x", 3), Limit("global", "global", 1000)]
    decisions = [decide(limits, store.acquire_now(limits)) for _ in range(3)]
    assert [(d.limit.scope, d.remaining) for d in decisions] == [
        ("user", 2),
        ("user", 1),
        ("user", 0),
    ]
    refused = decide(limits, store.acquire_now(limits))
    assert not refused.allowed
    assert refused.limit.scope == "user"
    assert refused.retry_after == 20  # one interval of a 3-per-minute limit
    assert refused.details() == {"limit": "user", "per_minute": 3, "retry_after": 20}


class _TokenBucketModel(RuleBasedStateMachine):
    """The in-process store against a token bucket written independently: a bucket holds
    up to `per_minute` tokens, gains one every `interval` microseconds, and a request takes
    one token from each of its limits only when every one of them has a whole token."""

    KEYS = ("a", "b", "c")

    @initialize(
        sizes=st.lists(st.integers(min_value=1, max_value=6), min_size=3, max_size=3),
    )
    def setup(self, sizes: list[int]) -> None:
        # A few requests per minute, so that a run of forty steps empties buckets.
        self.now = 10**12
        self.store = MemoryRateStore(clock=lambda: self.now)
        self.limits = {
            key: Limit("tenant", key, size) for key, size in zip(self.KEYS, sizes, strict=True)
        }
        self.tokens = {key: Fraction(limit.per_minute) for key, limit in self.limits.items()}
        self.seen = dict.fromkeys(self.KEYS, self.now)

    def _refill(self) -> None:
        for key, limit in self.limits.items():
            gained = Fraction(self.now - self.seen[key], limit.interval)
            self.tokens[key] = min(Fraction(limit.per_minute), self.tokens[key] + gained)
            self.seen[key] = self.now

    @rule(micros=st.integers(min_value=0, max_value=30_000_000))
    def wait(self, micros: int) -> None:
        self.now += micros

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True))
    def request(self, keys: list[str]) -> None:
        self._refill()
        limits = [self.limits[key] for key in keys]
        answer = self.store.acquire_now(limits)
        expected = all(self.tokens[key] >= 1 for key in keys)
        assert (answer.denied is None) == expected, (keys, self.tokens)
        if expected:
            for key in keys:
                self.tokens[key] -= 1
        else:
            # The wait reported is the longest until a refusing bucket has a whole token.
            waits = {
                key: (1 - self.tokens[key]) * self.limits[key].interval
                for key in keys
                if self.tokens[key] < 1
            }
            assert answer.denied is not None
            assert answer.wait == max(waits.values()) == waits[keys[answer.denied]]

    @invariant()
    def remaining_matches_the_tokens(self) -> None:
        if not hasattr(self, "store"):
            return
        self._refill()
        for key, limit in self.limits.items():
            tat = self.store._tats.get(key)
            fill = 0 if tat is None or tat < self.now else tat - self.now
            assert limit.per_minute - Fraction(fill, limit.interval) == self.tokens[key]


TestTokenBucketModel = _TokenBucketModel.TestCase
TestTokenBucketModel.settings = hypothesis_settings(max_examples=200, stateful_step_count=40)


def test_an_interval_never_rounds_in_the_clients_favour() -> None:
    assert Limit("tenant", "t", 60).interval == 1_000_000
    for per_minute in (7, 13, 100, 999, 1000, 100_000_000):
        interval = Limit("tenant", "t", per_minute).interval
        assert interval * per_minute >= 60_000_000 > (interval - 1) * per_minute


def test_policy_remembers_a_callers_limits_within_a_bound() -> None:
    limiter = _limiter()
    first = limiter.limits_of(_principal(), "192.0.2.9")
    assert limiter.limits_of(_principal(), "192.0.2.9") is first
    assert limiter.limits_of(_principal(user="u2"), "192.0.2.9") != first
    for index in range(10_000):
        limiter.limits_of(None, f"198.51.100.{index}")
    assert len(limiter._known) <= 10_000  # the bound under test
    assert limiter.limits_of(_principal(), "192.0.2.9") == first


@pytest.mark.redis
async def test_with_redis_away_requests_pass_unlimited_and_are_counted(
    redis_proxy: TcpProxy, redis_namespace: str
) -> None:
    client = Redis.from_url(redis_url(redis_proxy))
    limiter = _limiter(ip_rate_limit=1)
    limiter.store = store = RedisRateStore(client, redis_namespace)

    def failures() -> float:
        value = REGISTRY.get_sample_value("nooble_orchestrator_rate_limit_store_errors_total")
        return value or 0.0

    try:
        admitted = await limiter.check(None, "192.0.2.1")
        assert admitted is not None
        assert admitted.allowed
        refused = await limiter.check(None, "192.0.2.1")
        assert refused is not None
        assert not refused.allowed
        before = failures()
        await redis_proxy.cut()
        # Fail open: no decision, so the request goes on; the failure is counted.
        assert await limiter.check(None, "192.0.2.1") is None
        assert await limiter.check(None, "192.0.2.1") is None
        assert failures() == before + 2
        await redis_proxy.start()
        # Back: the bucket Redis kept still refuses, and nothing more is counted.
        again = await limiter.check(None, "192.0.2.1")
        assert again is not None
        assert not again.allowed
        assert failures() == before + 2
    finally:
        await store.aclose()
        await client.aclose()
