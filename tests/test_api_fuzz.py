"""The OpenAPI document against the real server (reliability B1).

schemathesis reads `/openapi.json` from a `serve` process, in its embedded default and
in production mode (PostgreSQL and Redis), and sends it requests over HTTP, valid and
invalid, in all its phases: coverage (boundary and edge values of every parameter),
fuzzing, and stateful (operations chained through the links it infers: create a session,
read it, chat in it, cancel the turn, ...). Every answer is checked: no 5xx; status,
content type, headers and body as documented (the Server-Sent Events of `mode=stream`
and `/events` included); invalid input rejected, valid input accepted; auth not ignored;
`Allow` on a 405 right. Half the ids it puts in paths are of sessions, turns and batches the test
made first. Seed, example count and the check that does not apply here, with why, are in
tests/fuzz/schemathesis.toml. The JUnit report goes to TEST_REPORTS_DIR when CI sets it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REDIS_URL
from tests.processes import (
    CLI,
    REPO_ROOT,
    free_port,
    print_log,
    process_env,
    start_process,
    stop_process,
    wait_http_ok,
)

pytestmark = pytest.mark.e2e

SCHEMATHESIS = str(Path(sys.executable).with_name("st"))
CONFIG = REPO_ROOT / "tests" / "fuzz" / "schemathesis.toml"
SERVICE_TOKEN = "fuzz-service-token"


@pytest.fixture(params=["embedded", "production"])
def served(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, Path, dict[str, str]]]:
    """`serve` with nothing configured but a service token (for `/internal`); or in
    production mode on a fresh PostgreSQL database and Redis namespace (PostgreSQL
    refuses text that SQLite stores: the same document must hold on both)."""
    variables = {"DATA_DIR": str(tmp_path / "data"), "SERVICE_TOKEN": SERVICE_TOKEN}
    if request.param == "production":
        variables |= {
            "ENVIRONMENT": "production",
            "DATABASE_URL": request.getfixturevalue("pg_database"),
            "REDIS_URI": REDIS_URL,
            "REDIS_NAMESPACE": request.getfixturevalue("redis_namespace"),
            "SECRET_KEY": "fuzz-secret-key-0123456789abcdef0123456789abcdef",
        }
    env = process_env(**variables)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_process([CLI, "serve", "--port", str(port)], env, log, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{base}/health", proc=proc)
        yield base, tmp_path, env
        assert proc.poll() is None, "serve exited during the run"
    finally:
        stop_process(proc)
        print_log(log, limit=5_000)


def user_token(workdir: Path, env: dict[str, str]) -> str:
    minted = subprocess.run(
        [CLI, "token", "--tenant", "fuzz", "--user", "fuzzer"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return minted.stdout.strip()


def issued_cursor(http: httpx.Client) -> str:
    """A page cursor as the API issues one: sessions listed one per page."""
    page = http.get("/api/v1/sessions", params={"limit": 1}).json()
    assert page["next_cursor"], page
    return str(page["next_cursor"])


def existing_ids(http: httpx.Client, workdir: Path) -> None:
    """Three chat turns, their sessions and tasks, and a batch, written as schemathesis
    dictionaries (one quoted value per line) next to the copy of the configuration."""
    sessions, tasks = [], []
    for i in range(3):
        answer = http.post("/api/v1/chat", json={"message": f"seed {i}", "mode": "wait"})
        assert answer.status_code == 200, answer.text
        sessions.append(answer.json()["task"]["session_id"])
        tasks.append(answer.json()["task"]["id"])
    batch = http.post("/api/v1/batch", json={"items": [{"message": "seed"}, {"message": "b"}]})
    assert batch.status_code == 202, batch.text
    batches = [batch.json()["id"]]
    for name, values in (("sessions", sessions), ("tasks", tasks), ("batches", batches)):
        (workdir / f"{name}.txt").write_text("".join(f'"{value}"\n' for value in values))


def test_every_operation_answers_as_its_openapi_document_says(
    served: tuple[str, Path, dict[str, str]],
) -> None:
    base, workdir, env = served
    token = user_token(workdir, env)
    config = workdir / CONFIG.name
    shutil.copy(CONFIG, config)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
        existing_ids(http, workdir)
        cursor = issued_cursor(http)
    mode = "production" if env.get("ENVIRONMENT") == "production" else "embedded"
    junit = workdir / f"schemathesis-junit-{mode}.xml"
    run = subprocess.run(
        [
            SCHEMATHESIS,
            "--config-file",
            str(config),
            "run",
            f"{base}/openapi.json",
            "--report",
            "junit",
            "--report-junit-path",
            str(junit),
        ],
        cwd=workdir,
        env={
            **env,
            "FUZZ_USER_TOKEN": token,
            "FUZZ_SERVICE_TOKEN": SERVICE_TOKEN,
            "FUZZ_CURSOR": cursor,
            "NO_COLOR": "1",
        },
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if reports := os.environ.get("TEST_REPORTS_DIR"):
        Path(reports).mkdir(parents=True, exist_ok=True)
        shutil.copy(junit, Path(reports) / junit.name)
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]

    # It ran, and on every operation of the document (a schema it could not load, or
    # filters that selected nothing, would also exit 0 with nothing tested).
    operations = {
        f"{method.upper()} {path}"
        for path, methods in _document(base)["paths"].items()
        for method in methods
    }
    # The report is the one schemathesis just wrote here, not outside input.
    cases = ElementTree.parse(junit).getroot().iter("testcase")  # noqa: S314
    tested = {case.get("name") for case in cases}
    assert "POST /api/v1/chat" in operations
    assert operations <= tested, sorted(operations - tested)


def _document(base: str) -> dict[str, Any]:
    answer = httpx.get(f"{base}/openapi.json", timeout=30)
    assert answer.status_code == 200, answer.text[:2000]
    document: dict[str, Any] = answer.json()
    return document
