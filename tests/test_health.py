"""Liveness is cheap and unconditional; readiness reports every dependency and answers 503
while a required one is down, and 200 again once it is back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import httpx
from structlog.testing import capture_logs

from agent_orchestrator.config import Settings
from tests.conftest import REDIS_URL, TcpProxy, redis_url, running_app


async def test_liveness(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readiness_reports_each_dependency(client: httpx.AsyncClient, backend: str) -> None:
    response = await client.get("/health/ready")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    if backend == "postgresql":
        assert body["dependencies"] == {"database": {"status": "ok"}, "redis": {"status": "ok"}}
    else:
        assert body["dependencies"] == {"database": {"status": "ok"}}, "embedded: no Redis"


async def _ready_again(client: httpx.AsyncClient) -> httpx.Response:
    async with asyncio.timeout(10):
        while True:
            response = await client.get("/health/ready")
            if response.status_code == 200:
                return response
            await asyncio.sleep(0.2)


async def _down_then_back(settings: Settings, proxy: TcpProxy, down: str, up: str) -> None:
    """Ready; with `proxy` cut, 503 naming `down` (and `up` still ok) while liveness
    stays 200; ready again once the proxy is back."""
    with capture_logs():  # the outage's warnings, kept off the console
        async with running_app(settings) as client:
            assert (await client.get("/health/ready")).status_code == 200

            await proxy.cut()
            response = await client.get("/health/ready")
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["status"] == "down"
            assert body["dependencies"][up] == {"status": "ok"}
            assert body["dependencies"][down]["status"] == "down"
            assert (await client.get("/health")).status_code == 200, "liveness stays cheap"

            await proxy.start()
            recovered = await _ready_again(client)
            assert recovered.json()["dependencies"][down] == {"status": "ok"}


async def test_readiness_is_503_while_redis_is_down(
    make_settings: Callable[..., Settings], redis_proxy: TcpProxy, redis_namespace: str
) -> None:
    # Redis must be reachable at start-up (the event bus subscribes then), so the outage is
    # made afterwards by cutting the proxy the service reaches Redis through.
    settings = make_settings(redis_uri=redis_url(redis_proxy), redis_namespace=redis_namespace)
    await _down_then_back(settings, redis_proxy, down="redis", up="database")


async def test_readiness_is_503_while_postgresql_is_down(
    make_settings: Callable[..., Settings], pg_database: str, redis_namespace: str
) -> None:
    # The service reaches its (migrated) database through a proxy that the test cuts.
    target = urlsplit(pg_database)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    through_proxy = target._replace(netloc=f"{target.username}@127.0.0.1:{proxy.port}")
    settings = make_settings(
        database_url=urlunsplit(through_proxy),
        redis_uri=REDIS_URL,
        redis_namespace=redis_namespace,
    )
    try:
        await _down_then_back(settings, proxy, down="database", up="redis")
    finally:
        await proxy.close()
