"""The open WebSockets of this instance: caps (instance, tenant, client address), counts for
tests and metrics, and one sweeper that closes sockets that did not authenticate in time,
whose token expired, or that went idle.

One sweeper for every socket instead of timers per socket: a pass over 10,000 sockets
costs about a millisecond, and an idle socket then holds no timer and no task of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from agent_orchestrator.models.principal import Principal
from agent_orchestrator.websocket.connection import Connection
from agent_orchestrator.websocket.metrics import CONNECTIONS


@dataclass(frozen=True, slots=True)
class Caps:
    instance: int
    per_tenant: int
    per_ip: int


@dataclass(frozen=True, slots=True)
class Timeouts:
    auth: float
    idle: float

    @property
    def sweep_interval(self) -> float:
        return min(1.0, self.auth / 4, self.idle / 4)


@dataclass(frozen=True, slots=True)
class Refusal:
    label: str  # metric label
    reason: str  # close reason the client sees


AT_INSTANCE_CAP = Refusal("instance", "this server is at its connection limit; try again later")
AT_IP_CAP = Refusal("ip", "too many connections from this address; try again later")
AT_TENANT_CAP = Refusal("tenant", "too many connections for this tenant; try again later")


class ConnectionManager:
    def __init__(self, caps: Caps, timeouts: Timeouts) -> None:
        self.caps = caps
        self.timeouts = timeouts
        self._open: dict[str, Connection] = {}
        self._by_ip: dict[str, int] = {}
        self._by_tenant: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # --- admission: no await between a check and its count, so a flood cannot race past --
    def admit(self, conn: Connection) -> Refusal | None:
        if len(self._open) >= self.caps.instance:
            return AT_INSTANCE_CAP
        if self._by_ip.get(conn.ip, 0) >= self.caps.per_ip:
            return AT_IP_CAP
        self._open[conn.id] = conn
        self._by_ip[conn.ip] = self._by_ip.get(conn.ip, 0) + 1
        CONNECTIONS.inc()
        return None

    def authenticate(self, conn: Connection, principal: Principal) -> Refusal | None:
        """Counts the socket for its tenant the first time it authenticates."""
        if conn.principal is None:
            tenant = principal.tenant_id
            if self._by_tenant.get(tenant, 0) >= self.caps.per_tenant:
                return AT_TENANT_CAP
            self._by_tenant[tenant] = self._by_tenant.get(tenant, 0) + 1
        conn.principal = principal
        conn.expires_at = principal.expires_at
        return None

    def release(self, conn: Connection) -> None:
        if self._open.pop(conn.id, None) is None:
            return
        CONNECTIONS.dec()
        _decrement(self._by_ip, conn.ip)
        if conn.principal is not None:
            _decrement(self._by_tenant, conn.principal.tenant_id)

    # --- counts ---------------------------------------------------------------------------
    def connection_count(self) -> int:
        return len(self._open)

    def subscription_count(self) -> int:
        return sum(len(conn.subscriptions) for conn in self._open.values())

    def tenant_count(self, tenant_id: str) -> int:
        return self._by_tenant.get(tenant_id, 0)

    def ip_count(self, ip: str) -> int:
        return self._by_ip.get(ip, 0)

    # --- lifetime -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="websocket-sweeper")

    async def stop(self) -> None:
        """Close what is still open (the server normally closed them already, 1012)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for conn in list(self._open.values()):
            conn.close(1001, "server shutting down", flush=False)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.timeouts.sweep_interval)
            self.sweep(time.monotonic(), time.time())

    def sweep(self, now: float, wall_now: float) -> None:
        for conn in list(self._open.values()):
            if conn.closing:
                continue
            if conn.principal is None:
                if now - conn.opened_at >= self.timeouts.auth:
                    conn.close(1008, "authentication timed out")
            elif conn.expires_at is not None and conn.expires_at <= wall_now:
                conn.close(1008, "token expired", flush=False)
            elif now - conn.last_activity >= self.timeouts.idle:
                conn.close(1000, "idle timeout", flush=False)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
