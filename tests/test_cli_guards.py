"""Process roles that cannot work are refused at once, with one line naming the cause;
a worker serves its metrics when WORKER_METRICS_PORT is set."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_URL, clean_env
from tests.processes import CLI, free_port, start_process, stop_process


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        cwd=tmp_path,
        env=clean_env(DATA_DIR=str(tmp_path / "data"), SECRET_KEY="k" * 40, **env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_api_only_instance_without_redis_is_refused(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "serve", "--no-worker", "--port", str(free_port()))
    assert result.returncode != 0
    assert "REDIS_URI" in result.stderr
    assert "listening" not in result.stderr


def test_worker_without_redis_is_refused(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "worker")
    assert result.returncode != 0
    assert "REDIS_URI" in result.stderr


@pytest.mark.e2e
def test_worker_serves_metrics_on_its_port(
    tmp_path: Path, pg_database: str, redis_namespace: str
) -> None:
    port = free_port()
    env = clean_env(
        DATABASE_URL=pg_database,
        REDIS_URI=REDIS_URL,
        REDIS_NAMESPACE=redis_namespace,
        SECRET_KEY="k" * 40,
        DATA_DIR=str(tmp_path / "data"),
        WORKER_METRICS_PORT=str(port),
        LOG_LEVEL="WARNING",
    )
    proc = start_process([CLI, "worker"], env, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 20
        body = ""
        while time.monotonic() < deadline:
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert "nooble_orchestrator_tasks_finished_total" in body
    finally:
        stop_process(proc)
