"""Process plumbing for bench/websocket.py: client processes spoken to in JSON lines, and
what is read about the server process (RSS, CPU) and its readiness."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Client:
    """One ws_client.py process, spoken to in JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, url: str, token: str) -> Client:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.ws_client", "--url", url, "--token", token,
            cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=2**26,
        )  # fmt: skip
        return cls(proc)

    async def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()

    async def read(self, timeout: float = 600) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"client process exited ({await self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, **command: Any) -> dict[str, Any]:
        await self.send(**command)
        return await self.read()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            await self.send(cmd="exit")
            await asyncio.wait_for(self.proc.wait(), 60)


def split(total: int, capacity: list[int]) -> list[int]:
    shares, left = [], total
    for index, room in enumerate(capacity):
        share = min(room, -(-left // (len(capacity) - index)))
        shares.append(share)
        left -= share
    return shares


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ok(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 60, log: Path | None = None
) -> None:
    """Until `url` answers 200; fails when the process exits or `timeout` passes, with the
    tail of its `log` when there is one."""
    from bench.queue_bench import _tail

    def failure(what: str) -> RuntimeError:
        return RuntimeError(f"{url} {what}" + (f":\n{_tail(log)}" if log else ""))

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=1) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise failure(f"exited with {proc.returncode}")
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise failure(f"not ready in {timeout:g} s")
