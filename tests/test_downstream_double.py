"""The downstream test double speaks docs/contracts/ and injects the faults it promises.

The double runs as a real process (tests/doubles/process.py), so hangs, cut connections and
client disconnects happen on real sockets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.doubles.process import running_double

pytestmark = pytest.mark.e2e  # starts the double as a real process
SERVICE_TOKEN = "svc-token"
LLM_KEY = "llm-key"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def platform_headers(tenant: str = "acme", token: str = SERVICE_TOKEN) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "X-Tenant-ID": tenant,
        "X-Correlation-ID": "corr-1",
        "traceparent": TRACEPARENT,
    }


@pytest.fixture(scope="module")
def double_url() -> Iterator[str]:
    with running_double(seed=0) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def strict_url() -> Iterator[str]:
    with running_double(service_token=SERVICE_TOKEN, llm_api_key=LLM_KEY) as base_url:
        yield base_url


@pytest.fixture
def http(double_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=double_url, headers=platform_headers(), timeout=5) as client:
        client.post("/_control/reset").raise_for_status()
        yield client


def fault(client: httpx.Client, **spec: Any) -> None:
    client.post("/_control/faults", json=spec).raise_for_status()


def sse_payloads(lines: Iterator[str]) -> list[Any]:
    payloads = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def read_until_cut(response: httpx.Response) -> tuple[list[Any], bool]:
    """The payloads received, and whether the connection was cut mid-body."""
    lines: list[str] = []
    try:
        for line in response.iter_lines():
            lines.append(line)
    except httpx.RemoteProtocolError:
        return sse_payloads(iter(lines)), True
    return sse_payloads(iter(lines)), False


EXECUTION = {
    "agent": {"id": "default", "name": "Default agent", "system_prompt": "", "tools": []},
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "what is the weather"},
    ],
    "context": {"sources": []},
    "stream": True,
}


def chat_request(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "test-model", "messages": [{"role": "user", "content": content}], **extra}


# -- happy paths of every contract ------------------------------------------------------


def test_conversation_stores_in_order_per_tenant_and_is_idempotent(http: httpx.Client) -> None:
    url = "/v1/sessions/s1/messages"
    for i, role in enumerate(["user", "assistant", "user"]):
        body = {"id": f"m{i}", "role": role, "content": f"c{i}", "task_id": "t1", "metadata": {}}
        answer = http.post(url, json=body)
        assert (answer.status_code, answer.json()) == (201, {"id": f"m{i}"})
    repeat = http.post(url, json={"id": "m0", "role": "user", "content": "changed"})
    assert (repeat.status_code, repeat.json()) == (200, {"id": "m0"})

    messages = http.get(url).json()["messages"]
    assert [(m["id"], m["role"], m["content"]) for m in messages] == [
        ("m0", "user", "c0"),
        ("m1", "assistant", "c1"),
        ("m2", "user", "c2"),
    ]
    assert all(m["created_at"].endswith("Z") for m in messages)
    assert [m["id"] for m in http.get(url, params={"limit": 2}).json()["messages"]] == ["m1", "m2"]
    other_tenant = http.get(url, headers={"X-Tenant-ID": "globex"})
    assert other_tenant.json() == {"messages": []}
    bad = http.post(url, json={"id": "m9", "role": "robot", "content": "x"})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "validation_error"
    assert bad.json()["error"]["retryable"] is False


def test_agent_management_default_registered_and_unknown(http: httpx.Client) -> None:
    default = http.get("/v1/agents/default").json()
    assert set(default) == {
        "id",
        "name",
        "system_prompt",
        "model",
        "temperature",
        "knowledge",
        "tools",
        "requires",
    }
    agent = {
        "id": "researcher",
        "name": "Researcher",
        "system_prompt": "Cite sources.",
        "model": "gpt-x",
        "temperature": 0.2,
        "knowledge": {"collection_ids": ["docs"], "top_k": 3},
        "tools": ["echo"],
        "requires": ["query"],
    }
    assert http.post("/_control/agents", json=agent).status_code == 201
    assert http.get("/v1/agents/researcher").json() == agent

    missing = http.get("/v1/agents/nobody")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {"code": "not_found", "message": "agent 'nobody' not found", "retryable": False}
    }


def test_agent_execution_streams_chunks_then_done(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/executions", json=EXECUTION) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_payloads(response.iter_lines())
    chunks, done = events[:-1], events[-1]
    assert all(e["type"] == "chunk" for e in chunks)
    assert [e["index"] for e in chunks] == list(range(len(chunks)))
    assert "".join(e["content"] for e in chunks) == "double says: what is the weather"
    assert done["type"] == "done"
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == len(chunks)
    assert done["usage"]["prompt_tokens"] > 0


def test_query_embedding_tools_identity(http: httpx.Client) -> None:
    search = {"query": "refunds", "collection_ids": ["docs", "faq"], "top_k": 3}
    results = http.post("/v1/search", json=search).json()["results"]
    assert len(results) == 3
    assert set(results[0]) == {"title", "url", "snippet", "score"}
    assert results == sorted(results, key=lambda r: -r["score"])
    assert http.post("/v1/search", json={**search, "collection_ids": []}).json() == {"results": []}

    first = http.post("/v1/embeddings", json={"texts": ["a", "b"]}).json()
    again = http.post("/v1/embeddings", json={"texts": ["a"]}).json()
    assert first["model"]
    assert len(first["embeddings"]) == 2
    assert all(len(v) == 8 for v in first["embeddings"])
    assert again["embeddings"][0] == first["embeddings"][0] != first["embeddings"][1]

    tools = http.get("/v1/tools").json()["tools"]
    assert {"echo", "add"} <= {t["id"] for t in tools}
    assert all(set(t) == {"id", "name", "description", "parameters"} for t in tools)
    added = http.post("/v1/tools/add/invoke", json={"arguments": {"a": 2, "b": 3}})
    assert added.json() == {"result": 5}
    assert http.post("/v1/tools/nope/invoke", json={"arguments": {}}).status_code == 404

    active = http.post("/v1/introspect", json={"token": "tok:acme:alice:chat,read"}).json()
    assert active["active"] is True
    assert (active["sub"], active["tenant_id"], active["scopes"]) == (
        "alice",
        "acme",
        ["chat", "read"],
    )
    assert isinstance(active["exp"], int)
    assert http.post("/v1/introspect", json={"token": "garbage"}).json()["active"] is False


def test_ingestion_and_workflow_progress_to_a_final_status(http: httpx.Client) -> None:
    docs = {"documents": [{"id": "d1", "content": "text", "metadata": {}}]}
    created = http.post("/v1/ingestions", json=docs, headers={"Idempotency-Key": "k1"})
    assert created.status_code == 202
    job = created.json()
    assert job["status"] == "queued"
    repeat = http.post("/v1/ingestions", json=docs, headers={"Idempotency-Key": "k1"})
    assert repeat.json()["job_id"] == job["job_id"]
    statuses = [http.get(f"/v1/ingestions/{job['job_id']}").json()["status"] for _ in range(3)]
    assert statuses == ["running", "succeeded", "succeeded"]
    assert http.get("/v1/ingestions/job-404").status_code == 404

    started = http.post("/v1/workflows/wf-1/runs", json={"input": {"x": 1}})
    assert started.status_code == 202
    run_id = started.json()["run_id"]
    assert started.json()["status"] == "queued"
    running = http.get(f"/v1/runs/{run_id}").json()
    assert (running["status"], running["output"]) == ("running", None)
    done = http.get(f"/v1/runs/{run_id}").json()
    assert done == {
        "run_id": run_id,
        "status": "succeeded",
        "output": {"workflow_id": "wf-1", "input": {"x": 1}},
    }


def test_llm_non_streaming_completion(http: httpx.Client) -> None:
    body = http.post("/v1/chat/completions", json=chat_request(max_tokens=2)).json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "test-model"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "double says: "}
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_llm_stream_parses_like_openai(strict_url: str) -> None:
    with httpx.Client(base_url=f"{strict_url}/v1", timeout=5) as client:
        denied = client.post("/chat/completions", json=chat_request(stream=True))
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_api_key"
        assert denied.json()["error"]["type"] == "invalid_request_error"

        request = chat_request(stream=True, stream_options={"include_usage": True})
        headers = {"Authorization": f"Bearer {LLM_KEY}"}
        with client.stream("POST", "/chat/completions", json=request, headers=headers) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            payloads = sse_payloads(r.iter_lines())

    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] > 0
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert choices[0]["delta"]["role"] == "assistant"
    assert choices[-1]["finish_reason"] == "stop"
    assert all(c["finish_reason"] is None for c in choices[:-1])
    text = "".join(c["delta"].get("content") or "" for c in choices)
    assert text == "double says: hello there"


# -- headers and auth --------------------------------------------------------------------


def test_requests_are_recorded_with_headers_and_body(http: httpx.Client) -> None:
    http.post("/v1/search", json={"query": "q", "collection_ids": ["c"], "top_k": 1})
    http.get("/v1/agents/default")
    recorded = http.get("/_control/requests", params={"service": "query"}).json()
    assert recorded["count"] == 1
    request = recorded["requests"][0]
    assert (request["method"], request["path"]) == ("POST", "/v1/search")
    assert request["json"] == {"query": "q", "collection_ids": ["c"], "top_k": 1}
    headers = request["headers"]
    assert headers["authorization"] == f"Bearer {SERVICE_TOKEN}"
    assert headers["x-tenant-id"] == "acme"
    assert headers["x-correlation-id"] == "corr-1"
    assert headers["traceparent"] == TRACEPARENT
    assert isinstance(request["time"], float)
    assert http.get("/_control/requests").json()["count"] == 2


def test_service_token_and_tenant_are_enforced(strict_url: str) -> None:
    with httpx.Client(base_url=strict_url, timeout=5) as client:
        ok = client.get("/v1/agents/default", headers=platform_headers())
        assert ok.status_code == 200
        assert ok.headers["x-correlation-id"] == "corr-1"

        wrong = client.get("/v1/agents/default", headers=platform_headers(token="nope"))
        assert wrong.status_code == 401
        assert wrong.json()["error"] == {
            "code": "unauthorized",
            "message": "missing or invalid service token",
            "retryable": False,
        }
        no_tenant = {k: v for k, v in platform_headers().items() if k != "X-Tenant-ID"}
        missing = client.get("/v1/agents/default", headers=no_tenant)
        assert missing.status_code == 400
        assert missing.json()["error"]["retryable"] is False

        # The LLM endpoint takes its own key, and the control API takes none.
        llm = client.post(
            "/v1/chat/completions",
            json=chat_request(),
            headers={"Authorization": f"Bearer {LLM_KEY}"},
        )
        assert llm.status_code == 200
        assert client.get("/_control/streams").status_code == 200


# -- faults ------------------------------------------------------------------------------


def test_fail_times_then_recovery(http: httpx.Client) -> None:
    fault(http, service="conversation", status=503, fail_times=2)
    statuses = [http.get("/v1/sessions/s1/messages").status_code for _ in range(4)]
    assert statuses == [503, 503, 200, 200]
    failed = http.get("/_control/faults").json()["faults"][0]
    assert (failed["fail_times_remaining"], failed["injected"]) == (0, 2)
    assert http.get("/_control/requests", params={"service": "conversation"}).json()["count"] == 4
    # Other services are untouched.
    assert http.get("/v1/agents/default").status_code == 200


def test_429_carries_retry_after_and_a_retryable_error(http: httpx.Client) -> None:
    fault(http, service="query", status=429, retry_after=2, fail_times=1)
    search = {"query": "q", "collection_ids": ["c"], "top_k": 1}
    limited = http.post("/v1/search", json=search)
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    assert limited.json()["error"]["code"] == "rate_limited"
    assert limited.json()["error"]["retryable"] is True
    assert http.post("/v1/search", json=search).status_code == 200


def test_error_rate_is_seeded_and_repeatable(http: httpx.Client) -> None:
    def pattern() -> list[int]:
        fault(http, service="embedding", error_rate=0.5, status=500)
        return [http.post("/v1/embeddings", json={"texts": ["x"]}).status_code for _ in range(16)]

    first = pattern()
    assert first == pattern()
    assert {200, 500} == set(first)


def test_latency_is_added(http: httpx.Client) -> None:
    fault(http, service="tools", latency_ms=200)
    started = time.monotonic()
    assert http.get("/v1/tools").status_code == 200
    assert time.monotonic() - started >= 0.2


def test_cut_after_chunks_ends_streams_without_done(http: httpx.Client) -> None:
    fault(http, service="agent_execution", cut_after_chunks=2)
    with http.stream("POST", "/v1/executions", json=EXECUTION) as response:
        events, cut = read_until_cut(response)
    assert cut
    assert [e["type"] for e in events] == ["chunk", "chunk"]

    fault(http, service="llm", cut_after_chunks=1, fail_times=1)
    with http.stream("POST", "/v1/chat/completions", json=chat_request(stream=True)) as r:
        payloads, cut = read_until_cut(r)
    assert cut
    assert "[DONE]" not in payloads
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads)
    # fail_times=1: the next stream is whole again.
    with http.stream("POST", "/v1/chat/completions", json=chat_request(stream=True)) as r:
        payloads, cut = read_until_cut(r)
    assert not cut
    assert payloads[-1] == "[DONE]"

    report = http.get("/_control/streams").json()
    assert (report["opened"], report["cut"], report["completed"]) == (3, 2, 1)


def test_error_after_chunks_sends_an_error_event(http: httpx.Client) -> None:
    fault(http, service="agent_execution", error_after_chunks=1, status=503)
    with http.stream("POST", "/v1/executions", json=EXECUTION) as response:
        events = sse_payloads(response.iter_lines())
    assert [e["type"] for e in events] == ["chunk", "error"]
    assert events[1]["code"] == "service_unavailable"
    assert events[1]["retryable"] is True


def test_hang_makes_the_client_time_out(http: httpx.Client, double_url: str) -> None:
    fault(http, service="query", hang=True)
    search = {"query": "q", "collection_ids": ["c"], "top_k": 1}
    started = time.monotonic()
    with (
        httpx.Client(base_url=double_url, timeout=0.5) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.post("/v1/search", json=search)
    assert time.monotonic() - started < 2
    assert http.get("/_control/requests", params={"service": "query"}).json()["count"] == 1


def test_client_closing_a_stream_early_is_reported(http: httpx.Client) -> None:
    fault(http, service="llm", chunk_delay_ms=100)
    long_message = " ".join(f"word{i}" for i in range(30))
    with http.stream("POST", "/v1/chat/completions", json=chat_request(long_message, stream=True)):
        pass  # closes after the headers, while the double is still streaming
    deadline = time.monotonic() + 2
    report = http.get("/_control/streams", params={"service": "llm"}).json()
    while report["client_disconnected"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        report = http.get("/_control/streams", params={"service": "llm"}).json()
    assert (report["opened"], report["client_disconnected"], report["active"]) == (1, 1, 0)
    assert report["streams"][0]["chunks_sent"] < 30


def test_reset_clears_faults_records_and_state(http: httpx.Client) -> None:
    fault(http, service="identity", status=500)
    http.post("/v1/sessions/s1/messages", json={"id": "m1", "role": "user", "content": "x"})
    http.post("/_control/reset").raise_for_status()
    assert http.get("/_control/faults").json() == {"faults": []}
    assert http.get("/_control/requests").json()["count"] == 0
    assert http.get("/v1/sessions/s1/messages").json() == {"messages": []}
    assert http.post("/v1/introspect", json={"token": "x"}).status_code == 200
