"""Rate limits on real processes and real HTTP (reliability scenarios L1-L3 and S7): a
tenant's limit shared by two API instances through Redis under a flood, another tenant
untouched by it, keys that always expire, per-address limits that a forged
`X-Forwarded-For` cannot dodge, and the same limits on a WebSocket's `chat.send`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from agent_orchestrator.middleware.auth import TokenVerifier
from tests.conftest import REDIS_URL, auth, token_factory
from tests.processes import (
    CLI,
    free_port,
    print_log,
    process_env,
    run_migrate,
    start_process,
    stop_process,
    wait_http_ok_async,
)
from tests.ws_helpers import open_authed, recv, send

pytestmark = pytest.mark.e2e

SECRET = "e2e-rate-limit-secret-0123456789abcdef0123456789abcdef"
issue = token_factory(TokenVerifier(SECRET))


@asynccontextmanager
async def api_instances(tmp_path: Path, count: int, **variables: str) -> AsyncIterator[list[str]]:
    """`count` API processes (`serve`, or `serve --no-worker` when REDIS_URI is given) with
    `variables` on top of unreached limits; yields their base URLs."""
    env = process_env(SECRET_KEY=SECRET, DATA_DIR=str(tmp_path / "data"), **variables)
    if "DATABASE_URL" in variables:
        run_migrate(env)
    extra = ["--no-worker"] if "REDIS_URI" in variables else []
    ports = [free_port() for _ in range(count)]
    logs = [tmp_path / f"api-{index}.log" for index in range(count)]
    processes = [
        start_process([CLI, "serve", *extra, "--port", str(port)], env, log)
        for port, log in zip(ports, logs, strict=True)
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        await asyncio.gather(*(wait_http_ok_async(f"{url}/health", 30) for url in urls))
        yield urls
    finally:
        for proc in processes:
            stop_process(proc)
        for log in logs:
            print_log(log)


def assert_refusal(response: httpx.Response, scope: str) -> None:
    """A 429 in the one error shape, naming the limit, with the headers a client needs."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert error["details"]["limit"] == scope
    assert error["correlation_id"] == response.headers["x-correlation-id"]
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    assert error["details"]["retry_after"] == retry_after
    assert response.headers["ratelimit-remaining"] == "0"
    assert int(response.headers["ratelimit-limit"]) == error["details"]["per_minute"]


async def rejections(url: str, scope: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(f'nooble_orchestrator_rate_limit_rejections_total{{scope="{scope}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_tenant_limit_holds_across_two_instances_under_a_flood(
    tmp_path: Path, pg_database: str, redis_namespace: str
) -> None:
    per_minute = 40
    async with api_instances(
        tmp_path,
        2,
        DATABASE_URL=pg_database,
        REDIS_URI=REDIS_URL,
        REDIS_NAMESPACE=redis_namespace,
        AUTO_MIGRATE="false",
        TENANT_RATE_LIMIT=str(per_minute),
    ) as urls:
        flooders = [issue(tenant="tenant-flood", user=f"user-{index}") for index in range(10)]
        quiet = issue(tenant="tenant-quiet", user="user-q")
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        clients = [httpx.AsyncClient(base_url=url, limits=limits, timeout=30) for url in urls]
        gate = asyncio.Semaphore(200)  # 200 requests in flight, over 200 connections

        async def flood_one(index: int) -> httpx.Response:
            async with gate:
                client = clients[index % 2]
                return await client.get("/api/v1/sessions", headers=auth(flooders[index % 10]))

        async def quiet_load() -> list[httpx.Response]:
            answers = []
            for index in range(20):
                answers.append(
                    await clients[index % 2].get("/api/v1/sessions", headers=auth(quiet))
                )
                await asyncio.sleep(0.01)
            return answers

        try:
            started = time.monotonic()
            flood, calm = await asyncio.gather(
                asyncio.gather(*(flood_one(index) for index in range(1000))), quiet_load()
            )
            elapsed = time.monotonic() - started
        finally:
            for client in clients:
                await client.aclose()

        admitted = [response for response in flood if response.status_code == 200]
        refused = [response for response in flood if response.status_code != 200]
        # L1: never more than the limit plus what refilled meanwhile (one per 1.5 s).
        assert per_minute <= len(admitted) <= per_minute + int(elapsed / 1.5) + 1, elapsed
        for response in refused:
            assert_refusal(response, "tenant")
        # L3: the other tenant saw no refusal.
        assert [response.status_code for response in calm] == [200] * 20
        # Each refusal was counted by the instance that made it.
        counted = [await rejections(url, "tenant") for url in urls]
        assert sum(counted) == len(refused)
        assert all(count > 0 for count in counted), counted  # both instances refused some

    # L2: every key the limits left in Redis expires by itself.
    redis = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{redis_namespace}:rl:*")]
        assert keys
        for key in keys:
            assert 0 < await redis.pttl(key) <= 60_000, key
    finally:
        await redis.aclose()


async def test_a_forged_forwarded_for_does_not_change_the_address_limit(tmp_path: Path) -> None:
    async with api_instances(tmp_path, 1, IP_RATE_LIMIT="5") as (url,):
        async with httpx.AsyncClient(base_url=url) as http:
            # Credential stuffing from one address: bad tokens count against it too, and a
            # different X-Forwarded-For on each request changes nothing (no trusted proxy).
            statuses = []
            for index in range(5):
                response = await http.get(
                    "/api/v1/sessions",
                    headers={
                        "Authorization": f"Bearer guess-{index}",
                        "X-Forwarded-For": f"198.51.100.{index}",
                    },
                )
                statuses.append(response.status_code)
            assert statuses == [401] * 5
            forged = await http.get(
                "/api/v1/sessions",
                headers={"Authorization": "Bearer guess", "X-Forwarded-For": "198.51.100.99"},
            )
            assert_refusal(forged, "ip")
            # A valid token from the same address is refused by the same limit.
            assert_refusal(await http.get("/api/v1/sessions", headers=auth(issue())), "ip")
            # Probes, scrapes and the API document are not limited.
            for path in ("/health", "/metrics", "/openapi.json"):
                assert (await http.get(path)).status_code == 200, path
        assert await rejections(url, "ip") == 2


async def test_behind_a_trusted_proxy_each_client_address_has_its_own_limit(
    tmp_path: Path,
) -> None:
    async with (
        api_instances(tmp_path, 1, IP_RATE_LIMIT="2", TRUSTED_PROXIES="127.0.0.1") as (url,),
        httpx.AsyncClient(base_url=url) as http,
    ):

        async def from_client(address: str) -> httpx.Response:
            headers = {**auth(issue()), "X-Forwarded-For": address}
            return await http.get("/api/v1/sessions", headers=headers)

        assert (await from_client("203.0.113.7")).status_code == 200
        assert (await from_client("203.0.113.7")).status_code == 200
        assert_refusal(await from_client("203.0.113.7"), "ip")
        assert (await from_client("203.0.113.8")).status_code == 200


async def test_headers_count_down_and_a_websocket_turn_spends_the_same_limit(
    tmp_path: Path,
) -> None:
    async with api_instances(tmp_path, 1, USER_RATE_LIMIT="4") as (url,):
        token = issue(tenant="tenant-ws", user="user-1")
        async with httpx.AsyncClient(base_url=url) as http:
            remaining = []
            for _ in range(3):
                response = await http.get("/api/v1/sessions", headers=auth(token))
                assert response.status_code == 200
                assert response.headers["ratelimit-limit"] == "4"
                assert 1 <= int(response.headers["ratelimit-reset"]) <= 60
                remaining.append(response.headers["ratelimit-remaining"])
            assert remaining == ["3", "2", "1"]

            ws, _ = await open_authed(url.replace("http://", "ws://") + "/ws/v1", token)
            try:
                await send(ws, type="chat.send", message="fourth", request_id="r4", subscribe=False)
                ack = await recv(ws)
                assert (ack["type"], ack["data"]["for"]) == ("system.ack", "chat.send"), ack
                await send(ws, type="chat.send", message="fifth", request_id="r5", subscribe=False)
                refused = await recv(ws)
            finally:
                await ws.close()
            assert refused["type"] == "system.error", refused
            data: dict[str, Any] = refused["data"]
            assert (data["code"], data["request_id"], data["retryable"]) == (
                "rate_limited",
                "r5",
                True,
            )
            assert data["details"]["limit"] == "user"
            assert data["details"]["retry_after"] >= 1

            assert_refusal(await http.get("/api/v1/sessions", headers=auth(token)), "user")
            # Another user of the same tenant has a limit of their own.
            other = auth(issue(tenant="tenant-ws", user="user-2"))
            assert (await http.get("/api/v1/sessions", headers=other)).status_code == 200
        assert await rejections(url, "user") == 2
