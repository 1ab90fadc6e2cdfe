"""`/ws/v1` across instances, on real processes: two `agent-orchestrator serve --no-worker`
API instances and one `agent-orchestrator worker`, on PostgreSQL and Redis. Events cross
from the worker to either instance through Redis (one Pub/Sub connection per process)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from agent_orchestrator.middleware.auth import TokenVerifier
from tests.conftest import REDIS_URL, auth, token_factory
from tests.processes import (
    CLI,
    free_port,
    print_log,
    process_env,
    read_log,
    run_migrate,
    start_process,
    stop_process,
    wait_http_ok_async,
    worker_started,
)
from tests.ws_helpers import Message, is_terminal, open_authed, recv, recv_until, send

pytestmark = pytest.mark.e2e

SECRET = "e2e-ws-secret-key-0123456789abcdef0123456789abcdef"
SERVICE_TOKEN = "e2e-ws-service-token"


@dataclass
class Stack:
    api_a: str
    api_b: str
    token: str

    def ws(self, api: str) -> str:
        return api.replace("http://", "ws://") + "/ws/v1"

    async def new_session(self) -> str:
        async with httpx.AsyncClient(base_url=self.api_a) as http:
            response = await http.post("/api/v1/sessions", json={}, headers=auth(self.token))
            assert response.status_code == 201, response.text
            return str(response.json()["id"])


@pytest.fixture
async def stack(tmp_path: Path, pg_database: str, redis_namespace: str) -> AsyncIterator[Stack]:
    env = process_env(
        DATABASE_URL=pg_database,
        REDIS_URI=REDIS_URL,
        REDIS_NAMESPACE=redis_namespace,
        SECRET_KEY=SECRET,
        SERVICE_TOKEN=SERVICE_TOKEN,
        AUTO_MIGRATE="false",
        LOG_LEVEL="INFO",
        ECHO_CHUNK_DELAY="0.04",
        DATA_DIR=str(tmp_path / "data"),
    )
    run_migrate(env)
    logs = {name: tmp_path / f"{name}.log" for name in ("worker", "api-a", "api-b")}
    ports = {name: free_port() for name in ("api-a", "api-b")}
    processes = [start_process([CLI, "worker"], env, logs["worker"])]
    for name, port in ports.items():
        args = [CLI, "serve", "--no-worker", "--port", str(port)]
        processes.append(start_process(args, env, logs[name]))
    try:
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        await asyncio.gather(
            *(wait_http_ok_async(f"{url}/health", 30) for url in urls.values()),
            worker_started(logs["worker"], 30, alive=processes),
        )
        token = token_factory(TokenVerifier(SECRET))(tenant="tenant-ws", user="user-ws")
        yield Stack(urls["api-a"], urls["api-b"], token)
    finally:
        for proc in processes:
            stop_process(proc)
        for log in logs.values():
            print_log(log)
    for name, log in logs.items():
        errors = [line for line in read_log(log).splitlines() if '"level": "error"' in line]
        assert errors == [], (name, errors[:3])


def _of_task(task_id: str) -> Callable[[Message], bool]:
    def accept(message: Message) -> bool:
        return message.get("task_id") == task_id and is_terminal(message)

    return accept


async def _turn_on(ws: ClientConnection, session_id: str, text: str) -> tuple[str, list[Message]]:
    await send(ws, type="chat.send", message=text, session_id=session_id, request_id="turn")
    ack = await recv(ws)
    assert ack["data"]["for"] == "chat.send", ack
    return ack["task_id"], await recv_until(ws, is_terminal, timeout=30)


async def test_a_turn_sent_on_instance_a_streams_to_a_subscriber_on_instance_b(
    stack: Stack,
) -> None:
    session_id = await stack.new_session()
    watcher, _ = await open_authed(stack.ws(stack.api_b), stack.token)
    await send(watcher, type="subscribe", session_id=session_id)
    assert (await recv(watcher))["data"]["for"] == "subscribe"
    sender, _ = await open_authed(stack.ws(stack.api_a), stack.token)

    task_id, on_a = await _turn_on(sender, session_id, "across two instances we go")
    on_b = await recv_until(watcher, _of_task(task_id), timeout=30)

    def content(events: list[Message]) -> list[Message]:
        return [e for e in events if e["type"] in ("chat.stream", "chat.completed")]

    assert len(content(on_a)) >= 10
    assert content(on_b) == content(on_a)  # same events, same ids, same order
    assert [e["id"] for e in on_b if e["task_id"] == task_id] == [e["id"] for e in on_a]
    assert "across two instances we go" in content(on_b)[-1]["data"]["content"]
    await sender.close()
    await watcher.close()


async def test_an_event_a_service_publishes_on_instance_a_reaches_a_socket_on_instance_b(
    stack: Stack,
) -> None:
    """`POST /internal/v1/sessions/{id}/events` (a workflow's progress, say) travels like
    the service's own events: to the session's subscribers on every instance."""
    session_id = await stack.new_session()
    watcher, _ = await open_authed(stack.ws(stack.api_b), stack.token)
    await send(watcher, type="subscribe", session_id=session_id)
    assert (await recv(watcher))["data"]["for"] == "subscribe"
    service = {"Authorization": f"Bearer {SERVICE_TOKEN}", "X-Tenant-ID": "tenant-ws"}
    async with httpx.AsyncClient(base_url=stack.api_a) as http:
        response = await http.post(
            f"/internal/v1/sessions/{session_id}/events",
            json={"type": "workflow.progress", "data": {"step": 1}},
            headers=service,
        )
    assert response.status_code == 202, response.text
    received = await recv(watcher, timeout=10)
    assert received["id"] == response.json()["id"]
    assert received["type"] == "workflow.progress"
    assert received["session_id"] == session_id
    assert received["tenant_id"] == "tenant-ws"
    assert received["data"] == {"step": 1}
    await watcher.close()


async def test_a_client_that_reconnects_with_after_gets_exactly_what_it_missed(
    stack: Stack,
) -> None:
    session_id = await stack.new_session()
    reference, _ = await open_authed(stack.ws(stack.api_b), stack.token)
    leaving, _ = await open_authed(stack.ws(stack.api_b), stack.token)
    for ws in (reference, leaving):
        await send(ws, type="subscribe", session_id=session_id)
        assert (await recv(ws))["data"]["for"] == "subscribe"
    sender, _ = await open_authed(stack.ws(stack.api_a), stack.token)
    await send(sender, type="chat.send", message="resume me " * 4, session_id=session_id)
    task_id = (await recv(sender))["task_id"]

    seen = await recv_until(
        leaving, lambda m: m["type"] == "chat.stream" and m["data"]["index"] == 2, timeout=30
    )
    last_id = seen[-1]["id"]
    leaving.transport.abort()  # gone mid-stream, no goodbye

    back, _ = await open_authed(stack.ws(stack.api_a), stack.token)  # the other instance
    await send(back, type="subscribe", session_id=session_id, after=last_id)
    assert (await recv(back))["data"]["after"] == last_id
    resumed = await recv_until(back, _of_task(task_id), timeout=30)
    everything = await recv_until(reference, _of_task(task_id), timeout=30)

    assert everything[: len(seen)] == seen
    assert resumed == everything[len(seen) :]  # exactly the missed ones, in order
    assert int(resumed[0]["id"]) > int(last_id)
    assert any(e["type"] == "chat.stream" for e in resumed)
    assert resumed[-1]["data"]["status"] == "succeeded"
    # The sender follows its own turn (and a client that leaves messages unread would
    # not read the server's close reply either).
    await recv_until(sender, _of_task(task_id), timeout=30)
    for ws in (reference, back, sender):
        await ws.close()
