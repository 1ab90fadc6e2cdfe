"""Rate-limit buckets in Redis, shared by every instance: one script call per request.

The script reads the TAT of every limit the request is under, and only when all of them
have room writes them all, each with an expiry of the moment its bucket is full again.
Read, decision and write are one atomic step, so concurrent requests on many instances
never admit more than the limit (no read-then-write race), and no key is ever left
without an expiry: SET carries its PX in the same command, inside the script. The clock
is Redis's own (TIME), so instances whose clocks disagree still share one timeline.

The calls go through a `ScriptBatcher` (a client of its own): one request's call goes
straight out, and those that arrive meanwhile go next as one pipeline, so a burst of
requests costs a few round trips and two connections, not one pooled connection each.

Why not the `limits` library: it takes one round trip per limit (four per request here),
and cannot check several limits and take from all or none, which keeps a request refused
by its tenant's limit from spending the service-wide one (services/rate_limiter.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from agent_orchestrator.events.script_batch import ScriptBatcher
from agent_orchestrator.services.rate_limiter import Limit, StoreAnswer

# Microseconds throughout; Lua numbers are doubles, exact up to 2^53 (year 2255 in us).
# TATs are written with %d: tostring() would keep only 14 significant digits.
# Returns {0, fill...} when admitted, {index, wait} (1-based) when refused.
_ACQUIRE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local fills = {}
local denied, longest = 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local capacity = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat == nil or tat < now then tat = now end
  local fill = tat + interval - now
  local over = fill - interval * capacity
  if over > 0 then
    if over > longest then denied, longest = i, over end
  else
    fills[i] = fill
  end
end
if denied > 0 then return {denied, longest} end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%d', now + fills[i]),
             'PX', math.ceil(fills[i] / 1000))
end
table.insert(fills, 1, 0)
return fills
"""


class RedisRateStore:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self._prefix = f"{namespace}:rl:"
        self._script = ScriptBatcher(redis, _ACQUIRE)

    def key(self, limit: Limit) -> str:
        return self._prefix + limit.key

    async def acquire(self, limits: Sequence[Limit]) -> StoreAnswer:
        arguments: list[int] = []
        for limit in limits:
            arguments += (limit.interval, limit.per_minute)
        reply = await self._script.run([self.key(limit) for limit in limits], arguments)
        head = int(reply[0])
        if head:
            return StoreAnswer(head - 1, int(reply[1]), ())
        return StoreAnswer(None, 0, [int(fill) for fill in reply[1:]])

    async def aclose(self) -> None:
        await self._script.aclose()
