"""Queue benchmark: this engine against RQ (the seed's choice), same Redis, same run.

This engine is SAQ deliveries plus the PostgreSQL ledger; RQ is the seed's choice.

1. Throughput: N tasks that each await 0.2 s of I/O, one worker process. Wall time from the
   first submit (engine: through `TaskLedger.submit`, the API's path) or enqueue (RQ) to
   the last task finished.
2. Enqueue-to-start latency at low load: tasks submitted one at a time, 20 ms apart; each
   handler records the wall-clock time it started. Engine: from the moment the submit
   transaction commits (the after-commit enqueue starts then) to the handler start. RQ:
   from just before `Queue.enqueue` to the job function's start.

The engine runs against a PostgreSQL database created for the run (and dropped after) and
a Redis namespace of its own; RQ uses a dedicated Redis DB number. Both are cleaned up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench.common import (
    DEFAULT_POSTGRES,
    DEFAULT_REDIS,
    ROOT,
    VENV_BIN,
    Report,
    create_run_database,
    drop_run_resources,
    machine,
    median,
    percentile,
    table,
)

NAME = "queue"
KIND = "bench.io"
SECRET = "bench-secret-key-0123456789abcdef0123456789abcdef"

#: Prior measurements on this kind of VM (shared/reference/queues.md), for context only.
PRIOR = {"rq_wall": 219.8, "rq_p50": 13.6, "saq_wall": 2.33, "saq_p50": 1.8}
TARGET_RATIO = 50.0
TARGET_P50_MS = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, default=1000, help="engine tasks (default 1000)")
    parser.add_argument(
        "--rq-tasks",
        type=int,
        default=1000,
        help="RQ jobs (default 1000, ~220 s); fewer gives a quick run whose wall time is "
        "also extrapolated per task to --tasks",
    )
    parser.add_argument("--seconds", type=float, default=0.2, help="I/O wait per task")
    parser.add_argument("--latency-tasks", type=int, default=200)
    parser.add_argument("--latency-gap", type=float, default=0.02, help="seconds between submits")
    parser.add_argument(
        "--repeat", type=int, default=3, help="engine runs and latency runs (medians reported)"
    )
    parser.add_argument("--rq-repeat", type=int, default=1, help="RQ throughput runs")
    parser.add_argument(
        "--submit-concurrency",
        type=int,
        default=8,
        help="concurrent submitters (each submit is its own transaction, as an API request)",
    )
    parser.add_argument(
        "--db-pool-size", type=int, default=10, help="worker DB_POOL_SIZE (pool + overflow)"
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS))
    parser.add_argument("--rq-db", type=int, default=14, help="Redis DB number for RQ (emptied)")
    parser.add_argument(
        "--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES)
    )
    parser.add_argument("--skip-rq", action="store_true", help="measure only this engine")


# --- small helpers ----------------------------------------------------------------------


def _with_db(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def _redis_db(url: str, db: int) -> str:
    return _with_db(url, str(db))


def _epoch(moment: datetime) -> float:
    return moment.timestamp()


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _stop(process: subprocess.Popen[bytes], grace: float = 30) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Throughput:
    tasks: int
    wall: float  # first submit/enqueue -> last finished
    submit_seconds: float  # first submit -> last submit returned
    detected: float | None = None  # when the poll saw the last one (engine)
    not_ok: int = 0
    worker_cpu: float = float("nan")  # CPU seconds of the worker process during the run
    submitter_cpu: float = float("nan")  # CPU seconds of the submitting (bench) process
    first_start: float = float("nan")  # seconds from the first submit to the first job start

    def extrapolate(self, tasks: int) -> float:
        """RQ wall time for `tasks` jobs from this run: enqueueing scales with the count,
        the worker's start-up does not, and jobs run one after another at the measured
        pace ((last end - first start) / jobs)."""
        if tasks == self.tasks:
            return self.wall
        per_job = (self.wall - self.first_start) / self.tasks
        startup = self.first_start - self.submit_seconds
        return self.submit_seconds * tasks / self.tasks + startup + per_job * tasks

    @property
    def submit_rate(self) -> float:
        return self.tasks / self.submit_seconds if self.submit_seconds > 0 else float("nan")


@dataclass
class Latency:
    samples_ms: list[float]
    parts_ms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples_ms, 99)


# --- this engine --------------------------------------------------------------------------


class EngineHarness:
    """A fresh PostgreSQL database (migrated with `agent-orchestrator migrate`), one
    `agent-orchestrator worker` process, and this process's state built like an API
    instance's (`build_state(run_worker=False)`)."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        suffix = uuid.uuid4().hex[:10]
        self.database = f"ao_bench_{suffix}"
        self.namespace = f"aobench-{suffix}"
        self.database_url = _with_db(args.postgres_url, self.database)
        self.log_path = workdir / "engine-worker.log"
        self.worker: subprocess.Popen[bytes] | None = None
        self.state: Any = None
        self.peak_rss_mib: float | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URI=self.args.redis_url,
            REDIS_NAMESPACE=self.namespace,
            ENVIRONMENT="development",
            AUTO_MIGRATE="false",
            SECRET_KEY=SECRET,
            DATA_DIR=str(self.workdir / "data"),
            MAX_CONCURRENT_TASKS=str(max(self.args.tasks, 100)),
            DB_POOL_SIZE=str(self.args.db_pool_size),
            LOG_LEVEL="WARNING",
            TASK_HANDLER_MODULES="bench.handlers",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        )
        return env

    async def __aenter__(self) -> EngineHarness:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _start(self) -> None:
        await create_run_database(self.args.postgres_url, self.database)
        cli = str(VENV_BIN / "agent-orchestrator")
        subprocess.run([cli, "migrate"], env=self.env(), cwd=ROOT, check=True, capture_output=True)
        with self.log_path.open("wb") as log:
            self.worker = subprocess.Popen(
                self.worker_argv(), env=self.env(), cwd=ROOT, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 60
        while "running" not in self.log_path.read_text(errors="replace"):
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("engine worker did not start:\n" + _tail(self.log_path))
            await asyncio.sleep(0.05)
        await self._build_state()

    def worker_argv(self) -> list[str]:
        return [str(VENV_BIN / "agent-orchestrator"), "worker"]

    async def _build_state(self) -> None:
        from agent_orchestrator.config import Settings
        from agent_orchestrator.lifecycle import build_state
        from agent_orchestrator.observability.logging import configure_logging
        from agent_orchestrator.state import build_verifier

        configure_logging("WARNING")
        settings = Settings(
            database_url=self.database_url,
            redis_uri=self.args.redis_url,
            redis_namespace=self.namespace,
            secret_key=SECRET,
            data_dir=self.workdir / "data",
            auto_migrate=False,
            db_pool_size=max(self.args.submit_concurrency, 5),
            log_level="WARNING",
            _env_file=None,
        )
        self.state = await build_state(settings, build_verifier(settings), run_worker=False)

    async def __aexit__(self, *exc: object) -> None:
        from agent_orchestrator.lifecycle import close_state

        if self.worker is not None:
            self.peak_rss_mib = _peak_rss_mib(self.worker.pid)
            await asyncio.to_thread(_stop, self.worker)
        if self.state is not None:
            await close_state(self.state)
        await drop_run_resources(
            self.args.redis_url, self.namespace, self.args.postgres_url, self.database
        )

    # --- measurements -----------------------------------------------------------------
    def _principal(self, tenant: str) -> Any:
        from agent_orchestrator.models.principal import Principal

        return Principal(tenant_id=tenant, user_id="bench", scopes=frozenset())

    def _submission(self, seconds: float) -> Any:
        from agent_orchestrator.services.task_ledger import Submission

        queue = self.state.settings.queue_interactive
        return Submission(kind=KIND, queue=queue, input={"seconds": seconds})

    async def _count(self, tenant: str) -> tuple[int, int]:
        from sqlalchemy import text

        query = text(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'), "
            "count(*) FILTER (WHERE status IN ('failed', 'cancelled', 'timed_out')) "
            "FROM tasks WHERE tenant_id = :t"
        )
        async with self.state.engine.connect() as conn:
            ok, bad = (await conn.execute(query, {"t": tenant})).one()
        return int(ok), int(bad)

    async def _wait_done(self, tenant: str, n: int, timeout: float) -> tuple[float, int]:
        """Poll with one COUNT query every 50 ms until all n ended; returns when seen."""
        deadline = time.monotonic() + timeout
        while True:
            ok, bad = await self._count(tenant)
            if ok + bad >= n:
                return time.time(), bad
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ok} of {n} tasks succeeded ({bad} failed) in {timeout} s")
            await asyncio.sleep(0.05)

    async def throughput(self, n: int, seconds: float, tenant: str) -> Throughput:
        from sqlalchemy import text

        from agent_orchestrator.db.engine import UnitOfWork

        ledger, factory = self.state.ledger, self.state.db_factory
        principal, submission = self._principal(tenant), self._submission(seconds)
        pending = iter(range(n))

        async def submitter() -> None:
            for _ in pending:  # shared: each submitter takes the next task number
                async with UnitOfWork(factory) as uow:
                    await ledger.submit(uow, principal, submission)

        assert self.worker is not None
        cpu_worker, cpu_self = _cpu_seconds(self.worker.pid), time.process_time()
        first = time.time()
        await asyncio.gather(*(submitter() for _ in range(self.args.submit_concurrency)))
        submitted = time.time()
        cpu_submit = time.process_time() - cpu_self
        detected, bad = await self._wait_done(tenant, n, timeout=120 + n * seconds)
        cpu_worker = _cpu_seconds(self.worker.pid) - cpu_worker
        async with self.state.engine.connect() as conn:
            last = (
                await conn.execute(
                    text("SELECT max(finished_at) FROM tasks WHERE tenant_id = :t"), {"t": tenant}
                )
            ).scalar_one()
        return Throughput(
            n,
            _epoch(last) - first,
            submitted - first,
            detected - first,
            bad,
            worker_cpu=cpu_worker,
            submitter_cpu=cpu_submit,
        )

    async def latency(self, n: int, gap: float, tenant: str) -> Latency:
        from sqlalchemy import text

        from agent_orchestrator.db.engine import UnitOfWork

        ledger, factory = self.state.ledger, self.state.db_factory
        principal, submission = self._principal(tenant), self._submission(0.0)
        marks: list[tuple[str, float, float]] = []  # task id, committed, enqueued
        begin = time.perf_counter()
        for i in range(n):
            await asyncio.sleep(max(0.0, begin + i * gap - time.perf_counter()))
            committed: list[float] = []

            async def mark(committed: list[float] = committed) -> None:
                committed.append(time.time())

            async with UnitOfWork(factory) as uow:
                uow.after_commit(mark)  # first hook: runs right after COMMIT, before the enqueue
                row, _ = await ledger.submit(uow, principal, submission)
            marks.append((str(row.id), committed[0], time.time()))
        await self._wait_done(tenant, n, timeout=60)
        async with self.state.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT id, result, started_at FROM tasks WHERE tenant_id = :t"),
                    {"t": tenant},
                )
            ).all()
        by_id = {str(r.id): r for r in rows}
        result = Latency([], {k: [] for k in ("enqueue", "pickup", "claim")})
        for task_id, committed_at, enqueued_at in marks:
            row = by_id[task_id]
            started = float(row.result["started"])
            claimed = _epoch(row.started_at)
            result.samples_ms.append((started - committed_at) * 1000)
            result.parts_ms["enqueue"].append((enqueued_at - committed_at) * 1000)
            result.parts_ms["pickup"].append((claimed - enqueued_at) * 1000)
            result.parts_ms["claim"].append((started - claimed) * 1000)
        return result


# --- RQ ------------------------------------------------------------------------------


class RqHarness:
    """RQ on a dedicated Redis DB of the same server; `rq worker` processes."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from redis import Redis

        self.args = args
        self.workdir = workdir
        self.url = _redis_db(args.redis_url, args.rq_db)
        self.redis = Redis.from_url(self.url)

    def __enter__(self) -> RqHarness:
        if self.redis.dbsize():
            raise RuntimeError(
                f"Redis DB {self.args.rq_db} is not empty; pick a free one with --rq-db"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        keys = list(self.redis.scan_iter(match="rq:*", count=1000))
        for start in range(0, len(keys), 500):
            self.redis.delete(*keys[start : start + 500])
        self.redis.close()

    def _worker(self, queue: str, *, burst: bool, log: Path) -> subprocess.Popen[bytes]:
        argv = [str(VENV_BIN / "rq"), "worker", "--url", self.url, "--path", str(ROOT)]
        argv += ["--logging_level", "WARNING", *(["--burst"] if burst else []), queue]
        with log.open("ab") as out:
            return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=out)

    def throughput(self, n: int, seconds: float, run: int) -> Throughput:
        from rq import Queue
        from rq.job import Job, JobStatus

        from bench.rq_jobs import io_job

        queue = Queue(f"bench-io-{run}", connection=self.redis)
        first = time.time()
        ids = [queue.enqueue(io_job, seconds, result_ttl=3600, job_timeout=60).id for _ in range(n)]
        submitted = time.time()
        log = self.workdir / "rq-worker.log"
        worker = self._worker(queue.name, burst=True, log=log)
        try:
            worker.wait(timeout=120 + n * (seconds + 1))
        except subprocess.TimeoutExpired:
            _stop(worker)
            raise
        jobs = [j for j in Job.fetch_many(ids, connection=self.redis) if j is not None]
        done = [j for j in jobs if j.get_status() == JobStatus.FINISHED and j.ended_at]
        if not done:
            raise RuntimeError("no RQ job finished:\n" + _tail(log))
        last = max(_epoch(j.ended_at) for j in done if j.ended_at)
        start = min(_epoch(j.started_at) for j in done if j.started_at)
        return Throughput(
            n, last - first, submitted - first, not_ok=n - len(done), first_start=start - first
        )

    def latency(self, n: int, gap: float, run: int) -> Latency:
        from rq import Queue, Worker
        from rq.job import Job, JobStatus

        from bench.rq_jobs import io_job

        queue = Queue(f"bench-latency-{run}", connection=self.redis)
        log = self.workdir / "rq-latency-worker.log"
        worker = self._worker(queue.name, burst=False, log=log)
        try:
            deadline = time.monotonic() + 60
            while Worker.count(connection=self.redis, queue=queue) < 1:
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("rq worker did not start:\n" + _tail(log))
                time.sleep(0.05)
            time.sleep(0.5)  # let it reach its blocking dequeue
            marks: list[tuple[str, float]] = []
            begin = time.perf_counter()
            for i in range(n):
                time.sleep(max(0.0, begin + i * gap - time.perf_counter()))
                submitted = time.time()
                marks.append((queue.enqueue(io_job, 0.0, result_ttl=3600).id, submitted))
            deadline = time.monotonic() + 60 + n
            while True:
                jobs = Job.fetch_many([m[0] for m in marks], connection=self.redis)
                statuses = [j.get_status(refresh=False) if j else None for j in jobs]
                if all(s in (JobStatus.FINISHED, JobStatus.FAILED) for s in statuses):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("RQ latency jobs did not finish:\n" + _tail(log))
                time.sleep(0.05)
        finally:
            _stop(worker)
        result = Latency([], {"dequeue+fork": []})
        for job, (_, submitted) in zip(jobs, marks, strict=True):
            if job is None or job.get_status(refresh=False) != JobStatus.FINISHED:
                continue
            started = float(job.return_value())
            result.samples_ms.append((started - submitted) * 1000)
        return result


# --- the run -----------------------------------------------------------------------------


def _fmt_s(value: float) -> str:
    return f"{value:.2f} s" if value < 100 else f"{value:.1f} s"


def _spread(values: list[float], unit: str = "s") -> str:
    if len(values) < 2:
        return ""
    return f" (runs: {', '.join(f'{v:.2f}' for v in values)} {unit})"


async def _engine_phase(
    args: argparse.Namespace, workdir: Path
) -> tuple[list[Throughput], list[Latency], float | None]:
    runs: list[Throughput] = []
    lats: list[Latency] = []
    async with EngineHarness(args, workdir) as engine:
        # Warm-up (not measured): opens the pools' connections in both processes.
        await engine.throughput(50, 0.0, "bench-warmup")
        for i in range(args.repeat):
            runs.append(await engine.throughput(args.tasks, args.seconds, f"bench-tp-{i}"))
            print(f"  engine run {i + 1}: {runs[-1].wall:.2f} s", flush=True)
        for i in range(args.repeat):
            lat = await engine.latency(args.latency_tasks, args.latency_gap, f"bench-lat-{i}")
            lats.append(lat)
            print(f"  engine latency {i + 1}: p50 {lats[-1].p50:.2f} ms", flush=True)
        await asyncio.sleep(0.5)
    return runs, lats, engine.peak_rss_mib


def _uvloop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _versions(args: argparse.Namespace) -> tuple[str, str]:
    import asyncpg
    from redis.asyncio import Redis

    redis = Redis.from_url(args.redis_url)
    try:
        info = await redis.info("server")
    finally:
        await redis.aclose()
    admin = await asyncpg.connect(args.postgres_url)
    try:
        pg = await admin.fetchval("SHOW server_version")
    finally:
        await admin.close()
    return str(info.get("redis_version")), str(pg)


def run(args: argparse.Namespace, command: str) -> Report:
    redis_version, pg_version = asyncio.run(_versions(args))
    report = Report("queue", command, machine(redis_version, pg_version))
    load_start = _loadavg()
    with tempfile.TemporaryDirectory(prefix="aobench-") as tmp:
        workdir = Path(tmp)
        print(f"queue: engine, {args.tasks} x {args.seconds} s, {args.repeat} runs", flush=True)
        # The submitting process stands in for an API instance, which uvicorn runs on uvloop.
        with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
            engine_runs, engine_lats, rss = runner.run(_engine_phase(args, workdir))
        rq_runs: list[Throughput] = []
        rq_lats: list[Latency] = []
        if not args.skip_rq:
            with RqHarness(args, workdir) as rq:
                for i in range(args.repeat):
                    rq_lats.append(rq.latency(args.latency_tasks, args.latency_gap, i))
                    print(f"  rq latency {i + 1}: p50 {rq_lats[-1].p50:.2f} ms", flush=True)
                for i in range(args.rq_repeat):
                    expect = args.rq_tasks * (args.seconds + 0.02)
                    print(f"  rq run {i + 1}: {args.rq_tasks} jobs, ~{expect:.0f} s", flush=True)
                    rq_runs.append(rq.throughput(args.rq_tasks, args.seconds, i))
                    print(f"  rq run {i + 1}: {rq_runs[-1].wall:.1f} s", flush=True)
    report.machine["load average (1/5/15 min) at start / end"] = f"{load_start} / {_loadavg()}"
    _summarise(report, args, engine_runs, engine_lats, rss, rq_runs, rq_lats)
    return report


def _summarise(
    report: Report,
    args: argparse.Namespace,
    engine_runs: list[Throughput],
    engine_lats: list[Latency],
    rss: float | None,
    rq_runs: list[Throughput],
    rq_lats: list[Latency],
) -> None:
    n = args.tasks
    e_wall = median([r.wall for r in engine_runs])
    e_submit = median([r.submit_rate for r in engine_runs])
    e_p50 = median([lat.p50 for lat in engine_lats])
    e_p99 = median([lat.p99 for lat in engine_lats])
    failures = sum(r.not_ok for r in engine_runs)
    md = report.markdown
    md += [
        f"### {n} tasks x {args.seconds:g} s of awaited I/O, one worker process",
        "",
        "Wall time from the first submit/enqueue to the last task finished. This engine: "
        "submitted through `TaskLedger.submit` (one transaction per task, "
        f"{args.submit_concurrency} concurrent submitters on uvloop, as API requests "
        "would be), one "
        f"`agent-orchestrator worker` (MAX_CONCURRENT_TASKS={max(n, 100)}, "
        f"DB_POOL_SIZE={args.db_pool_size}); the finish time is the ledger's `finished_at`. "
        "RQ: `Queue.enqueue` one by one, then one `rq worker --burst` (fork per job, "
        "`async def` job under `asyncio.run`); the finish time is RQ's `ended_at`. Per task: "
        "wall / tasks for the engine; for RQ the pace of its one-at-a-time jobs, "
        "(last end - first start) / jobs, which the extrapolation uses together with the "
        "measured enqueue rate and worker start-up.",
        "",
    ]
    rows = [
        [
            "this engine (SAQ 0.26.4 + PostgreSQL ledger)",
            str(n),
            _fmt_s(e_wall) + _spread([r.wall for r in engine_runs]),
            f"{e_wall / n * 1000:.2f} ms",
            f"{e_submit:.0f} tasks/s (submit)",
        ]
    ]
    ratio_line = "RQ not measured in this run (--skip-rq)."
    ratio: float | None = None
    if rq_runs:
        m = rq_runs[0].tasks
        r_wall = median([r.wall for r in rq_runs])
        r_rate = median([r.submit_rate for r in rq_runs])
        per_task = median([(r.wall - r.first_start) / r.tasks for r in rq_runs])
        rows.append(
            [
                "RQ 3.0.0, measured",
                str(m),
                _fmt_s(r_wall) + _spread([r.wall for r in rq_runs]),
                f"{per_task * 1000:.1f} ms",
                f"{r_rate:.0f} jobs/s (enqueue)",
            ]
        )
        rq_1000 = median([r.extrapolate(n) for r in rq_runs])
        if m != n:
            rows.append(
                [
                    f"RQ 3.0.0, extrapolated to {n} (not measured)",
                    str(n),
                    _fmt_s(rq_1000),
                    f"{per_task * 1000:.1f} ms",
                    "",
                ]
            )
        ratio = rq_1000 / e_wall
        basis = "measured" if m == n else f"extrapolated from {m} measured jobs"
        verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
        ratio_line = (
            f"Ratio RQ wall / engine wall: **{ratio:.0f}x** (RQ {basis}; median engine wall). "
            f"Target at least {TARGET_RATIO:.0f}x: **{verdict}**."
        )
        if rq_runs[0].not_ok:
            ratio_line += f" {rq_runs[0].not_ok} RQ jobs did not finish."
    md += table(["engine", "tasks", "wall", "per task", "submit rate"], rows)
    md += ["", ratio_line]
    if failures:
        md += [f"Engine tasks not succeeded: {failures} (should be 0)."]
    worker_ms = median([r.worker_cpu / r.tasks * 1000 for r in engine_runs])
    submit_ms = median([r.submitter_cpu / r.tasks * 1000 for r in engine_runs])
    md += [
        f"Engine CPU per task (medians; steadier than wall time on a shared machine): "
        f"worker process {worker_ms:.2f} ms, submitting process {submit_ms:.2f} ms "
        "(PostgreSQL and Redis not counted). The worker is one process, so its CPU time "
        f"alone puts a floor of about {worker_ms * n / 1000:.1f} s under the {n}-task wall "
        "time, however idle the machine."
    ]
    if rss is not None:
        md += [f"Engine worker peak RSS (VmHWM) over the whole run: {rss:.0f} MiB."]
    md += [
        "",
        f"### Enqueue-to-start latency at low load ({args.latency_tasks} tasks, "
        f"{args.latency_gap * 1000:g} ms apart, {args.repeat} runs)",
        "",
        "This engine: from the submit transaction's COMMIT (the after-commit enqueue starts "
        "then) to the handler's first line. RQ: from just before `Queue.enqueue` to the job "
        "function's first line (inside the forked work horse's `asyncio.run`). Median of "
        "the per-run percentiles.",
        "",
    ]
    lat_rows = [
        [
            "this engine",
            f"{e_p50:.2f}",
            f"{e_p99:.2f}",
            ", ".join(f"{lat.p50:.2f}/{lat.p99:.2f}" for lat in engine_lats),
        ]
    ]
    if rq_lats:
        lat_rows.append(
            [
                "RQ 3.0.0",
                f"{median([lat.p50 for lat in rq_lats]):.2f}",
                f"{median([lat.p99 for lat in rq_lats]):.2f}",
                ", ".join(f"{lat.p50:.2f}/{lat.p99:.2f}" for lat in rq_lats),
            ]
        )
    md += table(["engine", "p50 ms", "p99 ms", "per run p50/p99 ms"], lat_rows)
    verdict = "met" if e_p50 <= TARGET_P50_MS else "MISSED"
    md += ["", f"Target engine p50 at most {TARGET_P50_MS:g} ms: **{verdict}** ({e_p50:.2f} ms)."]
    parts = {
        "enqueue": "COMMIT -> enqueued (event publish + SAQ enqueue, in the submitter)",
        "pickup": "enqueued -> claim started (BLMOVE wake-up, GET, SAQ ACTIVE write, session)",
        "claim": "claim started -> handler start (conditional UPDATE + commit + event)",
    }
    md += ["", "Where the engine's latency goes (medians of all samples, ms):", ""]
    part_rows = []
    for key, label in parts.items():
        values = [v for lat in engine_lats for v in lat.parts_ms.get(key, [])]
        if values:
            part_rows.append([label, f"{median(values):.2f}", f"{percentile(values, 99):.2f}"])
    md += table(["segment", "p50", "p99"], part_rows)
    md += [
        "",
        f"Prior measurements (shared/reference/queues.md, same kind of VM): RQ "
        f"{PRIOR['rq_wall']} s and {PRIOR['rq_p50']} ms p50; SAQ alone {PRIOR['saq_wall']} s "
        f"and {PRIOR['saq_p50']} ms p50.",
    ]
    summary = [f"engine wall {e_wall:.2f} s, p50 {e_p50:.2f} ms, p99 {e_p99:.2f} ms"]
    if ratio is not None:
        summary.append(f"ratio {ratio:.0f}x")
    report.console = [*md, "", "; ".join(summary)]
