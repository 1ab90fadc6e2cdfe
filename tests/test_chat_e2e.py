"""Chat end to end on real processes (issue 4): PostgreSQL, Redis, the downstream test
double, one `agent-orchestrator serve --no-worker` API process and one separate
`agent-orchestrator worker`. Every downstream service is configured by URL and points at
the double; the replies' tokens come from the double's streams ("double says: ...").

Two set-ups: agent execution as its own service (`POST /v1/executions`), and agent
execution local on the double's OpenAI-compatible endpoint (`LLM_BASE_URL`).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent_orchestrator.config import Settings
from agent_orchestrator.state import build_verifier
from tests.chat_helpers import (
    chat,
    check_stream_shape,
    messages,
    settled,
    stream_turn,
    task_view,
)
from tests.conftest import REDIS_URL, auth, token_factory
from tests.doubles.process import running_double, service_env
from tests.processes import (
    CLI,
    free_port,
    print_log,
    process_env,
    run_migrate,
    start_process,
    stop_process,
    wait_http_ok_async,
    wait_until,
    worker_started,
)

pytestmark = pytest.mark.e2e

SERVICE_TOKEN = "e2e-service-token"
LLM_KEY = "e2e-llm-key"
TENANT = "tenant-e2e"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-[0-9a-f]{16}-0[01]$")


@dataclass
class Stack:
    api: httpx.AsyncClient
    double: httpx.AsyncClient
    headers: dict[str, str]

    async def recorded(self, service: str | None = None) -> list[dict[str, Any]]:
        params = {"service": service} if service else {}
        response = await self.double.get("/_control/requests", params=params)
        return list(response.json()["requests"])


@pytest.fixture
def double() -> Iterator[str]:
    with running_double(service_token=SERVICE_TOKEN, llm_api_key=LLM_KEY) as base_url:
        yield base_url


@pytest.fixture
def start_stack(
    tmp_path: Path,
    pg_database: str,
    redis_namespace: str,
    double: str,
    make_settings: Callable[..., Settings],
) -> Callable[..., Any]:
    """`async with start_stack(**env) as stack`: migrate, then a worker and an API process
    (stopped and their logs printed at the end), and clients for the API and the double."""

    @asynccontextmanager
    async def start(**extra: str) -> AsyncIterator[Stack]:
        settings = make_settings()
        env = process_env(
            DATABASE_URL=pg_database,
            REDIS_URI=REDIS_URL,
            REDIS_NAMESPACE=redis_namespace,
            SECRET_KEY=settings.resolved_secret_key(),
            SERVICE_TOKEN=SERVICE_TOKEN,
            AUTO_MIGRATE="false",
            LOG_LEVEL="WARNING",
            LEASE_TTL="3",
            RECONCILE_INTERVAL="1",
            DATA_DIR=str(tmp_path / "data"),
            **service_env(double, llm_api_key=LLM_KEY),
        )
        for name, value in extra.items():
            if value == "":
                env.pop(name, None)
            else:
                env[name] = value
        run_migrate(env)

        processes: list[tuple[subprocess.Popen[bytes], Path]] = []
        try:
            worker_log = tmp_path / "worker.log"
            worker = start_process([CLI, "worker"], env, worker_log)
            processes.append((worker, worker_log))
            port = free_port()
            api_log = tmp_path / "api.log"
            api = start_process([CLI, "serve", "--no-worker", "--port", str(port)], env, api_log)
            processes.append((api, api_log))
            base_url = f"http://127.0.0.1:{port}"
            await worker_started(worker_log, 20, alive=[worker])
            await wait_http_ok_async(f"{base_url}/health/ready", timeout=20, proc=api)

            token = token_factory(build_verifier(settings))(tenant=TENANT, user="user-e2e")
            async with (
                httpx.AsyncClient(base_url=base_url, timeout=30) as api_client,
                httpx.AsyncClient(base_url=double, timeout=10) as double_client,
            ):
                yield Stack(api_client, double_client, auth(token))
            for proc, _ in processes:
                assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
        finally:
            for proc, log in processes:
                stop_process(proc)
                print_log(log)

    return start


async def wait_answers(api: httpx.AsyncClient) -> dict[str, float]:
    """The API's count of mode=wait answers by source (handed over or read back)."""
    text = (await api.get("/metrics")).text
    found = re.findall(r'chat_wait_answers_total\{source="(\w+)"\} ([0-9.e+]+)', text)
    return {source: float(value) for source, value in found}


def turn(headers: dict[str, str], correlation_id: str) -> dict[str, str]:
    return {**headers, "X-Correlation-ID": correlation_id}


TURNS = {"e2e-wait", "e2e-stream", "e2e-async"}


def check_platform_headers(requests: list[dict[str, Any]], correlation_ids: set[str]) -> None:
    """Every call to a platform service carried the service token, the tenant, the
    correlation id of the client request that caused it (carried through the queue to
    the worker) and a W3C traceparent, one trace per turn."""
    assert requests
    traces: dict[str, set[str]] = {}
    for request in requests:
        headers = request["headers"]
        assert headers.get("authorization") == f"Bearer {SERVICE_TOKEN}", request
        assert headers.get("x-tenant-id") == TENANT, request
        assert headers.get("x-correlation-id") in correlation_ids, request
        found = TRACEPARENT.match(headers.get("traceparent", ""))
        assert found, request
        traces.setdefault(headers["x-correlation-id"], set()).add(found.group(1))
    assert all(len(ids) == 1 for ids in traces.values()), traces
    assert set(traces) == correlation_ids, traces


async def test_three_modes_through_api_worker_and_double(
    start_stack: Callable[..., Any],
) -> None:
    async with start_stack() as stack:
        h = stack.headers
        waited = await chat(
            stack.api, turn(h, "e2e-wait"), expect=200, message="hello from wait", mode="wait"
        )
        assert waited["task"]["status"] == "succeeded", waited
        assert waited["message"]["content"] == "double says: hello from wait"
        session_id = waited["task"]["session_id"]
        # The worker handed the answer over through Redis (no read-back by the API), and
        # it is what the database holds.
        assert await wait_answers(stack.api) == {"handed_over": 1.0}
        assert waited["task"] == await task_view(stack.api, h, waited["task"]["id"])
        assert (await messages(stack.api, h, session_id))[-1] == waited["message"]

        frames = await stream_turn(
            stack.api, turn(h, "e2e-stream"), message="hello from stream", session_id=session_id
        )
        assert check_stream_shape(frames) == "double says: hello from stream"

        accepted = await chat(
            stack.api, turn(h, "e2e-async"), message="hello from async", session_id=session_id
        )
        assert accepted["session_id"] == session_id
        view = await settled(stack.api, h, accepted["task_id"])
        assert view["status"] == "succeeded", view
        assert view["result"]["content"] == "double says: hello from async"
        calls = {call["step"]: call for call in view["service_calls"]}
        assert set(calls) == {
            "history",
            "agent",
            "knowledge",
            "generate",
            "save_user_message",
            "save_reply",
        }
        assert calls["knowledge"]["status"] == "skipped"
        assert all(
            call["status"] == "succeeded" for step, call in calls.items() if step != "knowledge"
        ), calls

        # Our copy of the conversation, in order.
        stored = await messages(stack.api, h, session_id)
        assert [m["role"] for m in stored] == ["user", "assistant"] * 3
        assert [m["content"] for m in stored if m["role"] == "assistant"] == [
            "double says: hello from wait",
            "double says: hello from stream",
            "double says: hello from async",
        ]

        # The double's copy: each turn was saved there, and the last turn's execution
        # request carried the two earlier turns as history.
        executions = await stack.recorded("agent_execution")
        assert len(executions) == 3
        last = executions[-1]["json"]
        assert [(m["role"], m["content"]) for m in last["messages"]] == [
            ("user", "hello from wait"),
            ("assistant", "double says: hello from wait"),
            ("user", "hello from stream"),
            ("assistant", "double says: hello from stream"),
            ("user", "hello from async"),
        ]
        assert last["agent"]["id"] == "default"
        assert await stack.recorded("llm") == []  # agent execution is its own service here

        check_platform_headers(await stack.recorded(), TURNS)
        streams = (await stack.double.get("/_control/streams")).json()
        assert streams["completed"] == 3
        assert streams["client_disconnected"] == 0


async def test_cancel_crosses_processes_and_closes_the_downstream_stream(
    start_stack: Callable[..., Any],
) -> None:
    async with start_stack() as stack:
        h = stack.headers
        fault = {"service": "agent_execution", "chunk_delay_ms": 200}
        assert (await stack.double.post("/_control/faults", json=fault)).status_code == 200
        accepted = await chat(stack.api, h, message=" ".join(f"w{i}" for i in range(40)))

        async def streaming() -> bool:
            report = (await stack.double.get("/_control/streams")).json()
            return bool(report["streams"]) and report["streams"][0]["chunks_sent"] >= 1

        await wait_until(streaming, 10, message="the execution stream to start")
        asked = time.monotonic()
        response = await stack.api.post(f"/api/v1/chat/{accepted['task_id']}/cancel", headers=h)
        assert response.status_code == 202, response.text

        async def disconnected() -> Any:
            report = (await stack.double.get("/_control/streams")).json()
            return report if report["active"] == 0 else None

        report = await wait_until(disconnected, 5, message="the stream to close")
        assert time.monotonic() - asked < 1.0
        assert report["client_disconnected"] == 1, report
        view = await settled(stack.api, h, accepted["task_id"], timeout=5)
        assert view["status"] == "cancelled", view
        assert [m["role"] for m in await messages(stack.api, h, accepted["session_id"])] == ["user"]


async def test_local_agent_execution_streams_from_the_openai_compatible_endpoint(
    start_stack: Callable[..., Any],
) -> None:
    async with start_stack(AGENT_EXECUTION_SERVICE_URL="", LLM_MODEL="double-7b") as stack:
        h = stack.headers
        waited = await chat(
            stack.api, turn(h, "e2e-wait"), expect=200, message="hi model", mode="wait"
        )
        assert waited["task"]["status"] == "succeeded", waited
        assert waited["message"]["content"] == "double says: hi model"
        assert waited["message"]["metadata"]["model"] == "double-7b"
        usage = waited["message"]["metadata"]["usage"]
        assert usage["completion_tokens"] == 4

        frames = await stream_turn(
            stack.api,
            turn(h, "e2e-stream"),
            message="and stream it",
            session_id=waited["task"]["session_id"],
        )
        assert check_stream_shape(frames) == "double says: and stream it"

        accepted = await chat(stack.api, turn(h, "e2e-async"), message="async too")
        view = await settled(stack.api, h, accepted["task_id"])
        assert view["status"] == "succeeded", view
        assert view["result"]["content"] == "double says: async too"

        completions = await stack.recorded("llm")
        assert len(completions) == 3
        for request in completions:
            assert request["path"] == "/v1/chat/completions"
            assert request["headers"]["authorization"] == f"Bearer {LLM_KEY}"
            assert request["json"]["stream"] is True
            assert request["json"]["model"] == "double-7b"
        second = completions[1]["json"]["messages"]
        assert [(m["role"], m["content"]) for m in second] == [
            ("system", "You are a helpful assistant."),
            ("user", "hi model"),
            ("assistant", "double says: hi model"),
            ("user", "and stream it"),
        ]
        assert await stack.recorded("agent_execution") == []
        platform = [r for r in await stack.recorded() if r["service"] != "llm"]
        check_platform_headers(platform, TURNS)
