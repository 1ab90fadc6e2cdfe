"""The batch API on both backends (SQLite in-process; PostgreSQL + Redis with the worker
in-process): items run as chat turns in sessions of their own, at most `max_parallel` at
once and oldest first; progress on the batch's own event stream ending in exactly one
final event; results in item order; cancel; idempotency; validation and tenancy."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from agent_orchestrator.config import Settings
from agent_orchestrator.db.tables import BatchRow, TaskRow
from agent_orchestrator.db.types import utcnow
from agent_orchestrator.events.models import EventType, StreamKey
from agent_orchestrator.models.task import TaskErrorInfo
from agent_orchestrator.queue.tasks.chat_tasks import ChatTurn
from tests.batch_helpers import most_at_once
from tests.chat_helpers import event_frames, get_json, messages, post_json, task_view
from tests.conftest import TokenFactory, auth, running_app

BATCH = "/api/v1/batch"
#: At ECHO_CHUNK_DELAY 0.02 s, an item with this message streams for about 0.4 s.
SLOW = " ".join(f"w{i}" for i in range(20))


async def submit(
    client: httpx.AsyncClient, headers: dict[str, str], expect: int = 202, **body: Any
) -> Any:
    return await post_json(client, BATCH, headers, expect, body)


async def batch_view(client: httpx.AsyncClient, headers: dict[str, str], batch_id: str) -> Any:
    return await get_json(client, f"{BATCH}/{batch_id}", headers)


async def ended(
    client: httpx.AsyncClient, headers: dict[str, str], batch_id: str, timeout: float = 30
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        view = await batch_view(client, headers, batch_id)
        if view["status"] != "running":
            return view
        assert time.monotonic() < deadline, f"batch still running: {view}"
        await asyncio.sleep(0.05)


async def results(client: httpx.AsyncClient, headers: dict[str, str], batch_id: str) -> Any:
    """Every item's result, following the pages (3 per page, so paging is exercised)."""
    found: list[Any] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        response = await client.get(f"{BATCH}/{batch_id}/results", params=params, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        found += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found


def items(*messages: str) -> list[dict[str, Any]]:
    return [{"message": message} for message in messages]


async def test_a_batch_runs_every_item_as_a_chat_turn_and_ends_completed(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    asked = [f"question {i}" for i in range(7)]
    created = await submit(client, headers, items=items(*asked), max_parallel=3)
    assert created["status"] == "running"
    assert created["total"] == 7
    assert created["max_parallel"] == 3
    assert created["counts"]["queued"] == 7
    assert created["events_url"] == f"{BATCH}/{created['id']}/events"

    view = await ended(client, headers, created["id"])
    assert view["status"] == "completed"
    assert view["finished_at"] is not None
    assert view["counts"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 7,
        "failed": 0,
        "cancelled": 0,
        "timed_out": 0,
    }
    found = await results(client, headers, created["id"])
    assert [item["index"] for item in found] == list(range(7))
    assert len({item["session_id"] for item in found}) == 7  # a session per item
    for item, message in zip(found, asked, strict=True):
        assert item["status"] == "succeeded"
        assert message in item["result"]["content"]
        assert "echo model" in item["result"]["content"]
        stored = await messages(client, headers, item["session_id"])
        assert [m["role"] for m in stored] == ["user", "assistant"]
        assert stored[0]["content"] == message
        assert stored[1]["id"] == item["result"]["message_id"]
    listed = (await client.get(BATCH, headers=headers)).json()["items"]
    assert [batch["id"] for batch in listed] == [created["id"]]
    assert listed[0]["counts"]["succeeded"] == 7


async def test_items_run_at_most_max_parallel_at_once_oldest_first(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """Measured from the ledger's own times: each item's claim and end. With ten items
    and a bound of three, three must overlap (the bound is used) and never four."""
    async with running_app(make_backend_settings(echo_chunk_delay=0.02)) as client:
        headers = auth(make_token())
        created = await submit(client, headers, items=items(*[SLOW] * 10), max_parallel=3)
        await ended(client, headers, created["id"])
        found = await results(client, headers, created["id"])
        tasks = [await task_view(client, headers, item["task_id"]) for item in found]
    assert all(t["status"] == "succeeded" and t["attempt"] == 1 for t in tasks)
    assert most_at_once(tasks) == 3
    starts = [t["started_at"] for t in tasks]
    assert starts == sorted(starts)  # in the order given


async def test_progress_events_end_with_exactly_one_final_event(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = auth(make_token())
    created = await submit(client, headers, items=items("a", "b", "c", "d"), max_parallel=2)
    url = f"{BATCH}/{created['id']}/events"
    async with asyncio.timeout(30), client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = event_frames([line async for line in response.aiter_lines()])
    assert {frame["event"] for frame in frames} == {"batch.progress"}
    data = [frame["envelope"]["data"] for frame in frames]
    assert data[0]["counts"]["queued"] == 4  # the first: as submitted
    assert [d["status"] for d in data[:-1]] == ["running"] * (len(data) - 1)
    assert data[-1]["status"] == "completed"
    assert data[-1]["completed"] == 4
    assert data[-1]["counts"]["succeeded"] == 4
    done = [d["completed"] for d in data]
    assert done == sorted(done)  # a later event never reports less
    ids = [int(frame["id"]) for frame in frames]
    assert ids == sorted(ids)

    # Resuming after the final event: nothing more will come, so 204 (no hanging stream).
    resumed = await client.get(url, headers={**headers, "Last-Event-ID": frames[-1]["id"]})
    assert resumed.status_code == 204
    # Resuming from an earlier event replays the rest, the final one included.
    async with client.stream(
        "GET", url, headers={**headers, "Last-Event-ID": frames[0]["id"]}
    ) as response:
        replayed = event_frames([line async for line in response.aiter_lines()])
    assert [frame["id"] for frame in replayed] == [frame["id"] for frame in frames[1:]]


async def test_cancel_stops_running_items_and_cancels_queued_ones(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    async with running_app(make_backend_settings(echo_chunk_delay=0.05)) as client:
        headers = auth(make_token())
        created = await submit(client, headers, items=items(*[SLOW] * 5), max_parallel=1)
        batch_id = created["id"]
        await _until_an_item_runs(client, headers, batch_id)

        response = await client.post(f"{BATCH}/{batch_id}/cancel", headers=headers)
        assert response.status_code == 202, response.text
        assert response.json()["cancel_requested"] is True
        assert response.json()["counts"]["cancelled"] == 4  # the queued ones, at once

        view = await ended(client, headers, batch_id, timeout=10)
        assert view["status"] == "cancelled"
        assert view["counts"]["cancelled"] == 5  # the running one was stopped too
        found = await results(client, headers, batch_id)
        assert {item["status"] for item in found} == {"cancelled"}

        again = await client.post(f"{BATCH}/{batch_id}/cancel", headers=headers)
        assert again.status_code == 409
        assert again.json()["error"]["details"] == {"status": "cancelled"}


async def _until_an_item_runs(
    client: httpx.AsyncClient, headers: dict[str, str], batch_id: str
) -> None:
    async with asyncio.timeout(10):
        while (await batch_view(client, headers, batch_id))["counts"]["running"] == 0:
            await asyncio.sleep(0.02)


async def test_waiting_items_are_not_redelivered_by_the_reconciler(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """Items waiting for a slot are not lost deliveries: the reconciler's sweep leaves
    them alone rather than delivering work the claim would only drop."""
    async with running_app(make_backend_settings(echo_chunk_delay=0.05)) as client:
        headers = auth(make_token())
        created = await submit(client, headers, items=items(*[SLOW] * 4), max_parallel=1)
        await _until_an_item_runs(client, headers, created["id"])
        ledger = client.app.state.core.ledger  # type: ignore[attr-defined]
        assert await ledger.redeliver_lost(stale_after=0) == 0
        view = await ended(client, headers, created["id"])
    assert view["counts"]["succeeded"] == 4


async def test_the_sweep_ends_a_batch_whose_end_was_not_written(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """As when the process that ended the last item stopped before settling the batch."""
    headers = auth(make_token())
    created = await submit(client, headers, items=items("x", "y"))
    await ended(client, headers, created["id"])
    state = client.app.state.core  # type: ignore[attr-defined]
    batch_id = uuid.UUID(created["id"])
    async with state.db_factory() as db:
        await db.execute(
            update(BatchRow)
            .where(BatchRow.id == batch_id)
            .values(status="running", finished_at=None)
        )
        await db.commit()
    stream = StreamKey("batch", "tenant-a", created["id"])
    async with state.bus.subscribe(stream, replay=False) as events:
        assert await state.batches.sweep() == 1
        async with asyncio.timeout(5):
            final = await anext(aiter(events))
    assert final.type == EventType.BATCH_PROGRESS
    assert final.data["status"] == "completed"
    assert (await batch_view(client, headers, created["id"]))["status"] == "completed"
    assert await state.batches.sweep() == 0


async def test_the_sweep_delivers_items_whose_deliveries_were_lost(
    make_backend_settings: Callable[..., Settings],
    make_token: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As when the API process stopped between the batch's commit and its first
    deliveries: the items wait, and the reconciler's sweep starts them."""
    settings = make_backend_settings(queued_stale_after=0.1, reconcile_interval=300)
    async with running_app(settings) as client:  # this test sweeps, not the reconciler
        state = client.app.state.core  # type: ignore[attr-defined]
        ledger = state.ledger
        original = ledger.deliver_ready_in_batch

        async def lost(*args: Any) -> int:
            return 0

        monkeypatch.setattr(ledger, "deliver_ready_in_batch", lost)
        headers = auth(make_token())
        created = await submit(client, headers, items=items("a", "b", "c"), max_parallel=2)
        await asyncio.sleep(0.3)
        assert (await batch_view(client, headers, created["id"]))["counts"]["queued"] == 3
        monkeypatch.setattr(ledger, "deliver_ready_in_batch", original)
        assert await state.batches.sweep() == 2  # the two that may start
        view = await ended(client, headers, created["id"])
    assert view["counts"]["succeeded"] == 3


async def test_full_batches_do_not_keep_the_sweep_from_one_whose_deliveries_were_lost(
    make_backend_settings: Callable[..., Settings],
    make_token: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batches that are only full (every slot running, the rest waiting for one) are not
    the sweep's business: with room for one batch a round, it finds the one whose first
    deliveries were lost, however many full ones waited longer."""
    settings = make_backend_settings(queued_stale_after=0.1, reconcile_interval=300)
    async with running_app(settings, run_worker=False) as client:
        state = client.app.state.core  # type: ignore[attr-defined]
        headers = auth(make_token())
        for _ in range(3):
            full = await submit(client, headers, items=items("a", "b"), max_parallel=1)
            first = (await results(client, headers, full["id"]))[0]["task_id"]
            assert await state.ledger.claim("tenant-a", uuid.UUID(first), "w1") is not None
        original = state.ledger.deliver_ready_in_batch

        async def lost(*args: Any) -> int:
            return 0

        monkeypatch.setattr(state.ledger, "deliver_ready_in_batch", lost)
        starved = await submit(client, headers, items=items("c", "d"), max_parallel=2)
        monkeypatch.setattr(state.ledger, "deliver_ready_in_batch", original)
        await asyncio.sleep(0.3)  # every waiting item is now older than QUEUED_STALE_AFTER

        assert await state.batches.sweep(limit=1) == 2  # both of its items, delivered
        async with state.db_factory() as db:
            query = select(TaskRow.delivery).where(TaskRow.batch_id == uuid.UUID(starved["id"]))
            deliveries = (await db.execute(query)).scalars().all()
    assert deliveries == [2, 2]


async def test_a_failing_session_hook_still_hands_the_slot_on(
    make_backend_settings: Callable[..., Settings],
    make_token: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An item's end frees its session, then hands its slot on; the first failing (Redis
    away as it publishes, say) must not cost the batch its next item until a sweep."""

    async def failing(self: ChatTurn, task: TaskRow) -> None:
        raise ConnectionError("the session's event could not be published")

    monkeypatch.setattr(ChatTurn, "settled", failing)
    settings = make_backend_settings(reconcile_interval=300)  # no sweep in this test
    async with running_app(settings) as client:
        headers = auth(make_token())
        created = await submit(client, headers, items=items("a", "b", "c"), max_parallel=1)
        view = await ended(client, headers, created["id"], timeout=10)
    assert view["counts"]["succeeded"] == 3


async def test_an_item_the_reconciler_fails_hands_its_slot_on_at_once(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """An item whose worker stopped renewing its lease, with its attempts spent, ends
    `failed` by the reconciler, outside any worker's attempt: the next item is delivered
    then, not at the batches' next sweep. (The API process alone: no worker to race.)"""
    async with running_app(make_backend_settings(), run_worker=False) as client:
        state = client.app.state.core  # type: ignore[attr-defined]
        headers = auth(make_token())
        created = await submit(client, headers, items=items("a", "b"), max_parallel=1)
        first, second = (
            uuid.UUID(item["task_id"]) for item in await results(client, headers, created["id"])
        )
        assert await state.ledger.claim("tenant-a", first, "a-worker-that-dies") is not None
        async with state.db_factory() as db:
            await db.execute(
                update(TaskRow)
                .where(TaskRow.id == first)
                .values(lease_expires_at=utcnow() - timedelta(seconds=1), max_attempts=1)
            )
            await db.commit()
        assert await state.ledger.recover_expired_leases() == 1
        view = await batch_view(client, headers, created["id"])
        async with state.db_factory() as db:
            query = select(TaskRow.delivery).where(TaskRow.id == second)
            delivery = (await db.execute(query)).scalar_one()
    assert view["counts"] == {**view["counts"], "failed": 1, "queued": 1}
    assert delivery == 2  # its first delivery, made as the slot freed


@pytest.mark.parametrize("order", ["retry, then cancel", "cancel, then retry"])
async def test_a_cancelled_batch_ends_however_its_running_item_retries(
    make_backend_settings: Callable[..., Settings], make_token: TokenFactory, order: str
) -> None:
    """A running item whose attempt fails retryably just as its batch is cancelled: put
    back in the queue before the cancel, the cancel ends it; flagged first, its worker's
    retry ends it. Either way no item is left to run and the batch ends `cancelled`.
    (The API process alone: the test is the worker.)"""
    async with running_app(make_backend_settings(), run_worker=False) as client:
        state = client.app.state.core  # type: ignore[attr-defined]
        headers = auth(make_token())
        created = await submit(client, headers, items=items("a", "b"), max_parallel=1)
        batch_id = created["id"]
        first = uuid.UUID((await results(client, headers, batch_id))[0]["task_id"])
        claimed = await state.ledger.claim("tenant-a", first, "w1")
        assert claimed is not None
        error = TaskErrorInfo(code="flaky", message="again", retryable=True)

        async def cancel() -> None:
            response = await client.post(f"{BATCH}/{batch_id}/cancel", headers=headers)
            assert response.status_code == 202, response.text

        if order == "retry, then cancel":
            assert (await state.ledger.retry_later(claimed.task, "w1", error, 0.0)) is not None
            await cancel()
        else:
            await cancel()
            row = await state.ledger.retry_later(claimed.task, "w1", error, 0.0)
            assert row is not None
            assert row.status == "cancelled"
        found = await results(client, headers, batch_id)
        assert {item["status"] for item in found} == {"cancelled"}
        assert await state.ledger.claim("tenant-a", first, "w2") is None
        await state.batches.sweep()  # no worker here to settle the batch
        view = await batch_view(client, headers, batch_id)
    assert view["status"] == "cancelled"
    assert view["counts"]["cancelled"] == 2


async def test_idempotency_key_returns_the_same_batch(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = {**auth(make_token()), "Idempotency-Key": "batch-key-1"}
    first = await submit(client, headers, items=items("one", "two"))
    second = await submit(client, headers, items=items("one", "two"))
    assert second["id"] == first["id"]
    await ended(client, headers, first["id"])
    assert len(await results(client, headers, first["id"])) == 2
    listed = (await client.get(BATCH, headers=headers)).json()["items"]
    assert len(listed) == 1

    for different in (items("one"), items("one", "three")):  # fewer, or other, items
        other = await client.post(BATCH, json={"items": different}, headers=headers)
        assert other.status_code == 409
        assert other.json()["error"]["details"] == {"header": "Idempotency-Key"}
    elsewhere = {**auth(make_token(user="user-2")), "Idempotency-Key": "batch-key-1"}
    assert (
        await client.post(BATCH, json={"items": items("one", "two")}, headers=elsewhere)
    ).status_code == 409


async def test_concurrent_submissions_with_one_key_give_one_batch(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    headers = {**auth(make_token()), "Idempotency-Key": "raced-key"}
    body = {"items": items("one", "two")}
    answers = await asyncio.gather(
        *(client.post(BATCH, json=body, headers=headers) for _ in range(5))
    )
    assert {answer.status_code for answer in answers} == {202}
    assert len({answer.json()["id"] for answer in answers}) == 1
    listed = (await client.get(BATCH, headers=headers)).json()["items"]
    assert len(listed) == 1
    await ended(client, headers, listed[0]["id"])
    assert len(await results(client, headers, listed[0]["id"])) == 2  # its items, once


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": []}, "items"),
        ({"items": [{"message": ""}]}, "message"),
        ({"items": [{"message": "hi", "colour": "red"}]}, "colour"),
        ({"items": [{"message": "hi"}], "max_parallel": 0}, "max_parallel"),
        ({"items": [{"message": "hi"}], "max_parallel": 33}, "max_parallel"),
        ({"items": [{"message": "hi"}], "operation": "paint"}, "operation"),
        ({"items": [{"message": "hi"}] * 1001}, "items"),
        ({"items": [{"message": "hi"}], "callback_url": "https://example.com/h"}, "callback_url"),
    ],
)
async def test_invalid_batches_are_refused_naming_the_field(
    client: httpx.AsyncClient, make_token: TokenFactory, body: dict[str, Any], field: str
) -> None:
    """The last case: webhooks are not enabled here (no WEBHOOK_SECRET)."""
    response = await client.post(BATCH, json=body, headers=auth(make_token()))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert any(field in str(detail) for detail in error["details"]), error
    listed = (await client.get(BATCH, headers=auth(make_token()))).json()["items"]
    assert listed == []  # nothing was written


async def test_batches_need_their_scopes_and_stay_within_their_owner(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    owner = auth(make_token())
    created = await submit(client, owner, items=items("mine"))
    reader = auth(make_token(scopes=["batch:read"]))
    refused = await client.post(BATCH, json={"items": items("no")}, headers=reader)
    assert refused.status_code == 403
    cancel = await client.post(f"{BATCH}/{created['id']}/cancel", headers=reader)
    assert cancel.status_code == 403
    writer_only = auth(make_token(scopes=["batch:write"]))
    assert (await client.get(f"{BATCH}/{created['id']}", headers=writer_only)).status_code == 403

    for stranger in (make_token(tenant="tenant-b"), make_token(user="user-2")):
        for path in ("", "/results", "/events"):
            response = await client.get(f"{BATCH}/{created['id']}{path}", headers=auth(stranger))
            assert response.status_code == 404, (path, response.text)
        response = await client.post(f"{BATCH}/{created['id']}/cancel", headers=auth(stranger))
        assert response.status_code == 404
        listed = (await client.get(BATCH, headers=auth(stranger))).json()["items"]
        assert listed == []
    admin = auth(make_token(scopes=["admin"]))
    assert (await client.get(f"{BATCH}/{created['id']}", headers=admin)).status_code == 200
    await ended(client, owner, created["id"])


async def test_the_openapi_document_carries_the_batch_settings(
    make_backend_settings: Callable[..., Settings],
) -> None:
    """Bounds that are settings are in the document; `callback_url` only where webhooks
    are enabled. The document is read twice: its edits must hold on every read."""
    for secret, has_callback in ((None, False), ("s3cret-for-webhooks", True)):
        settings = make_backend_settings(
            batch_max_items=50, batch_max_parallel=7, webhook_secret=secret
        )
        async with running_app(settings) as client:
            for _ in range(2):
                response = await client.get("/openapi.json")
                assert response.status_code == 200
                schema = response.json()["components"]["schemas"]["BatchRequest"]
                assert schema["properties"]["items"]["maxItems"] == 50
                parallel = schema["properties"]["max_parallel"]["anyOf"][0]
                assert parallel["maximum"] == 7
                assert ("callback_url" in schema["properties"]) is has_callback
