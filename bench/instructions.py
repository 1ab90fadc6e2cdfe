"""Instructions per chat turn, counted by callgrind, in the embedded server or in the API
and worker processes of the production-like setup.

Wall-clock figures on this shared 2-core machine move by 15-30% from run to run; an
instruction count does not (the same code and inputs give the same total, whatever the
other core is doing), so it shows what a change to the hot path is worth. The counted
processes run under `valgrind --tool=callgrind`; after warm-up turns their counters are
zeroed, a number of sequential `mode=wait` turns run, and the counters are dumped.

- `--setup embedded` (default): `agent-orchestrator serve` (SQLite, echo model).
- `--setup production`: a fresh PostgreSQL database and Redis namespace, the downstream
  double for every service, `serve --no-worker` and `worker`, both counted; PostgreSQL,
  Redis and the double run natively and are not counted. Work that follows the clock
  rather than the turns (the queue's 0.25 s polls, lease renewals) is counted too, and
  takes longer under valgrind: a few percent of a turn, more on a slower host.

With `--baseline REF`, a git ref's `src` (checked out into a temporary worktree) is
counted in the same run, concurrently. Needs valgrind (with callgrind_control) on PATH.
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

from bench.chat import TENANT, _clean_env, _cli, _free_port, _token, _wait_log
from bench.common import DEFAULT_POSTGRES, DEFAULT_REDIS, ROOT, VENV_BIN, Report, machine, table
from bench.ws_harness import wait_ok

NAME = "instructions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--turns", type=int, default=100, help="counted turns (default 100)")
    parser.add_argument("--warmup", type=int, default=40, help="uncounted turns first")
    parser.add_argument(
        "--baseline", default=None, help="a git ref whose src is counted in the same run"
    )
    parser.add_argument("--setup", choices=["embedded", "production"], default="embedded")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES, help="production setup")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS, help="production setup")


@dataclass
class Count:
    label: str
    #: counted process ("serve", "worker") -> instructions over the counted turns
    instructions: dict[str, int]
    turns: int

    def per_turn(self, process: str | None = None) -> float:
        counted = self.instructions[process] if process else sum(self.instructions.values())
        return counted / self.turns


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


def _under_callgrind(
    argv: list[str], env: dict[str, str], home: Path, name: str
) -> tuple[subprocess.Popen[bytes], Path]:
    out = home / f"{name}.callgrind"
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    command += [str(VENV_BIN / "python"), *argv]
    with (home / f"{name}.log").open("ab") as sink:
        process = subprocess.Popen(command, env=env, cwd=home, stdout=sink, stderr=sink)
    return process, out


async def _counted_turns(
    base: str, token: str, args: argparse.Namespace, counted: dict[str, tuple[int, Path]]
) -> dict[str, int]:
    """Warm-up, zero the counters of every counted process, the turns, then dump."""
    await _turns(base, token, args.warmup)
    for pid, _ in counted.values():
        _control("-z", pid)
    await _turns(base, token, args.turns)
    totals = {}
    for name, (pid, out) in counted.items():
        _control("-d", pid)
        totals[name] = await asyncio.to_thread(_total, Path(f"{out}.1"))
    return totals


def _stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


async def _count(label: str, src: Path | None, args: argparse.Namespace, home: Path) -> Count:
    home.mkdir(parents=True)
    env = _clean_env()
    env.update(DATA_DIR=str(home / "data"), LOG_LEVEL="WARNING", ENVIRONMENT="development")
    if src is not None:
        env["PYTHONPATH"] = str(src)
    if args.setup == "production":
        totals = await _count_production(args, env, home)
    else:
        totals = await _count_embedded(args, env, home)
    count = Count(label, totals, args.turns)
    shares = ", ".join(f"{name} {count.per_turn(name) / 1e6:.2f} M" for name in totals)
    print(f"  {label}: {count.per_turn() / 1e6:.2f} M instructions per turn ({shares})")
    return count


async def _count_embedded(
    args: argparse.Namespace, env: dict[str, str], home: Path
) -> dict[str, int]:
    token = _token(env, home)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server, out = _under_callgrind(_cli("serve", "--port", str(port)), env, home, "serve")
    try:
        await wait_ok(f"{base}/health", server, timeout=600, log=home / "serve.log")
        return await _counted_turns(base, token, args, {"serve": (server.pid, out)})
    finally:
        _stop_all([server])


async def _count_production(
    args: argparse.Namespace, env: dict[str, str], home: Path
) -> dict[str, int]:
    from tests.doubles.process import running_double, service_env

    from bench.chat import Production

    infra = Production(args)
    await infra.create()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with running_double() as double:
            env.update(
                DATABASE_URL=infra.database_url,
                REDIS_URI=args.redis_url,
                REDIS_NAMESPACE=infra.namespace,
                AUTO_MIGRATE="false",
                **service_env(double),
            )
            subprocess.run(_cli("migrate"), env=env, cwd=home, check=True, capture_output=True)
            token = _token(env, home)
            port = _free_port()
            base = f"http://127.0.0.1:{port}"
            serve, serve_out = _under_callgrind(
                _cli("serve", "--no-worker", "--port", str(port)), env, home, "serve"
            )
            processes.append(serve)
            worker, worker_out = _under_callgrind(_cli("worker"), env, home, "worker")
            processes.append(worker)
            await wait_ok(f"{base}/health", serve, timeout=600, log=home / "serve.log")
            await _wait_log("running", worker, home / "worker.log", timeout=600)
            counted = {"serve": (serve.pid, serve_out), "worker": (worker.pid, worker_out)}
            return await _counted_turns(base, token, args, counted)
    finally:
        _stop_all(processes)
        await infra.drop()


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
    if args.setup == "production":
        report = Report(NAME, command, machine(args.redis_url, args.postgres_url))
    else:
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
    processes = list(counts[0].instructions)
    rows = [
        [
            c.label,
            f"{c.per_turn() / 1e6:.2f}",
            *(f"{c.per_turn(p) / 1e6:.2f}" for p in processes),
            str(c.turns),
        ]
        for c in counts
    ]
    if args.setup == "production":
        what = (
            "the production-like setup (fresh PostgreSQL database and Redis namespace, "
            "downstream double for every service): `serve --no-worker` and `worker` under "
            "callgrind, PostgreSQL, Redis and the double not counted"
        )
    else:
        what = "`agent-orchestrator serve` (embedded, echo model) under callgrind"
    lines = [
        f"### Instructions per chat turn, {args.setup} (callgrind)",
        "",
        f"{what}: {args.warmup} warm-up turns, counters zeroed, then {args.turns} sequential "
        f"`mode=wait` turns (tenant {TENANT}, a new session each); every thread of each "
        "counted process (the load generator is another process).",
        "",
        *table(
            ["code", "M instructions per turn", *(f"of which {p}" for p in processes), "turns"],
            rows,
        ),
    ]
    if len(counts) == 2:
        ratio = counts[1].per_turn() / counts[0].per_turn()
        lines += ["", f"Baseline / this checkout: **{ratio:.2f}x**."]
    report.markdown = lines
    report.console = lines
    return report


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("run it as: python -m bench.run instructions")
