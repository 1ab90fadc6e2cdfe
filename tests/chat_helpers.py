"""What the chat tests share: submitting a turn, waiting for it to settle, reading its
messages and events, over any httpx client (in-process ASGI app or a real server)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from agent_orchestrator.events.models import Event, EventType, StreamKey
from agent_orchestrator.models.task import TERMINAL
from tests.processes import parse_sse

CHAT = "/api/v1/chat"
TASKS = "/api/v1/tasks"
SESSIONS = "/api/v1/sessions"
TERMINAL_VALUES = {status.value for status in TERMINAL}


async def post_json(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], expect: int, body: Any
) -> Any:
    """POST `body` to `url`; assert the status; return the JSON answer."""
    response = await client.post(url, json=body, headers=headers)
    assert response.status_code == expect, response.text
    return response.json()


async def chat(
    client: httpx.AsyncClient, headers: dict[str, str], expect: int = 202, **body: Any
) -> Any:
    """POST /api/v1/chat with `body`; assert the status; return the JSON answer."""
    return await post_json(client, CHAT, headers, expect, body)


async def get_json(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> Any:
    """GET `url`; assert a 200; return the JSON answer."""
    response = await client.get(url, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def task_view(client: httpx.AsyncClient, headers: dict[str, str], task_id: str) -> Any:
    return await get_json(client, f"{TASKS}/{task_id}", headers)


async def settled(
    client: httpx.AsyncClient, headers: dict[str, str], task_id: str, timeout: float = 15.0
) -> Any:
    """Poll the task until it is terminal; return its view."""
    deadline = time.monotonic() + timeout
    while True:
        view = await task_view(client, headers, task_id)
        if view["status"] in TERMINAL_VALUES:
            return view
        assert time.monotonic() < deadline, f"task {task_id} still {view['status']}: {view}"
        await asyncio.sleep(0.02)


async def messages(client: httpx.AsyncClient, headers: dict[str, str], session_id: str) -> Any:
    response = await client.get(
        f"{SESSIONS}/{session_id}/messages", params={"limit": 100}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()["items"]


def event_frames(lines: list[str]) -> list[dict[str, Any]]:
    """The SSE frames that carry an event (not comments or `retry:`), each with its
    envelope decoded under `envelope`."""
    frames = [frame for frame in parse_sse(lines) if "event" in frame]
    for frame in frames:
        frame["envelope"] = json.loads(frame["data"])
    return frames


async def stream_turn(
    client: httpx.AsyncClient, headers: dict[str, str], **body: Any
) -> list[dict[str, Any]]:
    """A `mode=stream` turn: the event frames of its answer, read to the end."""
    async with client.stream(
        "POST", CHAT, json={**body, "mode": "stream"}, headers=headers
    ) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines()]
    return event_frames(lines)


def check_stream_shape(frames: list[dict[str, Any]]) -> str:
    """Chunks with indexes 0..n in order, then `chat.completed` holding their text, then a
    terminal `task.status` that says succeeded; `id:` cursors rising. Returns the reply."""
    assert frames, "no events"
    for frame in frames:
        assert frame["id"].isdigit(), frame
        assert frame["envelope"]["type"] == frame["event"]
        assert frame["envelope"]["id"] == frame["id"]
    ids = [int(frame["id"]) for frame in frames]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    kinds = [frame["event"] for frame in frames]
    assert kinds[-2:] == ["chat.completed", "task.status"], kinds
    chunks = [f["envelope"]["data"] for f in frames if f["event"] == "chat.stream"]
    assert len(chunks) >= 2, kinds
    assert [chunk["index"] for chunk in chunks] == list(range(len(chunks)))
    last_chunk = max(i for i, kind in enumerate(kinds) if kind == "chat.stream")
    assert last_chunk < kinds.index("chat.completed")
    reply = "".join(chunk["chunk"] for chunk in chunks)
    assert frames[-2]["envelope"]["data"]["content"] == reply
    assert frames[-1]["envelope"]["data"]["status"] == "succeeded"
    return reply


def _bus(client: httpx.AsyncClient) -> Any:
    return client.app.state.core.bus  # type: ignore[attr-defined]


async def events_of(client: httpx.AsyncClient, tenant: str, task_id: str) -> list[Event]:
    """Every event of a task up to its terminal status, from the in-process app's bus."""
    found: list[Event] = []
    stream = StreamKey("task", tenant, task_id)
    async with asyncio.timeout(10), _bus(client).subscribe(stream, 0) as events:
        async for event in events:
            found.append(event)
            if event.type == EventType.TASK_STATUS and event.data.get("status") in TERMINAL_VALUES:
                return found
    return found


async def first_chunk(client: httpx.AsyncClient, tenant: str, task_id: str) -> None:
    """Wait (on the in-process app's bus) until the task has streamed its first chunk."""
    stream = StreamKey("task", tenant, task_id)
    async with asyncio.timeout(10), _bus(client).subscribe(stream, 0) as events:
        async for event in events:
            if event.type == EventType.CHAT_STREAM:
                return
