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
  Redis and the double run natively and are not counted.

Work that follows the clock rather than the turns (the queue's polls, timers, the WAL
checkpoint thread) runs at its usual rate per second while valgrind makes each turn ~50
times longer, so it would count ~50 times over per turn: an idle spell before the turns
measures its rate, and that rate times the turns' duration is taken off. In the
production-like worker it was most of the raw count.

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
    parser.add_argument(
        "--idle-seconds", type=float, default=10.0, help="idle spell counted before the turns"
    )
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES, help="production setup")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS, help="production setup")


@dataclass
class Measured:
    """One counted process: its instructions over the counted turns, and per second of an
    idle spell just before (the queue's polls, timers: work that follows the clock, which
    runs ~50 times slower under valgrind, so per turn it would count ~50 times over)."""

    total: int
    idle_per_second: float


@dataclass
class Count:
    label: str
    processes: dict[str, Measured]
    turns: int
    #: wall-clock seconds the counted turns took
    seconds: float

    def per_turn(self, process: str | None = None) -> float:
        """Instructions per turn, the idle rate over the turns' duration taken off."""
        chosen = [self.processes[process]] if process else list(self.processes.values())
        work = sum(m.total - m.idle_per_second * self.seconds for m in chosen)
        return work / self.turns

    def raw_per_turn(self) -> float:
        return sum(m.total for m in self.processes.values()) / self.turns


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
) -> tuple[dict[str, Measured], float]:
    """Warm-up; an idle spell counted; the turns counted. Returns what each process
    counted and the turns' wall-clock duration."""
    await _turns(base, token, args.warmup)
    durations = []
    for spell in ("idle", "turns"):
        for pid, _ in counted.values():
            _control("-z", pid)
        started = time.monotonic()
        if spell == "idle":
            await asyncio.sleep(args.idle_seconds)
        else:
            await _turns(base, token, args.turns)
        elapsed = time.monotonic() - started
        for pid, _ in counted.values():
            _control("-d", pid)
        durations.append(elapsed)
    measured = {}
    for name, (_, out) in counted.items():
        idle = await asyncio.to_thread(_total, Path(f"{out}.1"))
        total = await asyncio.to_thread(_total, Path(f"{out}.2"))
        measured[name] = Measured(total, idle / durations[0])
    return measured, durations[1]


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
        measured, seconds = await _count_production(args, env, home)
    else:
        measured, seconds = await _count_embedded(args, env, home)
    count = Count(label, measured, args.turns, seconds)
    shares = ", ".join(f"{name} {count.per_turn(name) / 1e6:.2f} M" for name in measured)
    print(
        f"  {label}: {count.per_turn() / 1e6:.2f} M instructions per turn ({shares}; "
        f"{count.raw_per_turn() / 1e6:.2f} M before taking the idle rate off)",
        flush=True,
    )
    return count


async def _count_embedded(
    args: argparse.Namespace, env: dict[str, str], home: Path
) -> tuple[dict[str, Measured], float]:
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
) -> tuple[dict[str, Measured], float]:
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
    processes = list(counts[0].processes)
    rows = [
        [
            c.label,
            f"{c.per_turn() / 1e6:.2f}",
            *(f"{c.per_turn(p) / 1e6:.2f}" for p in processes),
            f"{c.raw_per_turn() / 1e6:.2f}",
            ", ".join(f"{p} {m.idle_per_second / 1e6:.1f} M/s" for p, m in c.processes.items()),
            f"{c.seconds / c.turns:.2f} s",
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
        f"{what}: {args.warmup} warm-up turns; counters zeroed, {args.idle_seconds:g} s "
        f"with no turn (the idle rate); counters zeroed, {args.turns} sequential "
        f"`mode=wait` turns (tenant {TENANT}, a new session each); every thread of each "
        "counted process (the load generator is another process). Per turn = (the "
        "turns' count - the idle rate x their duration) / turns: work that follows the "
        "clock (the queue's polls, timers) is ~50 times slower under valgrind, so it "
        "would otherwise count about 50 times over.",
        "",
        *table(
            [
                "code",
                "M instructions per turn",
                *(f"of which {p}" for p in processes),
                "raw (idle not taken off)",
                "idle rate",
                "wall time per turn",
                "turns",
            ],
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
