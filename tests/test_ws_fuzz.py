"""Fuzzing `/ws/v1` with hypothesis against a real `agent-orchestrator serve` process:
arbitrary JSON, message-shaped objects with wrong types, unknown types, raw text and big
strings under the size cap. Every message gets exactly one direct answer (a bad one a
`system.error`), the server logs no error, and another socket keeps working."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from agent_orchestrator.websocket.events import CLIENT_TYPES
from tests.conftest import token_factory
from tests.processes import (
    CLI,
    free_port,
    print_log,
    process_env,
    read_log,
    start_process,
    stop_process,
    wait_http_ok,
)

pytestmark = pytest.mark.e2e

SECRET = "fuzz-secret-key-0123456789abcdef0123456789abcdef"
FRAME_CAP = 65_536
DIRECT_REPLIES = {"system.error", "system.ack", "system.pong"}
#: Not "auth": a bad token on an open socket closes it (1008), by design.
FUZZED_TYPES = [kind for kind in CLIENT_TYPES if kind != "auth"]


class Target:
    """The server process and two sockets: one fuzzed, one that must stay healthy."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.sockets = contextlib.ExitStack()
        self.fuzzed = self.open()
        self.healthy = self.open()
        self.sent = 0

    def open(self) -> ClientConnection:
        ws = self.sockets.enter_context(connect(self.url, open_timeout=10, max_size=2**22))
        ws.send(json.dumps({"type": "auth", "token": self.token}))
        hello = json.loads(ws.recv(timeout=5))
        assert hello["data"]["for"] == "auth", hello
        return ws

    def exchange(self, frame: str) -> list[dict[str, Any]]:
        """Send `frame`, then a marker ping; the direct answers before the marker's pong
        (events from the bus, which carry an id, are set aside)."""
        self.sent += 1
        marker = f"marker-{self.sent}"
        self.fuzzed.send(frame)
        self.fuzzed.send(json.dumps({"type": "system.ping", "request_id": marker}))
        answers = []
        deadline = time.monotonic() + 10
        while True:
            message = json.loads(self.fuzzed.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message["id"]:
                continue  # an event of a task this fuzzer started
            if message["type"] == "system.pong" and message["data"]["request_id"] == marker:
                return answers
            answers.append(message)

    def healthy_ping(self) -> None:
        self.healthy.send(json.dumps({"type": "system.ping", "request_id": "h"}))
        while True:
            message = json.loads(self.healthy.recv(timeout=5))
            if message["type"] == "system.pong":
                return


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    from agent_orchestrator.middleware.auth import TokenVerifier

    tmp: Path = tmp_path_factory.mktemp("ws-fuzz")
    port = free_port()
    env = process_env(
        DATA_DIR=str(tmp / "data"),
        SECRET_KEY=SECRET,
        LOG_LEVEL="INFO",
        WS_MESSAGES_PER_SECOND="10000",
        WS_MAX_FRAME_BYTES=str(FRAME_CAP),
    )
    log = tmp / "serve.log"
    proc = start_process([CLI, "serve", "--port", str(port)], env, log)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=30, proc=proc)
        token = token_factory(TokenVerifier(SECRET))(tenant="fuzz", user="fuzzer", ttl=3600)
        fuzz = Target(f"ws://127.0.0.1:{port}/ws/v1", token)
        yield fuzz
        fuzz.healthy_ping()
        fuzz.sockets.close()
    finally:
        stop_process(proc)
        print_log(log)
    text = read_log(log, limit=10_000_000)
    assert '"service ready"' in text  # the log is the JSON one this check reads
    problems = [
        line
        for line in text.splitlines()
        if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line
    ]
    assert problems == [], "\n".join(problems[:5])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
ids = st.one_of(st.uuids().map(str), st.text(max_size=40), st.integers(), st.none())
shaped = st.fixed_dictionaries(
    {"type": st.sampled_from([*FUZZED_TYPES, "auth ", "chat", "SUBSCRIBE", "system.pong", ""])},
    optional={
        "message": st.one_of(st.text(max_size=80), json_values),
        "session_id": ids,
        "task_id": ids,
        "after": st.one_of(st.text(max_size=25), st.integers(), st.none()),
        "request_id": st.one_of(st.text(max_size=140), st.integers()),
        "mode": st.one_of(st.sampled_from(["async", "wait", "stream", "loud"]), json_values),
        "metadata": json_values,
        "subscribe": json_values,
        "extra": json_values,
    },
)
big_strings = st.integers(min_value=1_000, max_value=FRAME_CAP - 200).map(
    lambda size: json.dumps({"type": "chat.send", "message": "y" * size, "mode": "loud"})
)
frames = st.one_of(
    json_values.map(json.dumps),
    shaped.map(json.dumps),
    st.text(max_size=200),
    big_strings,
    st.sampled_from(["", "{", "null", '{"type": "subscribe", "after": NaN}', "[" * 5000]),
)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same few hundred messages on every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frame=frames)
def test_every_fuzzed_message_is_answered_and_nothing_breaks(target: Target, frame: str) -> None:
    assert len(frame.encode()) < FRAME_CAP
    try:
        answers = target.exchange(frame)
    except ConnectionClosed as closed:  # pragma: no cover - reported with the frame
        raise AssertionError(f"closed ({closed}) after {frame[:200]!r}") from closed
    assert len(answers) == 1, (frame[:200], answers)
    assert answers[0]["type"] in DIRECT_REPLIES, (frame[:200], answers)
    try:
        parsed = json.loads(frame)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict) or parsed.get("type") not in CLIENT_TYPES:
        assert answers[0]["type"] == "system.error", (frame[:200], answers)
        assert answers[0]["data"]["code"] in {"bad_request", "validation_error", "unknown_type"}
    if target.sent % 50 == 0:
        target.healthy_ping()


def test_fuzzing_left_the_server_serving(target: Target) -> None:
    """Runs after the fuzzing (same module, same process): a new socket works too."""
    ws = target.open()
    ws.send(json.dumps({"type": "subscribe", "task_id": str(uuid.uuid4())}))
    assert json.loads(ws.recv(timeout=5))["data"]["code"] == "not_found"
