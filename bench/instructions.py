"""Instructions per chat turn in the embedded server, counted by callgrind.

Wall-clock figures on this shared 2-core machine move by 15-30% from run to run; an
instruction count does not (the same code and inputs give the same total, whatever the
other core is doing), so it shows what a change to the hot path is worth. The embedded
server (`agent-orchestrator serve`, SQLite, echo model) runs under `valgrind
--tool=callgrind`; after warm-up turns its counters are zeroed, a number of sequential
`mode=wait` turns run, and the counters are dumped. With `--baseline REF`, a git ref's
`src` (checked out into a temporary worktree) is counted in the same run, concurrently
(each valgrind uses one core). Needs valgrind (with callgrind_control) on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.chat import TENANT, _clean_env, _cli, _free_port, _token
from bench.common import ROOT, VENV_BIN, Report, machine, table
from bench.ws_harness import wait_ok

NAME = "instructions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--turns", type=int, default=100, help="counted turns (default 100)")
    parser.add_argument("--warmup", type=int, default=40, help="uncounted turns first")
    parser.add_argument(
        "--baseline", default=None, help="a git ref whose src is counted in the same run"
    )


@dataclass
class Count:
    label: str
    instructions: int
    turns: int

    @property
    def per_turn(self) -> float:
        return self.instructions / self.turns


async def _turns(base: str, token: str, count: int) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    body = {"message": "hello there", "mode": "wait"}
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        for _ in range(count):
            response = await client.post("/api/v1/chat", json=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"turn failed: {response.status_code} {response.text}")


def _control(option: str, pid: int) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True)


def _total(dump: Path, timeout: float = 60) -> int:
    """The `totals:` of a callgrind dump, once the file is complete."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dump.exists():
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    return int(line.split()[1])
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind dump at {dump}")


async def _count(label: str, src: Path | None, args: argparse.Namespace, home: Path) -> Count:
    home.mkdir(parents=True)
    env = _clean_env()
    env.update(DATA_DIR=str(home / "data"), LOG_LEVEL="WARNING", ENVIRONMENT="development")
    if src is not None:
        env["PYTHONPATH"] = str(src)
    token = _token(env, home)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    out = home / "callgrind.out"
    argv = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        str(VENV_BIN / "python"),
        *_cli("serve", "--port", str(port)),
    ]
    log = home / "serve.log"
    with log.open("ab") as sink:
        server = subprocess.Popen(argv, env=env, cwd=home, stdout=sink, stderr=sink)
    try:
        await wait_ok(f"{base}/health", server, timeout=600, log=log)
        await _turns(base, token, args.warmup)
        subprocess.run(
            ["callgrind_control", "-z", str(server.pid)], check=True, capture_output=True
        )
        await _turns(base, token, args.turns)
        subprocess.run(
            ["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True
        )
        total = await asyncio.to_thread(_total, Path(f"{out}.1"))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"  {label}: {total / args.turns / 1e6:.2f} M instructions per turn", flush=True)
    return Count(label, total, args.turns)


def _worktree(ref: str, into: Path) -> str:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(into), ref],
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        ["git", "-C", str(into), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


async def _measure(args: argparse.Namespace, workdir: Path) -> list[Count]:
    jobs = [_count("this checkout", None, args, workdir / "current")]
    if args.baseline:
        commit = _worktree(args.baseline, workdir / "baseline-src")
        src = workdir / "baseline-src" / "src"
        jobs.append(_count(f"baseline {args.baseline} ({commit})", src, args, workdir / "base"))
    return list(await asyncio.gather(*jobs))


def run(args: argparse.Namespace, command: str) -> Report:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"instructions: {tool} is not on PATH (Debian package valgrind)")
    report = Report(NAME, command, machine("not used", "not used (SQLite)"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    try:
        counts = asyncio.run(_measure(args, workdir))
    finally:
        if args.baseline:
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(ROOT),
                    "worktree",
                    "remove",
                    "--force",
                    str(workdir / "baseline-src"),
                ],
                check=False,
                capture_output=True,
            )
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [[c.label, f"{c.per_turn / 1e6:.2f}", str(c.turns)] for c in counts]
    lines = [
        "### Instructions per embedded chat turn (callgrind)",
        "",
        f"`agent-orchestrator serve` (embedded, echo model) under callgrind: {args.warmup} "
        f"warm-up turns, counters zeroed, then {args.turns} sequential `mode=wait` turns "
        f"(tenant {TENANT}, a new session each); instructions of the server process only, "
        "every thread (the load generator is another process).",
        "",
        *table(["code", "M instructions per turn", "turns"], rows),
    ]
    if len(counts) == 2:
        ratio = counts[1].per_turn / counts[0].per_turn
        lines += ["", f"Baseline / this checkout: **{ratio:.2f}x**."]
    report.markdown = lines
    report.console = lines
    return report


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("run it as: python -m bench.run instructions")
