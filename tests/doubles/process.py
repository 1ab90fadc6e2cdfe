"""Start the downstream test double as its own process, for tests and benchmarks.

    with running_double(service_token="s3cret", llm_api_key="k") as base_url:
        env = service_env(base_url)  # every *_URL plus LLM_BASE_URL
        ...

Keyword flags become command-line options (`llm_api_key="k"` -> `--llm-api-key k`,
`access_log=True` -> `--access-log`; None and False are left out).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]

# The orchestrator's base-URL variables; the double hosts every service on one base URL.
SERVICE_URL_VARIABLES = (
    "CONVERSATION_SERVICE_URL",
    "AGENT_MANAGEMENT_URL",
    "AGENT_EXECUTION_SERVICE_URL",
    "QUERY_SERVICE_URL",
    "EMBEDDING_SERVICE_URL",
    "INGESTION_SERVICE_URL",
    "WORKFLOW_ENGINE_URL",
    "TOOL_REGISTRY_URL",
    "IDENTITY_SERVICE_URL",
)


class DoubleFailedToStart(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(base_url: str, *, llm_api_key: str | None = None) -> dict[str, str]:
    """The orchestrator's variables that point every downstream service at the double."""
    env = dict.fromkeys(SERVICE_URL_VARIABLES, base_url)
    env["LLM_BASE_URL"] = f"{base_url}/v1"
    if llm_api_key is not None:
        env["LLM_API_KEY"] = llm_api_key
    return env


def _command(port: int, flags: dict[str, Any]) -> list[str]:
    args = [sys.executable, "-m", "tests.doubles.downstream", "--host", "127.0.0.1"]
    args += ["--port", str(port)]
    for name, value in flags.items():
        if value is None or value is False:
            continue
        option = "--" + name.replace("_", "-")
        args += [option] if value is True else [option, str(value)]
    return args


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, deadline: float) -> bool:
    """True once /_control/health answers; False if the process exited first."""
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                if client.get(f"{base_url}/_control/health").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise DoubleFailedToStart(f"the downstream double at {base_url} was not ready in time")


@contextmanager
def running_double(*, ready_timeout: float = 15.0, **flags: Any) -> Iterator[str]:
    """Runs `python -m tests.doubles.downstream` on a free port; yields its base URL.

    Waits up to `ready_timeout` seconds for readiness (retrying on another port if the
    chosen one was taken meanwhile) and terminates the process on exit.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    deadline = time.monotonic() + ready_timeout
    with tempfile.TemporaryFile() as log:
        for _attempt in range(3):
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            process = subprocess.Popen(
                _command(port, flags), cwd=REPO_ROOT, env=env, stdout=log, stderr=log
            )
            try:
                ready = _wait_ready(process, base_url, deadline)
            except DoubleFailedToStart:
                _stop(process)
                raise DoubleFailedToStart(
                    f"downstream double not ready within {ready_timeout} s; log:\n{_tail(log)}"
                ) from None
            except BaseException:
                _stop(process)
                raise
            if ready:
                break
            _stop(process)
        else:
            raise DoubleFailedToStart(f"downstream double exited; log:\n{_tail(log)}")
        try:
            yield base_url
        finally:
            _stop(process)
