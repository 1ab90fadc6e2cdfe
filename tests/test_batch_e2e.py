"""A batch end to end on real processes: PostgreSQL, Redis, one `serve --no-worker` and
two `worker` processes competing for its items, one of them killed (SIGKILL) while it
runs some. Nothing accepted is lost: every item ends `succeeded` with one reply, the
bound on items at once holds across the processes, and the webhook receiver (a real
HTTP server in this process) gets the ended batch, signed, once."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from agent_orchestrator.config import Settings
from agent_orchestrator.state import build_verifier
from tests.batch_helpers import most_at_once, signature_of
from tests.conftest import REDIS_URL, auth, token_factory
from tests.doubles.http_thread import QuietHandler, serving
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

SECRET = "e2e-webhook-secret-0123456789"
#: At ECHO_CHUNK_DELAY 0.03 s, each item streams for about 0.6 s.
MESSAGE = " ".join(f"w{i}" for i in range(20))


class Receiver(QuietHandler):
    seen: list[tuple[dict[str, str], bytes]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["content-length"]))
        with self.lock:
            self.seen.append((dict(self.headers.items()), body))
        self.reply(204)


async def test_items_survive_a_killed_worker_within_the_bound_and_the_end_is_posted_once(
    tmp_path: Path,
    pg_database: str,
    redis_namespace: str,
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    env = process_env(
        DATABASE_URL=pg_database,
        REDIS_URI=REDIS_URL,
        REDIS_NAMESPACE=redis_namespace,
        SECRET_KEY=settings.resolved_secret_key(),
        SERVICE_TOKEN="e2e-service-token",
        AUTO_MIGRATE="false",
        LOG_LEVEL="WARNING",
        LEASE_TTL="2",
        RECONCILE_INTERVAL="0.5",
        ECHO_CHUNK_DELAY="0.03",
        WEBHOOK_SECRET=SECRET,
        WEBHOOK_ALLOWED_NETWORKS="127.0.0.1/32",
        DATA_DIR=str(tmp_path / "data"),
    )
    run_migrate(env)
    Receiver.seen = []
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []
    with serving(Receiver) as hook_base:
        try:
            workers: dict[str, subprocess.Popen[bytes]] = {}
            for name in ("worker-a", "worker-b"):
                log = tmp_path / f"{name}.log"
                worker = start_process([CLI, "worker"], env, log)
                processes.append((worker, log))
                workers[await worker_started(log, 20, alive=[worker])] = worker
            port = free_port()
            api_log = tmp_path / "api.log"
            api = start_process([CLI, "serve", "--no-worker", "--port", str(port)], env, api_log)
            processes.append((api, api_log))
            base = f"http://127.0.0.1:{port}"
            await wait_http_ok_async(f"{base}/health/ready", timeout=20, proc=api)
            token = token_factory(build_verifier(settings))(tenant="tenant-e2e", user="u1")
            headers = auth(token)
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                body = {
                    "items": [{"message": f"{i} {MESSAGE}"} for i in range(12)],
                    "max_parallel": 3,
                    "callback_url": f"{hook_base}/hooks",
                }
                created = await http.post("/api/v1/batch", json=body, headers=headers)
                assert created.status_code == 202, created.text
                batch_id = created.json()["id"]

                async def holding_an_item() -> str | None:
                    # A worker that holds a running item, once some have already ended.
                    view = (await http.get(f"/api/v1/batch/{batch_id}", headers=headers)).json()
                    owners = await _running_item_owners(pg_database, batch_id)
                    held = [owner for owner in owners if owner in workers]
                    return held[0] if view["counts"]["succeeded"] >= 2 and held else None

                victim = await wait_until(holding_an_item, 20, alive=workers.values())
                survivor = next(p for owner, p in workers.items() if owner != victim)
                workers[victim].send_signal(signal.SIGKILL)  # mid-item, leases and all
                workers[victim].wait(timeout=10)

                async def ended() -> Any:
                    view = (await http.get(f"/api/v1/batch/{batch_id}", headers=headers)).json()
                    return view if view["status"] != "running" else None

                await wait_until(ended, 60, alive=[survivor, api])
                view = (await http.get(f"/api/v1/batch/{batch_id}", headers=headers)).json()
                page = await http.get(
                    f"/api/v1/batch/{batch_id}/results", params={"limit": 100}, headers=headers
                )
                found = page.json()["items"]
                tasks = [
                    (await http.get(f"/api/v1/tasks/{item['task_id']}", headers=headers)).json()
                    for item in found
                ]
                replies = [
                    (
                        await http.get(
                            f"/api/v1/sessions/{item['session_id']}/messages", headers=headers
                        )
                    ).json()["items"]
                    for item in found
                ]
                await wait_until(lambda: len(Receiver.seen) >= 1, 20)
                await asyncio.sleep(1.5)  # a second POST would come within this
        finally:
            for proc, log in processes:
                stop_process(proc)
                print_log(log)

    assert view["status"] == "completed"
    assert view["counts"]["succeeded"] == 12
    assert [item["index"] for item in found] == list(range(12))
    assert all(item["status"] == "succeeded" for item in found)
    assert any(task["attempt"] == 2 for task in tasks)  # some ran again after the kill
    for item, stored in zip(found, replies, strict=True):
        assert [message["role"] for message in stored] == ["user", "assistant"]  # one reply
        assert stored[1]["id"] == item["result"]["message_id"]
    assert most_at_once(tasks) <= 3

    assert len(Receiver.seen) == 1
    sent, raw = Receiver.seen[0]
    expected = signature_of(SECRET, sent["webhook-id"], sent["webhook-timestamp"], raw)
    assert sent["webhook-signature"] == expected
    payload = json.loads(raw)
    assert payload["batch"]["id"] == batch_id
    assert payload["batch"]["counts"]["succeeded"] == 12


async def _running_item_owners(database_url: str, batch_id: str) -> list[str]:
    """The lease owners (worker ids) of the batch's running items, from the ledger."""
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        rows = await connection.fetch(
            "SELECT lease_owner FROM tasks WHERE batch_id = $1 AND status = 'running'",
            uuid.UUID(batch_id),
        )
    finally:
        await connection.close()
    return [row["lease_owner"] for row in rows if row["lease_owner"]]
