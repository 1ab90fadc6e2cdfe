"""End to end over real HTTP against real `agent-orchestrator serve` processes: the embedded
default with nothing configured, then PostgreSQL + Redis after `agent-orchestrator migrate`.
Sessions survive a restart and so does the token."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REDIS_URL, clean_env
from tests.processes import CLI

pytestmark = pytest.mark.e2e

WAIT_SECONDS = 20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@contextmanager
def served(workdir: Path, env: dict[str, str]) -> Iterator[tuple[httpx.Client, str]]:
    """`serve` on a free port until /health answers; stopped with SIGTERM (then SIGKILL)."""
    port = _free_port()
    log = workdir / f"serve-{port}.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [CLI, "serve", "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            deadline = time.monotonic() + WAIT_SECONDS
            while True:
                assert process.poll() is None, f"serve exited early:\n{_tail(log)}"
                assert time.monotonic() < deadline, f"no /health in {WAIT_SECONDS}s:\n{_tail(log)}"
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            yield http, _tail(log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=WAIT_SECONDS)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught.
    clean = process.returncode in (0, -signal.SIGTERM) and "shutdown complete" in _tail(log)
    assert clean, f"unclean shutdown ({process.returncode}):\n{_tail(log)}"


def _cli(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
        check=False,
    )


def _token(workdir: Path, env: dict[str, str]) -> dict[str, str]:
    result = _cli(workdir, env, "token", "--tenant", "t", "--user", "u")
    assert result.returncode == 0, result.stderr
    return {"Authorization": f"Bearer {result.stdout.strip()}"}


def _session_lifecycle(http: httpx.Client, headers: dict[str, str]) -> dict[str, Any]:
    """Create, list, read, patch and close a session; returns the closed session."""
    created = http.post("/api/v1/sessions", json={"metadata": {"channel": "e2e"}}, headers=headers)
    assert created.status_code == 201, created.text
    session = created.json()
    assert (session["tenant_id"], session["user_id"], session["state"]) == ("t", "u", "active")
    url = f"/api/v1/sessions/{session['id']}"

    listed = http.get("/api/v1/sessions", headers=headers)
    assert listed.status_code == 200
    assert [item["id"] for item in listed.json()["items"]] == [session["id"]]

    read = http.get(url, headers=headers)
    assert read.status_code == 200
    assert read.json() == session

    patched = http.patch(url, json={"metadata": {"channel": "e2e", "step": 2}}, headers=headers)
    assert patched.status_code == 200, patched.text
    assert patched.json()["metadata"] == {"channel": "e2e", "step": 2}

    closed = http.delete(url, headers=headers)
    assert closed.status_code == 200
    assert closed.json()["state"] == "closed"
    assert http.patch(url, json={}, headers=headers).status_code == 409
    return dict(closed.json())


def _still_there(http: httpx.Client, headers: dict[str, str], session: dict[str, Any]) -> None:
    read = http.get(f"/api/v1/sessions/{session['id']}", headers=headers)
    assert read.status_code == 200, read.text
    assert read.json() == session
    closed = http.get("/api/v1/sessions", params={"state": "closed"}, headers=headers)
    assert [item["id"] for item in closed.json()["items"]] == [session["id"]]


def test_embedded_default_with_nothing_configured(tmp_path: Path) -> None:
    env = clean_env()  # no DATABASE_URL, REDIS_URI or SECRET_KEY; DATA_DIR defaults to ./data
    with served(tmp_path, env) as (http, output):
        assert "listening on http://127.0.0.1:" in output
        assert http.get("/api/v1/sessions").status_code == 401
        headers = _token(tmp_path, env)
        session = _session_lifecycle(http, headers)
        ready = http.get("/health/ready").json()
        assert ready["dependencies"] == {"database": {"status": "ok"}}

    assert (tmp_path / "data" / "orchestrator.db").is_file()
    assert (tmp_path / "data" / "secret_key").is_file()

    with served(tmp_path, env) as (http, _output):
        _still_there(http, headers, session)  # the same token, after a restart


def test_postgresql_and_redis_after_migrate(
    tmp_path: Path, pg_empty_database: str, redis_namespace: str
) -> None:
    env = clean_env(
        ENVIRONMENT="production",
        DATABASE_URL=pg_empty_database,
        REDIS_URI=REDIS_URL,
        REDIS_NAMESPACE=redis_namespace,
        SECRET_KEY="e2e-secret-key-0123456789abcdef0123456789abcdef",
        SERVICE_TOKEN="e2e-service-token",
        DATA_DIR=str(tmp_path / "data"),
    )

    refused = _cli(tmp_path, env, "serve", "--port", str(_free_port()))
    assert refused.returncode != 0
    assert "agent-orchestrator migrate" in refused.stdout + refused.stderr

    migrated = _cli(tmp_path, env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "database at revision" in migrated.stderr

    env["AUTO_MIGRATE"] = "false"
    headers = _token(tmp_path, env)
    with served(tmp_path, env) as (http, output):
        assert "production mode" in output
        session = _session_lifecycle(http, headers)
        ready = http.get("/health/ready").json()
        assert ready["dependencies"] == {"database": {"status": "ok"}, "redis": {"status": "ok"}}

    assert not (tmp_path / "data").exists(), "production writes nothing to DATA_DIR"

    with served(tmp_path, env) as (http, _output):
        _still_there(http, headers, session)


def test_sigterm_ends_serve_while_a_stream_is_still_open(tmp_path: Path) -> None:
    """An open SSE stream gets SHUTDOWN_GRACE to end, then is closed: it no longer holds
    the process (and its worker, still claiming) up until the stream's own end."""
    env = clean_env()
    env.update(SHUTDOWN_GRACE="1", ECHO_CHUNK_DELAY="1")  # the turn streams for a minute
    long_message = " ".join(f"word{i}" for i in range(60))
    streaming = threading.Event()
    with served(tmp_path, env) as (http, _output):
        headers = _token(tmp_path, env)

        def follow() -> None:
            body = {"message": long_message, "mode": "stream"}
            with (
                httpx.Client(base_url=str(http.base_url), timeout=120) as client,
                contextlib.suppress(httpx.HTTPError),
                client.stream("POST", "/api/v1/chat", json=body, headers=headers) as stream,
            ):
                for line in stream.iter_lines():
                    if line.startswith("event: chat.stream"):
                        streaming.set()

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        assert streaming.wait(15), "the stream never started"
        asked = time.monotonic()
    # `served` sent SIGTERM and checked the shutdown was clean.
    assert time.monotonic() - asked < 10
    reader.join(5)
    assert not reader.is_alive(), "the stream was not closed"
