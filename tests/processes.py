"""Real processes for end-to-end tests: start, wait for, stop, and read their logs; plus
deadline-bounded waiting and a Server-Sent Events parser.

    log = tmp_path / "worker.log"
    proc = start_process([CLI, "worker"], env, log)
    try:
        ...
    finally:
        stop_process(proc)
        print_log(log)

Every process gets its own session (a signal sent to it reaches it alone, never pytest),
runs with cwd at the repository root and `tests` importable (TASK_HANDLER_MODULES=tests...),
and writes stdout and stderr to one log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The installed console script, next to the interpreter running the tests.
CLI = str(Path(sys.executable).with_name("agent-orchestrator"))


#: What `agent-orchestrator worker` logs once it runs; group 1 is its worker id.
WORKER_READY = re.compile(r"agent-orchestrator worker (\S+) running")


class ProcessFailed(RuntimeError):
    """A process exited, or did not become ready, when a test needed it."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Rate limits no test reaches unless it sets its own: the limiter still runs on every
#: request of every test (and benchmark), it just never refuses.
UNREACHED_RATE_LIMITS = {
    name: "100000000"
    for name in ("GLOBAL_RATE_LIMIT", "TENANT_RATE_LIMIT", "USER_RATE_LIMIT", "IP_RATE_LIMIT")
}


def process_env(**variables: str) -> dict[str, str]:
    """A minimal environment: PATH, a UTF-8 locale, the repository on PYTHONPATH (so a
    console script can import `tests.*` handler modules), unreached rate limits, plus
    `variables`."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
        **UNREACHED_RATE_LIMITS,
        **variables,
    }


def start_process(
    args: list[str], env: dict[str, str], log_path: Path, *, cwd: Path = REPO_ROOT
) -> subprocess.Popen[bytes]:
    """Start `args` with exactly `env`, stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0
) -> int:
    """Send `sig` (if it is still running) and wait up to `timeout`; then SIGKILL.
    Returns the exit code (negative: the signal that ended it)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return int(proc.returncode)


def read_log(log_path: Path, limit: int = 20_000) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return text if len(text) <= limit else "...\n" + text[-limit:]


def print_log(log_path: Path, limit: int = 20_000) -> None:
    """Print a process log; pytest shows it only when the test fails."""
    print(f"----- {log_path.name} -----\n{read_log(log_path, limit)}", flush=True)


def wait_http_ok(
    url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise ProcessFailed(f"process exited with {proc.returncode} before {url} was up")
            try:
                response = client.get(url)
                if response.status_code == 200:
                    return
                last = response.status_code
            except httpx.TransportError as error:
                last = error
            time.sleep(0.05)
    raise ProcessFailed(f"{url} did not answer 200 within {timeout} s (last: {last!r})")


async def wait_http_ok_async(
    url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    await asyncio.to_thread(wait_http_ok, url, timeout, proc)


async def wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float,
    *,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
    alive: Iterable[subprocess.Popen[bytes]] = (),
) -> Any:
    """Await `predicate` (sync or async) until it returns something truthy, and return it.
    Raises AssertionError after `timeout` seconds, or at once if a process in `alive` exits."""
    watched = list(alive)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        for proc in watched:
            if proc.poll() is not None:
                raise AssertionError(
                    f"process {proc.args!r} exited with {proc.returncode} while waiting for "
                    f"{message() if callable(message) else message}"
                )
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout} s waiting for {text}")
        await asyncio.sleep(interval)


def run_migrate(env: dict[str, str]) -> None:
    """`agent-orchestrator migrate` with exactly `env`; fail the test if it fails."""
    done = subprocess.run([CLI, "migrate"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


async def worker_started(
    log_path: Path,
    timeout: float = 20.0,
    *,
    alive: Iterable[subprocess.Popen[bytes]],
    name: str = "the worker",
) -> str:
    """Wait until the worker writing `log_path` logs that it runs; return its worker id.
    Fails after `timeout`, or at once if a process in `alive` exits."""

    def ready() -> str | None:
        found = WORKER_READY.search(read_log(log_path))
        return found.group(1) if found else None

    worker_id: str = await wait_until(ready, timeout, message=f"{name} to start", alive=alive)
    return worker_id


class SSEParser:
    """Incremental Server-Sent Events parser: feed it lines (without their line break).

    A blank line ends a frame. Each frame is a dict with the fields it had: `id`, `event`,
    `data` (lines joined with "\\n"), `retry`, and `comments` (the text after ":" of each
    comment line). Comment-only frames are kept too, so keep-alives can be counted.
    """

    def __init__(self) -> None:
        self._frame: dict[str, Any] = {}

    def feed(self, line: str) -> dict[str, Any] | None:
        line = line.rstrip("\r")
        if line == "":
            frame, self._frame = self._frame, {}
            return frame or None
        if line.startswith(":"):
            self._frame.setdefault("comments", []).append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._frame["data"] = (
                value if "data" not in self._frame else self._frame["data"] + "\n" + value
            )
        elif name in ("id", "event", "retry"):
            self._frame[name] = value
        return None


def parse_sse(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Every complete frame of `lines` (see SSEParser); a trailing partial frame is dropped."""
    parser = SSEParser()
    frames = []
    for line in lines:
        frame = parser.feed(line)
        if frame is not None:
            frames.append(frame)
    return frames
