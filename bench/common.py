"""Shared pieces of the benchmarks: the machine description, statistics, the results file."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
VENV_BIN = Path(sys.executable).parent

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def _command(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"
    return (done.stdout or done.stderr).strip()


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def machine(redis_version: str, postgres_version: str) -> dict[str, str]:
    """What the numbers were measured on (DESIGN section 15: machine and date)."""
    from importlib.metadata import version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except Exception:
            return "not installed"

    commit = _command("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = _command("git", "-C", str(ROOT), "status", "--porcelain", "--", "src")
    return {
        "date": _command("date", "-u"),
        "machine": _command("uname", "-a"),
        "cpus": f"{os.cpu_count()} (nproc {_command('nproc')})",
        "memory": _memory(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis": redis_version,
        "postgresql": postgres_version,
        "packages": f"saq {pkg('saq')}, rq {pkg('rq')}, redis-py {pkg('redis')}, "
        f"asyncpg {pkg('asyncpg')}, SQLAlchemy {pkg('sqlalchemy')}",
        "commit": commit + (" (src has uncommitted changes)" if dirty else ""),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the 198th smallest)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass
class Report:
    """One benchmark's outcome: a console table and a Markdown section for RESULTS.md."""

    name: str
    command: str
    machine: dict[str, str]
    markdown: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"## {self.name} — {self.machine['date']}", "", f"Command: `{self.command}`", ""]
        lines += [f"- {key}: {value}" for key, value in self.machine.items() if key != "date"]
        lines += ["", *self.markdown, ""]
        return "\n".join(lines)


def append_results(report: Report, path: Path = RESULTS) -> None:
    header = (
        "# Benchmark results\n\n"
        "Appended by `python -m bench.run`; newest last. Every comparison is measured in the\n"
        "same run on the same machine, so read the ratios first: the absolute figures move\n"
        "with the load of the (shared) machine.\n"
    )
    existing = path.read_text() if path.exists() else header
    path.write_text(existing.rstrip("\n") + "\n\n" + report.render())


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table (also readable on a console)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        padded = (str(c).ljust(w) for c, w in zip(cells, widths, strict=False))
        return "| " + " | ".join(padded) + " |"

    return [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


async def create_run_database(postgres_url: str, database: str) -> None:
    """Create a benchmark run's (empty) PostgreSQL database; `drop_run_resources` drops it."""
    import asyncpg

    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()


async def drop_run_resources(
    redis_url: str, namespace: str, postgres_url: str, database: str
) -> None:
    """Delete a benchmark run's Redis keys (every key holding its namespace) and drop its
    PostgreSQL database."""
    import asyncpg
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=f"*{namespace}*", count=1000)]
        for start in range(0, len(keys), 500):
            await redis.delete(*keys[start : start + 500])
    finally:
        await redis.aclose()
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()
