"""W3C Trace Context from the client to the downstream services: the parsing rules of the
recommendation, and a chat turn whose every downstream call (recorded by the test double,
a real process) continues the client's trace with a parent id of this service."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest

from agent_orchestrator.config import Settings
from agent_orchestrator.observability import tracing
from agent_orchestrator.observability.trace_context import continue_trace, parse_traceparent
from tests.chat_helpers import chat
from tests.conftest import LLM_KEY, TokenFactory, auth, running_app
from tests.doubles.otlp import otlp_receiver
from tests.doubles.process import service_env

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SHAPE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (VALID, VALID),
        (f" {VALID}\t", VALID),  # optional whitespace around the value
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", VALID[:-2] + "00"),
        # A later version may add fields: read as version 00, the rest dropped.
        ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever", VALID),
        (VALID.upper(), None),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        (f"{VALID}-extra", None),  # version 00 has exactly four fields
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),
        ("not a trace", None),
        ("", None),
    ],
)
def test_parsing_follows_the_recommendation(header: str, expected: str | None) -> None:
    assert parse_traceparent(header) == expected


def test_continuing_keeps_the_trace_and_flags_and_takes_a_parent_of_its_own() -> None:
    sampled_out = VALID[:-2] + "00"
    sent = continue_trace(sampled_out)
    found = SHAPE.fullmatch(sent)
    assert found is not None
    assert found.group(1) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert found.group(2) != "00f067aa0ba902b7"
    assert found.group(3) == "00"
    assert continue_trace(sampled_out) != sent  # a new parent each time
    for stored in (None, "garbage", 42):
        fresh = SHAPE.fullmatch(continue_trace(stored))
        assert fresh is not None, stored


async def test_downstream_calls_continue_the_clients_trace(
    make_settings: Callable[..., Settings], token: TokenFactory, double_url: str
) -> None:
    env = service_env(double_url, llm_api_key=LLM_KEY)
    variables = {name.lower(): value for name, value in env.items()}
    async with (
        running_app(make_settings(**variables)) as client,
        httpx.AsyncClient(base_url=double_url) as control,
    ):
        headers = auth(token())

        async def downstream_traces(correlation_id: str, header: str | None) -> list[str]:
            sent = {**headers, "X-Correlation-ID": correlation_id}
            if header is not None:
                sent["traceparent"] = header
            waited = await chat(client, sent, expect=200, message="traced", mode="wait")
            assert waited["task"]["status"] == "succeeded", waited
            recorded = (await control.get("/_control/requests")).json()["requests"]
            return [
                request["headers"]["traceparent"]
                for request in recorded
                if request["headers"].get("x-correlation-id") == correlation_id
            ]

        traced = await downstream_traces("trace-kept", VALID)
        assert len(traced) >= 4  # history, agent, execution, saves
        for header in traced:
            found = SHAPE.fullmatch(header)
            assert found is not None, header
            assert found.group(1) == "4bf92f3577b34da6a3ce929d0e0e4736"
            assert found.group(2) != "00f067aa0ba902b7"
            assert found.group(3) == "01"

        # An invalid header is ignored, not refused: the turn gets a trace of its own.
        invalid = VALID.upper()
        fresh = await downstream_traces("trace-invalid", invalid)
        trace_ids = {SHAPE.fullmatch(header).group(1) for header in fresh}  # type: ignore[union-attr]
        assert len(trace_ids) == 1
        assert trace_ids != {"4bf92f3577b34da6a3ce929d0e0e4736"}


async def test_spans_are_exported_as_one_tree_under_the_clients_span(
    make_settings: Callable[..., Settings], token: TokenFactory, double_url: str
) -> None:
    env = service_env(double_url, llm_api_key=LLM_KEY)
    variables = {name.lower(): value for name, value in env.items()}
    with otlp_receiver() as (collector, received):
        settings = make_settings(otel_exporter_otlp_endpoint=collector, **variables)
        async with httpx.AsyncClient(base_url=double_url) as control:
            await control.delete("/_control/requests")
            # The conversation service fails: its optional steps degrade, the turn succeeds.
            fault = {"service": "conversation", "status": 500}
            assert (await control.post("/_control/faults", json=fault)).status_code == 200
            try:
                async with running_app(settings) as client:
                    sent = {**auth(token()), "traceparent": VALID, "X-Correlation-ID": "spans"}
                    waited = await chat(client, sent, expect=200, message="spans", mode="wait")
                    assert waited["task"]["status"] == "succeeded", waited
            finally:
                await control.delete("/_control/faults")
            # The app has stopped: its last spans were sent on the way out.
            recorded = (await control.get("/_control/requests")).json()["requests"]
        assert tracing.TRACER is None
    spans = [span for span in received.spans if span["trace_id"] == VALID[3:35]]
    by_name = {span["name"]: span for span in spans}
    server = by_name["POST /api/v1/chat"]
    assert server["kind"] == "server"
    assert server["parent_span_id"] == VALID[36:52]  # the client's span
    assert server["attributes"]["http.response.status_code"] == 200
    assert server["service"] == "agent-orchestrator"
    turn = by_name["chat.turn"]
    assert turn["parent_span_id"] == server["span_id"]
    assert turn["attributes"]["task.id"] == waited["task"]["id"]
    steps = {name: span for name, span in by_name.items() if name.startswith("step ")}
    assert {"step history", "step agent", "step generate"} <= set(steps)
    for step in steps.values():
        assert step["parent_span_id"] == turn["span_id"]
        assert step["kind"] == "client"
    error = 2  # OTLP's STATUS_CODE_ERROR
    assert steps["step history"]["status"] == error  # degraded, raised nothing
    assert steps["step generate"]["status"] != error
    assert turn["status"] != error
    # Each downstream call names its step's span as its parent.
    step_ids = {span["span_id"] for span in steps.values()}
    calls = [r for r in recorded if r["headers"].get("x-correlation-id") == "spans"]
    assert calls
    for call in calls:
        found = SHAPE.fullmatch(call["headers"]["traceparent"])
        assert found is not None
        assert found.group(1) == VALID[3:35]
        assert found.group(2) in step_ids, call["path"]
