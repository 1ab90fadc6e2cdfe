"""Fault drills on real processes, real Redis and real PostgreSQL (issue 3, reliability F1,
F3, F4, F5): kill -9 a busy worker, lose Redis's data, SIGTERM a busy worker, timeouts and
retries, cancellation across processes, and SSE resume with Last-Event-ID.

Workers run as `agent-orchestrator worker`, API instances as `serve --no-worker`, all with
short leases (LEASE_TTL=3, RECONCILE_INTERVAL=1) so each drill takes seconds. Tasks are
submitted through the ledger from the test process; assertions read the database.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select, text

from agent_orchestrator.config import Settings
from agent_orchestrator.db.engine import UnitOfWork
from agent_orchestrator.db.tables import TaskRow
from agent_orchestrator.events.models import Event, StreamKey
from agent_orchestrator.lifecycle import build_state, close_state
from agent_orchestrator.models.principal import USER_SCOPES, Principal
from agent_orchestrator.models.task import TERMINAL
from agent_orchestrator.queue.producer import delivery_of
from agent_orchestrator.services.task_ledger import Submission
from agent_orchestrator.state import AppState, build_verifier
from tests import engine_handlers
from tests.conftest import REDIS_URL, auth, token_factory
from tests.processes import (
    CLI,
    SSEParser,
    free_port,
    print_log,
    process_env,
    read_log,
    start_process,
    stop_process,
    wait_http_ok_async,
    wait_until,
    worker_started,
)

pytestmark = pytest.mark.e2e

TENANT, USER = "tenant-a", "user-1"
Popen = subprocess.Popen
TERMINAL_VALUES = {status.value for status in TERMINAL}


class Drill:
    """One drill's world: a fresh database and Redis namespace, the processes it started
    (always stopped at teardown, their logs printed), and an API-side state in the test
    process for submitting tasks through the ledger and reading the database."""

    def __init__(
        self,
        tmp_path: Path,
        database_url: str,
        namespace: str,
        make_settings: Callable[..., Settings],
    ) -> None:
        self.tmp = tmp_path
        self.database_url = database_url
        self.namespace = namespace
        self._make_settings = make_settings
        base = make_settings()
        self.secret_key = base.resolved_secret_key()
        self.service_token = base.service_token.get_secret_value() if base.service_token else ""
        #: Variables shared by every process of the drill and by the test-side settings.
        self.common: dict[str, str] = {
            "DATABASE_URL": database_url,
            "REDIS_URI": REDIS_URL,
            "REDIS_NAMESPACE": namespace,
            "SECRET_KEY": self.secret_key,
            "SERVICE_TOKEN": self.service_token,
            "AUTO_MIGRATE": "false",
            "TASK_HANDLER_MODULES": "tests.engine_handlers",
            "LEASE_TTL": "3",
            "RECONCILE_INTERVAL": "1",
            "QUEUED_STALE_AFTER": "2",
            "RETRY_BACKOFF_INITIAL": "0.1",
            "SHUTDOWN_GRACE": "1",
            "LOG_LEVEL": "WARNING",
            "DATA_DIR": str(tmp_path / "data"),
        }
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []
        self._state: AppState | None = None
        self.principal = Principal(TENANT, USER, frozenset(USER_SCOPES))

    # --- the test side ----------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        return self.state.settings

    @property
    def state(self) -> AppState:
        assert self._state is not None, "call `await drill.open()` first"
        return self._state

    async def open(self, **common: str) -> AppState:
        """Build the API-side state, with `common` added to every process's variables."""
        self.common.update(common)
        overrides = {key.lower(): value for key, value in self.common.items()}
        settings = self._make_settings(**overrides)
        self._state = await build_state(settings, build_verifier(settings), run_worker=False)
        # The handlers create their tables on first use; concurrent CREATE TABLE IF NOT
        # EXISTS races in PostgreSQL, so create them before any worker runs.
        async with self.state.db_factory() as db:
            for statement in engine_handlers._SCHEMA:
                await db.execute(text(statement))
            await db.commit()
        return self._state

    def token(self) -> str:
        return token_factory(self.state.verifier)(tenant=TENANT, user=USER)

    async def submit(
        self, kind: str, task_input: dict[str, Any], count: int = 1
    ) -> list[uuid.UUID]:
        ids = []
        async with UnitOfWork(self.state.db_factory) as uow:
            for _ in range(count):
                row, created = await self.state.ledger.submit(
                    uow,
                    self.principal,
                    Submission(kind=kind, queue=self.settings.queue_interactive, input=task_input),
                )
                assert created
                ids.append(row.id)
        return ids

    async def tasks(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, TaskRow]:
        async with self.state.db_factory() as db:
            rows = (await db.execute(select(TaskRow).where(TaskRow.id.in_(ids)))).scalars()
            return {row.id: row for row in rows}

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.state.db_factory() as db:
            return list((await db.execute(text(sql), params)).all())

    async def runs(self, task_id: uuid.UUID) -> list[tuple[int, str]]:
        """(attempt, worker) of each time a handler started on the task, in attempt order."""
        rows = await self.rows(
            "SELECT attempt, worker FROM test_runs WHERE task_id = :t ORDER BY attempt, worker",
            t=str(task_id),
        )
        return [(row[0], row[1]) for row in rows]

    async def effects(self) -> list[str]:
        return [row[0] for row in await self.rows("SELECT task_id FROM test_effects")]

    async def wait_status(
        self,
        ids: list[uuid.UUID],
        accept: Callable[[TaskRow], bool],
        timeout: float,
        what: str,
        interval: float = 0.05,
    ) -> dict[uuid.UUID, TaskRow]:
        latest: dict[uuid.UUID, TaskRow] = {}

        async def check() -> bool:
            latest.clear()
            latest.update(await self.tasks(ids))
            return len(latest) == len(ids) and all(accept(row) for row in latest.values())

        def describe() -> str:
            states = sorted(
                f"{row.status}/{row.attempt}/{row.lease_owner}/{row.progress}"
                for row in latest.values()
            )
            return f"{what} (now: {states})"

        await wait_until(check, timeout, interval=interval, message=describe, alive=self.alive())
        return dict(latest)

    async def replay(self, task_id: uuid.UUID) -> list[Event]:
        stream = StreamKey("task", TENANT, str(task_id))
        return await self.state.bus.replay(stream, None, 10_000)

    # --- processes ----------------------------------------------------------------------
    def env(self, **overrides: str) -> dict[str, str]:
        return process_env(**{**self.common, **overrides})

    def alive(self) -> list[subprocess.Popen[bytes]]:
        """Processes expected to be running (those not yet stopped by the test)."""
        return [proc for proc, _ in self.processes if proc.returncode is None]

    def start(self, name: str, args: list[str], **overrides: str) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        proc = start_process(args, self.env(**overrides), log)
        self.processes.append((proc, log))
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> Path:
        return next(log for started, log in self.processes if started is proc)

    async def start_worker(
        self, name: str, **overrides: str
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start `agent-orchestrator worker`; return it and its worker id once it runs."""
        proc = self.start(name, [CLI, "worker"], **overrides)
        return proc, await worker_started(self.log_of(proc), 20, alive=[proc], name=name)

    async def start_api(self, name: str, **overrides: str) -> tuple[subprocess.Popen[bytes], str]:
        """Start `agent-orchestrator serve --no-worker`; return it and its base URL."""
        port = free_port()
        proc = self.start(name, [CLI, "serve", "--no-worker", "--port", str(port)], **overrides)
        base_url = f"http://127.0.0.1:{port}"
        await wait_http_ok_async(f"{base_url}/health/ready", timeout=20, proc=proc)
        return proc, base_url

    async def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        return await asyncio.to_thread(stop_process, proc, sig, 10.0)

    async def close(self) -> None:
        try:
            for proc, _ in self.processes:
                await asyncio.to_thread(stop_process, proc, signal.SIGKILL, 5.0)
        finally:
            for _, log in self.processes:
                print_log(log)
            if self._state is not None:
                await close_state(self._state)
            # SAQ keeps job hashes under saq:job:<queue name>, outside the patterns the
            # redis_namespace fixture cleans.
            await delete_namespace(self.namespace)


async def delete_namespace(namespace: str) -> int:
    """Delete every Redis key of this deployment's namespace: queues, job hashes, event
    streams and counters. To the deployment this is Redis losing its data."""
    client = Redis.from_url(REDIS_URL)
    deleted = 0
    try:
        for pattern in (f"{namespace}*", f"saq:{namespace}*", f"saq:job:{namespace}:*"):
            keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
            if keys:
                deleted += await client.delete(*keys)
    finally:
        await client.aclose()
    return deleted


@pytest.fixture
async def drill(
    tmp_path: Path,
    pg_database: str,
    redis_namespace: str,
    make_settings: Callable[..., Settings],
) -> AsyncIterator[Drill]:
    world = Drill(tmp_path, pg_database, redis_namespace, make_settings)
    try:
        yield world
    finally:
        await world.close()


def succeeded(row: TaskRow) -> bool:
    return row.status == "succeeded"


def finished(row: TaskRow) -> bool:
    return row.status in TERMINAL_VALUES


def terminal_events(events: list[Event]) -> list[Event]:
    return [e for e in events if e.type == "task.status" and e.data["status"] in TERMINAL_VALUES]


# --- F1/F5: kill -9 a worker with tasks in flight ------------------------------------------
async def test_kill_9_worker_in_flight_tasks_finish_once_on_another_worker(drill: Drill) -> None:
    await drill.open(MAX_CONCURRENT_TASKS="50")
    first, first_id = await drill.start_worker("worker-1")
    ids = await drill.submit("test.sleep", {"seconds": 3, "steps": 6}, count=20)

    # Every handler has started (recorded its run), so the kill interrupts real work.
    await _all_running_on(drill, ids, first_id, "worker-1")

    first.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert await asyncio.to_thread(first.wait, 5) == -signal.SIGKILL
    _second, second_id = await drill.start_worker("worker-2", MAX_CONCURRENT_TASKS="50")

    rows = await drill.wait_status(ids, succeeded, timeout=30, what="every task succeeded")
    recovery = time.monotonic() - killed_at
    print(f"recovery after kill -9: {recovery:.2f} s for {len(ids)} tasks")
    assert recovery < 30

    for row in rows.values():
        assert row.attempt == 2, row.id  # attempt 1 died with worker-1
        assert row.lease_owner is None
        assert row.error is None
        assert row.result == {"slept": 3}
        assert await drill.runs(row.id) == [(1, first_id), (2, second_id)]
    effects = await drill.effects()
    assert len(effects) == len(ids)
    assert set(effects) == {str(task_id) for task_id in ids}
    # Exactly one terminal state per task, in the ledger and in its event log.
    for task_id in ids:
        events = await drill.replay(task_id)
        assert [e.data["status"] for e in terminal_events(events)] == ["succeeded"]


async def _all_running_on(drill: Drill, ids: list[uuid.UUID], worker_id: str, name: str) -> None:
    """Wait until every task is running on `worker_id` and each handler has started
    (recorded its first run)."""
    await drill.wait_status(
        ids,
        lambda row: row.status == "running" and row.lease_owner == worker_id,
        timeout=15,
        what=f"every task running on {name}",
    )
    await wait_until(
        lambda: _runs_started(drill, attempt=1, expected=len(ids)),
        10,
        message=f"{name} to start every handler",
    )


async def _runs_started(drill: Drill, *, attempt: int, expected: int) -> bool:
    rows = await drill.rows("SELECT count(*) FROM test_runs WHERE attempt = :a", a=attempt)
    return bool(rows[0][0] == expected)


# --- Redis loses its data while tasks are queued ---------------------------------------
async def test_queued_tasks_complete_after_redis_loses_its_data(drill: Drill) -> None:
    await drill.open()
    ids = await drill.submit("test.sleep", {"seconds": 0.2, "steps": 2}, count=10)
    queue = drill.settings.queue_interactive
    assert await drill.state.queue.depth(queue) == 10

    assert await delete_namespace(drill.namespace) > 0
    assert await drill.state.queue.depth(queue) == 0
    assert all(row.status == "queued" for row in (await drill.tasks(ids)).values())

    started = time.monotonic()
    await drill.start_worker("worker")
    rows = await drill.wait_status(ids, succeeded, timeout=20, what="every task succeeded")
    print(f"queued tasks recovered after Redis data loss in {time.monotonic() - started:.2f} s")
    assert all(row.attempt == 1 for row in rows.values())
    assert all(row.delivery >= 2 for row in rows.values())  # each was re-delivered
    assert sorted(await drill.effects()) == sorted(str(task_id) for task_id in ids)


# --- F3: SIGTERM a busy worker --------------------------------------------------------
async def test_sigterm_releases_running_tasks_with_no_running_row_left(drill: Drill) -> None:
    await drill.open(TASK_TIMEOUT="30")
    first, first_id = await drill.start_worker("worker-1", SHUTDOWN_GRACE="1")
    ids = await drill.submit("test.sleep", {"seconds": 10, "steps": 10}, count=5)
    await _all_running_on(drill, ids, first_id, "worker-1")

    signalled = time.monotonic()
    code = await drill.stop(first, signal.SIGTERM)
    took = time.monotonic() - signalled
    print(f"worker exited {took:.2f} s after SIGTERM")
    assert code == 0, read_log(drill.log_of(first))
    assert took < 8

    orphans = await drill.rows(
        "SELECT id FROM tasks WHERE status = 'running' "
        "AND (lease_owner IS NULL OR lease_expires_at < now())"
    )
    assert orphans == []
    rows = await drill.tasks(ids)
    for row in rows.values():
        assert row.status == "queued", row.id
        assert row.attempt == 0  # the interrupted attempt is not counted
        assert row.lease_owner is None
        assert row.lease_expires_at is None

    # F4 too: each 10 s run outlives the 3 s lease several times over, and runs once.
    _second, second_id = await drill.start_worker("worker-2")
    rows = await drill.wait_status(ids, succeeded, timeout=25, what="every task succeeded")
    for row in rows.values():
        assert row.attempt == 1
        assert await drill.runs(row.id) == sorted([(1, first_id), (1, second_id)])
    assert sorted(await drill.effects()) == sorted(str(task_id) for task_id in ids)


# --- timeouts and retries in a worker process ----------------------------------------
async def test_timeouts_and_retries_in_a_worker_process(drill: Drill) -> None:
    await drill.open(RETRY_ATTEMPTS="2", TASK_TIMEOUT="1")  # max_attempts = 3
    await drill.start_worker("worker")
    [overrun] = await drill.submit("test.sleep", {"seconds": 5, "steps": 5})
    [flaky_ok] = await drill.submit("test.flaky", {"succeed_on": 3})
    [fatal] = await drill.submit("test.fatal", {})
    [crash] = await drill.submit("test.crash", {})
    [flaky_never] = await drill.submit("test.flaky", {"succeed_on": 10})
    ids = [overrun, flaky_ok, fatal, crash, flaky_never]

    rows = await drill.wait_status(ids, finished, timeout=20, what="every task finished")

    row = rows[overrun]
    assert (row.status, row.attempt) == ("timed_out", 1)
    assert row.error is not None
    assert row.error["code"] == "timeout"
    assert [attempt for attempt, _ in await drill.runs(overrun)] == [1]
    assert str(overrun) not in await drill.effects()

    row = rows[flaky_ok]
    assert (row.status, row.attempt, row.max_attempts) == ("succeeded", 3, 3)
    assert row.result == {"attempt": 3}
    assert [attempt for attempt, _ in await drill.runs(flaky_ok)] == [1, 2, 3]

    row = rows[fatal]
    assert (row.status, row.attempt) == ("failed", 1)
    assert row.error == {"code": "bad_input", "message": "this cannot work", "retryable": False}
    assert [attempt for attempt, _ in await drill.runs(fatal)] == [1]

    row = rows[crash]  # an unexpected exception: not retried, and its text is not exposed
    assert (row.status, row.attempt) == ("failed", 1)
    assert row.error is not None
    assert row.error["code"] == "internal_error"
    assert "secret" not in json.dumps(row.error)

    row = rows[flaky_never]
    assert (row.status, row.attempt) == ("failed", 3)
    assert row.error is not None
    assert row.error["code"] == "downstream_unavailable"
    assert [attempt for attempt, _ in await drill.runs(flaky_never)] == [1, 2, 3]

    for task_id in ids:
        assert len(terminal_events(await drill.replay(task_id))) == 1


# --- cancellation through one API process of a task another worker process runs -------
async def test_cancel_through_api_process_stops_work_on_worker_process(drill: Drill) -> None:
    await drill.open()
    _api, base_url = await drill.start_api("api")
    headers = auth(drill.token())
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10) as http:
        # A queued task (no worker yet) is cancelled at once and never starts.
        [queued] = await drill.submit("test.sleep", {"seconds": 10, "steps": 10})
        response = await http.post(f"/api/v1/tasks/{queued}/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "cancelled"
        assert (await drill.tasks([queued]))[queued].status == "cancelled"

        _worker, worker_id = await drill.start_worker("worker")
        [running] = await drill.submit("test.sleep", {"seconds": 20, "steps": 20})
        await drill.wait_status(
            [running],
            lambda row: (
                row.status == "running"
                and row.lease_owner == worker_id
                and row.progress.get("steps_completed", 0) >= 1
            ),
            timeout=15,
            what="the task running on the worker",
        )

        asked = time.monotonic()
        response = await http.post(f"/api/v1/tasks/{running}/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["cancel_requested"] is True
        await drill.wait_status(
            [running], lambda row: row.status == "cancelled", 5, "cancelled", interval=0.01
        )
        latency = time.monotonic() - asked
        print(f"cancel latency (request -> cancelled in the ledger): {latency * 1000:.0f} ms")
        assert latency < 2.0

        response = await http.post(f"/api/v1/tasks/{running}/cancel")
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "conflict"

        response = await http.get(f"/api/v1/tasks/{running}")
        assert response.status_code == 200
        view = response.json()
        assert view["status"] == "cancelled"
        assert view["finished_at"] is not None

        # The queued task's delivery was ahead of the running one's, so the worker has
        # taken it by now; it is pending until the worker is done with it (dropped it).
        assert await drill.state.queue.depth(drill.settings.queue_interactive) == 0
        dropped = (await drill.tasks([queued]))[queued]
        deadline = time.monotonic() + 5
        while await drill.state.queue.is_pending(delivery_of(dropped)):
            assert time.monotonic() < deadline, "the worker never finished the delivery"
            await asyncio.sleep(0.02)
    rows = await drill.tasks([queued, running])
    assert rows[running].status == "cancelled"
    assert rows[running].attempt == 1
    assert rows[queued].status == "cancelled"
    assert rows[queued].attempt == 0
    assert await drill.runs(queued) == []
    assert [attempt for attempt, _ in await drill.runs(running)] == [1]
    assert await drill.effects() == []  # the cancelled handler never wrote its effect
    for task_id in (queued, running):
        assert [e.data["status"] for e in terminal_events(await drill.replay(task_id))] == [
            "cancelled"
        ]


# --- SSE: disconnect mid-task, resume with Last-Event-ID -------------------------------
async def read_sse(
    http: httpx.AsyncClient,
    url: str,
    *,
    last_event_id: str | None = None,
    stop_after_events: int | None = None,
    within: float = 15.0,
) -> tuple[list[dict[str, Any]], bool]:
    """Frames of one SSE connection, and whether the server ended the stream (False when
    we disconnected after `stop_after_events` events)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    frames: list[dict[str, Any]] = []
    parser = SSEParser()
    events = 0
    async with asyncio.timeout(within), http.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            frame = parser.feed(line)
            if frame is None:
                continue
            frames.append(frame)
            if "id" in frame:
                events += 1
                if stop_after_events is not None and events >= stop_after_events:
                    return frames, False
    return frames, True


def events_of(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"id": int(f["id"]), "event": f["event"], "data": json.loads(f["data"])}
        for f in frames
        if "id" in f
    ]


async def test_sse_resume_with_last_event_id_gets_every_event_once(drill: Drill) -> None:
    await drill.open(SSE_KEEPALIVE_SECONDS="0.3")
    _api, base_url = await drill.start_api("api")
    await drill.start_worker("worker")
    steps = 20
    headers = auth(drill.token())
    timeout = httpx.Timeout(10.0, read=5.0)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as http:
        [task_id] = await drill.submit("test.sleep", {"seconds": 2, "steps": steps})
        url = f"/api/v1/tasks/{task_id}/events"

        first, ended = await read_sse(http, url, stop_after_events=5)
        assert not ended
        assert first[0].get("retry") == "2000"
        before = events_of(first)
        assert len(before) == 5
        await asyncio.sleep(0.4)  # events keep coming while we are away
        second, ended = await read_sse(http, url, last_event_id=str(before[-1]["id"]))
        assert ended
        after = events_of(second)
        assert after, "nothing after the resume"
        assert (await drill.tasks([task_id]))[task_id].status == "succeeded"

        full, ended = await read_sse(http, url)  # a fresh client, after the task finished
        assert ended
        everything = events_of(full)

    received = before + after
    ids = [event["id"] for event in received]
    assert ids == sorted(set(ids)), "duplicates or out of order"
    assert received == everything
    statuses = [event["data"]["data"]["status"] for event in everything]
    assert statuses == ["queued", "running"] + ["running"] * steps + ["succeeded"]
    assert [e["data"]["data"]["progress"].get("steps_completed") for e in everything[2:-1]] == list(
        range(1, steps + 1)
    )
    assert all(event["event"] == "task.status" for event in everything)
    assert all(event["data"]["id"] == str(event["id"]) for event in everything)
    assert all(event["data"]["task_id"] == str(task_id) for event in everything)
    # The stream ended right after the terminal event.
    assert "id" in second[-1]
    assert everything[-1]["data"]["data"]["status"] == "succeeded"


async def test_sse_keepalive_comments_while_the_task_is_idle(drill: Drill) -> None:
    await drill.open(SSE_KEEPALIVE_SECONDS="0.3")
    _api, base_url = await drill.start_api("api")
    await drill.start_worker("worker")
    async with httpx.AsyncClient(
        base_url=base_url, headers=auth(drill.token()), timeout=httpx.Timeout(10.0, read=5.0)
    ) as http:
        [task_id] = await drill.submit("test.sleep", {"seconds": 1.5, "steps": 1})
        frames, ended = await read_sse(http, f"/api/v1/tasks/{task_id}/events")
    assert ended
    keepalives = [f for f in frames if "keep-alive" in f.get("comments", []) and "id" not in f]
    assert len(keepalives) >= 2, frames
    statuses = [event["data"]["data"]["status"] for event in events_of(frames)]
    assert statuses == ["queued", "running", "running", "succeeded"]
    assert "id" in frames[-1]
