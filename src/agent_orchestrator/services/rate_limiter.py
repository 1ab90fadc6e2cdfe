"""Request rate limits (spec 4.1 and 5.3): per client IP, per user, per tenant and for the
whole service, each a number of requests per minute.

Each limit is a GCRA bucket (the generic cell rate algorithm): it holds up to a minute's
worth of requests and refills at its per-minute rate, so a quiet client may burst its
whole minute at once and a busy one gets one request per `60 s / limit`. In any stretch
of time t a limit admits at most `limit + limit * t / 60 s`. A bucket is one number per
key, its theoretical arrival time (TAT): the moment it would be full again.

A request takes one unit from every limit that applies to it, or from none: a request one
limit refuses spends nothing of the others, so a tenant flooding past its own limit does
not use up the service-wide one for everybody else. The store checks and takes in one
atomic step (`RateStore.acquire`): the `MemoryRateStore` below in embedded mode, the Redis
script of `rate_limit_redis.py` when several instances share the limits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent_orchestrator.config import Settings
from agent_orchestrator.errors import RateLimited
from agent_orchestrator.models.principal import Principal
from agent_orchestrator.observability.logging import get_logger
from agent_orchestrator.observability.metrics import RATE_LIMIT_STORE_ERRORS, RATE_LIMITED

log = get_logger(__name__)

MICROS_PER_MINUTE = 60_000_000
_KNOWN_CALLERS = 10_000


@dataclass(frozen=True, slots=True)
class Limit:
    scope: str  # "ip", "user", "tenant" or "global": the metric label and what 429 names
    key: str  # the store's key, unique per scope and subject
    per_minute: int

    @property
    def interval(self) -> int:
        """Microseconds between requests at the sustained rate, rounded up so that the
        rounding never admits more than the limit."""
        return -(-MICROS_PER_MINUTE // self.per_minute)


@dataclass(frozen=True, slots=True)
class StoreAnswer:
    """What a store says of one `acquire`, in microseconds.

    Allowed (`denied` is None): `fills[i]` is how far limit i's bucket is from full after
    the request (TAT - now). Denied: `denied` is the index of the limit that refused with
    the longest wait, `wait` that wait, and `fills` is empty."""

    denied: int | None
    wait: int
    fills: Sequence[int]


class RateStore(Protocol):
    async def acquire(self, limits: Sequence[Limit]) -> StoreAnswer:
        """One unit from every limit, or from none when any would go over."""
        ...


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: allowed: the limit with the least room left; denied: the one that refused
    limit: Limit
    remaining: int
    #: seconds until `limit` is full again (allowed) or admits this request (denied)
    reset_after: float

    @property
    def retry_after(self) -> int:
        """Whole seconds, rounded up, as `Retry-After` needs."""
        return max(1, math.ceil(self.reset_after)) if not self.allowed else 0

    def message(self) -> str:
        """A refusal in words, for the 429 and the WebSocket's `rate_limited`."""
        return (
            f"rate limit of {self.limit.per_minute} requests per minute for "
            f"{_WHOSE[self.limit.scope]} reached; retry in {self.retry_after} s"
        )

    def details(self) -> dict[str, int | str]:
        return {
            "limit": self.limit.scope,
            "per_minute": self.limit.per_minute,
            "retry_after": self.retry_after,
        }

    def headers(self) -> dict[str, str]:
        """`RateLimit-Limit`, `-Remaining` and `-Reset` (seconds) of this limit, as the
        IETF draft "RateLimit header fields for HTTP" has them, and on a refusal
        `Retry-After` (seconds)."""
        headers = {
            "RateLimit-Limit": str(self.limit.per_minute),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_after)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers

    def refusal(self) -> RateLimited:
        """The one 429 a refusal becomes, whoever refuses: the request layer, the
        introspection bucket, a WebSocket `chat.send`."""
        return RateLimited(self.message(), details=self.details(), headers=self.headers())


_WHOSE = {
    "ip": "this client address",
    "user": "this user",
    "tenant": "this tenant",
    "global": "the service",
}


def gcra_step(tat: int | None, now: int, interval: int, capacity: int) -> tuple[int | None, int]:
    """One GCRA decision for one bucket, in microseconds: (the new TAT, or None when the
    request would go over; the fill after it, or how long until it fits). The Redis
    script does the same arithmetic (rate_limit_redis.py)."""
    start = now if tat is None or tat < now else tat
    fill = start + interval - now
    over = fill - interval * capacity
    if over > 0:
        return None, over
    return now + fill, fill


class MemoryRateStore:
    """Buckets in this process (embedded mode): a dict of TATs on the monotonic clock.

    Full buckets are forgotten in sweeps that run when the dict has doubled since the last
    one, so memory follows the number of clients active in the last minute."""

    def __init__(self, clock: Callable[[], int] = lambda: time.monotonic_ns() // 1000) -> None:
        self._clock = clock
        self._tats: dict[str, int] = {}
        self._sweep_at = 1024

    async def acquire(self, limits: Sequence[Limit]) -> StoreAnswer:
        return self.acquire_now(limits)

    def acquire_now(self, limits: Sequence[Limit]) -> StoreAnswer:
        now = self._clock()
        tats = self._tats
        fills: list[int] = []
        new_tats: list[int] = []
        denied: int | None = None
        longest = 0
        for index, limit in enumerate(limits):
            tat, amount = gcra_step(tats.get(limit.key), now, limit.interval, limit.per_minute)
            if tat is None:
                if amount > longest:
                    denied, longest = index, amount
                continue
            fills.append(amount)
            new_tats.append(tat)
        if denied is not None:
            return StoreAnswer(denied, longest, ())
        for limit, tat in zip(limits, new_tats, strict=True):
            tats[limit.key] = tat
        if len(tats) >= self._sweep_at:
            self._sweep(now)
        return StoreAnswer(None, 0, fills)

    def _sweep(self, now: int) -> None:
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        self._sweep_at = max(1024, 2 * len(self._tats))

    def __len__(self) -> int:
        return len(self._tats)


class RateLimiter:
    """Which limits apply to a request, and the decision of the store on them."""

    def __init__(self, settings: Settings, store: RateStore | None = None) -> None:
        self.ip_per_minute = settings.ip_rate_limit
        self.user_per_minute = settings.user_rate_limit
        self.tenant_per_minute = settings.tenant_rate_limit
        self.global_per_minute = settings.global_rate_limit
        self.tenant_overrides = dict(settings.tenant_rate_limits)
        self.store = store
        self._logged_failure_at = -math.inf
        # (tenant, user, address) -> its limits: a caller sends many requests, and building
        # four limits and their keys was half of what the limiter cost per request.
        self._known: dict[tuple[str | None, str | None, str | None], list[Limit]] = {}

    def limits_of(self, principal: Principal | None, client_ip: str | None) -> list[Limit]:
        """`limits_for`, remembered (bounded: forgotten all at once when full)."""
        key: tuple[str | None, str | None, str | None] = (
            (None, None, client_ip)
            if principal is None
            else (principal.tenant_id, principal.user_id, client_ip)
        )
        limits = self._known.get(key)
        if limits is None:
            if len(self._known) >= _KNOWN_CALLERS:
                self._known.clear()
            limits = self._known[key] = self.limits_for(principal, client_ip)
        return limits

    def limits_for(self, principal: Principal | None, client_ip: str | None) -> list[Limit]:
        """Narrowest first. A request without a valid token counts against its IP only:
        the tenant, user and service-wide quotas are for callers the service knows."""
        limits: list[Limit] = []
        if client_ip is not None and self.ip_per_minute:
            limits.append(Limit("ip", f"ip:{client_ip}", self.ip_per_minute))
        if principal is None:
            return limits
        tenant = principal.tenant_id
        if self.user_per_minute:
            # Length-prefixed: tenant "a:b" with user "c" is not tenant "a" with user "b:c".
            key = f"user:{len(tenant)}:{tenant}:{principal.user_id}"
            limits.append(Limit("user", key, self.user_per_minute))
        per_tenant = self.tenant_overrides.get(tenant, self.tenant_per_minute)
        if per_tenant:
            limits.append(Limit("tenant", f"tenant:{tenant}", per_tenant))
        if self.global_per_minute:
            limits.append(Limit("global", "global", self.global_per_minute))
        return limits

    async def check(self, principal: Principal | None, client_ip: str | None) -> Decision | None:
        """The decision for one request, or None when no limit applies to it."""
        return await self.check_limits(self.limits_of(principal, client_ip))

    async def check_introspection(self, client_ip: str | None) -> Decision | None:
        """The decision for asking the Identity Service about a token on behalf of this
        address (a token it has no answer for yet): at most `IP_RATE_LIMIT` a minute, in a
        bucket of its own, so that one address sending random tokens cannot make this
        service ask more often than its requests are admitted."""
        if client_ip is None or not self.ip_per_minute:
            return None
        return await self.check_limits([Limit("ip", f"introspect:{client_ip}", self.ip_per_minute)])

    async def check_limits(self, limits: Sequence[Limit]) -> Decision | None:
        """One unit from every limit, or None when there is none to take from.

        A store that fails lets the request through (and counts it): limits protect the
        service, and refusing every request while Redis is away would be an outage of its
        own. Whatever else needs Redis for that request fails by itself."""
        if not limits or self.store is None:
            return None
        try:
            answer = await self.store.acquire(limits)
        except Exception as error:  # any store failure: fail open
            RATE_LIMIT_STORE_ERRORS.inc()
            now = time.monotonic()
            if now - self._logged_failure_at >= 60:  # one line a minute, not one per request
                self._logged_failure_at = now
                log.warning("rate-limit store failed; requests pass unlimited", error=repr(error))
            return None
        decision = decide(limits, answer)
        if not decision.allowed:
            RATE_LIMITED.labels(decision.limit.scope).inc()
        return decision


def decide(limits: Sequence[Limit], answer: StoreAnswer) -> Decision:
    if answer.denied is not None:
        return Decision(False, limits[answer.denied], 0, answer.wait / 1_000_000)
    best, least, its_fill = 0, -1, 0
    for index, (limit, fill) in enumerate(zip(limits, answer.fills, strict=True)):
        # Whole requests that still fit: capacity minus the fill, in intervals.
        remaining = limit.per_minute - -(-fill // limit.interval)
        if least < 0 or remaining < least:
            best, least, its_fill = index, remaining, fill
    return Decision(True, limits[best], least, its_fill / 1_000_000)
