"""WebSocket gateway benchmark: memory per open authenticated idle connection, and event
fan-out latency (publish -> receive at the client) with 1,000 subscribers.

    .venv/bin/python -m bench.run websocket                 # 1k, 5k, 10k connections (~2 min)
    .venv/bin/python -m bench.run websocket --connections 1000,5000 --fanout-seconds 10

One `agent-orchestrator serve --no-worker` (Redis event bus, SQLite) is measured; the
clients are `bench/ws_client.py` processes (each holding a share of the sockets);
events are published through the Redis event bus by this process, a third one, with the
send time in their data, and latency is measured at the clients. Same-run baselines: the
server's RSS with no connection, and plain Redis PUBLISH -> SUBSCRIBE latency between two
processes. Targets (issue 5): 10,000 connections within 500 MB of server RSS, and with
1,000 subscribers each receiving one event per second, p99 at most 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from tests.processes import UNREACHED_RATE_LIMITS

from bench.common import DEFAULT_REDIS, ROOT, VENV_BIN, Report, machine, percentile, table
from bench.ws_harness import Client, cpu_seconds, free_port, raise_nofile, rss_mib, split, wait_ok

NAME = "websocket"
SECRET = "bench-ws-secret-key-0123456789abcdef0123456789abcdef"
TARGET_RSS_MIB = 500.0
TARGET_CONNECTIONS = 10_000
TARGET_P99_MS = 50.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connections", default="1000,5000,10000", help="open-connection steps (comma-separated)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="client processes (default 1: on 2 cores, the server and one client process each "
        "get a core; more client processes compete with the server for CPU during a burst)",
    )
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument(
        "--fanout-seconds", type=int, default=30, help="events per subscriber (one per second)"
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS))


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.namespace = f"aobench-ws-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"ws://127.0.0.1:{self.port}/ws/v1"
        self.log = workdir / "serve.log"
        self.server: subprocess.Popen[bytes] | None = None
        self.clients: list[Client] = []
        self.token = ""
        self.results: dict[str, Any] = {"memory": [], "latency": []}

    def env(self) -> dict[str, str]:
        cap = str(max(self._steps()[-1] * 2, 20_000))
        return {
            **os.environ,
            **UNREACHED_RATE_LIMITS,  # it creates a session per connection over HTTP
            "DATA_DIR": str(self.workdir / "data"),
            "SECRET_KEY": SECRET,
            "REDIS_URI": self.args.redis_url,
            "REDIS_NAMESPACE": self.namespace,
            "LOG_LEVEL": "WARNING",
            "WEBSOCKET_MAX_CONNECTIONS": cap,
            "WS_MAX_CONNECTIONS_PER_IP": cap,
            "WS_MAX_CONNECTIONS_PER_TENANT": cap,
            "WS_AUTH_TIMEOUT": "60",
            "WS_IDLE_TIMEOUT": "3600",
        }

    def _steps(self) -> list[int]:
        return sorted(int(step) for step in self.args.connections.split(","))

    async def __aenter__(self) -> Bench:
        cli = str(VENV_BIN / "agent-orchestrator")
        with self.log.open("wb") as log:
            self.server = subprocess.Popen(
                [cli, "serve", "--no-worker", "--port", str(self.port)],
                env=self.env(), cwd=ROOT, stdout=log, stderr=log, preexec_fn=raise_nofile,
            )  # fmt: skip
        await wait_ok(f"{self.base}/health", self.server)
        from agent_orchestrator.middleware.auth import TokenVerifier
        from agent_orchestrator.models.principal import USER_SCOPES

        self.token = TokenVerifier(SECRET).issue(
            tenant_id="bench", user_id="bench", scopes=list(USER_SCOPES), ttl_seconds=86_400,
            now=time.time(),
        )  # fmt: skip
        self.clients = [await Client.start(self.url, self.token) for _ in range(self.args.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            try:
                await client.stop()
            except Exception:
                client.proc.kill()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(30)
        from redis.asyncio import Redis

        redis = Redis.from_url(self.args.redis_url)
        keys = [k async for k in redis.scan_iter(match=f"{self.namespace}*", count=1000)]
        for start in range(0, len(keys), 500):
            await redis.delete(*keys[start : start + 500])
        await redis.aclose()

    # --- phases ---------------------------------------------------------------------------
    async def sessions(self, count: int) -> list[str]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with httpx.AsyncClient(base_url=self.base, headers=headers, timeout=30) as http:
            made = []
            for start in range(0, count, 50):
                batch = [
                    http.post("/api/v1/sessions", json={}) for _ in range(min(50, count - start))
                ]
                made += [r.json()["id"] for r in await asyncio.gather(*batch)]
        return made

    async def open_to(self, total: int) -> float:
        """Open sockets until `total` are open, spread over the clients; seconds taken."""
        started = time.monotonic()
        opened = sum(self.opened)
        share = [(total - opened) // len(self.clients)] * len(self.clients)
        share[0] += total - opened - sum(share)
        answers = await asyncio.gather(
            *(c.ask(cmd="open", count=n) for c, n in zip(self.clients, share, strict=True))
        )
        self.opened = [a["open"] for a in answers]
        return time.monotonic() - started

    opened: list[int] = []

    def rss(self) -> float:
        assert self.server is not None
        return rss_mib(self.server.pid)

    async def memory_step(self, total: int, idle_rss: float) -> None:
        seconds = await self.open_to(total)
        await asyncio.sleep(3)  # let the server settle (sweeper, allocator)
        rss = self.rss()
        per_kib = (rss - idle_rss) * 1024 / total
        self.results["memory"].append((total, rss, rss - idle_rss, per_kib, seconds))
        print(f"  {total} connections: RSS {rss:.1f} MiB, {per_kib:.1f} KiB each", flush=True)

    async def raw_redis_latency(self, count: int = 200) -> list[float]:
        from redis.asyncio import Redis

        channel = f"{self.namespace}:raw"
        client = self.clients[-1]
        await client.send(cmd="rawsub", redis=self.args.redis_url, channel=channel, count=count)
        assert (await client.read())["ready"]
        redis = Redis.from_url(self.args.redis_url)
        for _ in range(count):
            await redis.publish(channel, repr(time.time()))
            await asyncio.sleep(0.01)
        await redis.aclose()
        samples: list[float] = (await client.read())["latencies_ms"]
        return samples

    async def fanout(self, label: str, sessions: list[str], subscribers: int, seconds: int) -> None:
        """`subscribers` sockets each follow a session (round robin over `sessions`); every
        session gets one event per second, spread evenly over the second."""
        from redis.asyncio import Redis

        from agent_orchestrator.events.models import Event
        from agent_orchestrator.events.redis import RedisEventBus

        counts = split(subscribers, self.opened)
        offsets = [sum(counts[:index]) for index in range(len(counts))]
        shares = [(c, n) for c, n in zip(self.clients, counts, strict=True) if n]
        await asyncio.gather(
            *(
                c.ask(cmd="subscribe", sessions=sessions, count=n, offset=o)
                for c, n, o in zip(self.clients, counts, offsets, strict=True)
                if n
            )
        )
        redis = Redis.from_url(self.args.redis_url)
        bus = RedisEventBus(redis, namespace=self.namespace, stream_cap=1000, ttl_seconds=600)
        cpu_before = cpu_seconds(self.server.pid) if self.server else 0.0
        started = time.monotonic()
        gap = 1.0 / len(sessions)
        for tick in range(seconds * len(sessions)):
            delay = started + tick * gap - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            session = sessions[tick % len(sessions)]
            event = Event(type="bench.tick", tenant_id="bench", session_id=session,
                          data={"sent": time.time(), "tick": tick})  # fmt: skip
            await bus.publish(event)
        await asyncio.sleep(2)  # the last events arrive
        cpu = (cpu_seconds(self.server.pid) if self.server else 0.0) - cpu_before
        await redis.aclose()
        answers = await asyncio.gather(*(c.ask(cmd="collect") for c in self.clients))
        samples = [s for a in answers for s in a["latencies_ms"]]
        errors = sum(a["errors"] for a in answers)
        expected = seconds * subscribers
        await asyncio.gather(*(c.ask(cmd="unsubscribe") for c, _n in shares))
        self.results["latency"].append((label, samples, expected, errors, cpu / seconds))
        print(
            f"  {label}: {len(samples)}/{expected} events, p50 {percentile(samples, 50):.1f} ms,"
            f" p99 {percentile(samples, 99):.1f} ms",
            flush=True,
        )


async def _measure(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    from redis.asyncio import Redis

    redis = Redis.from_url(args.redis_url)
    redis_version = str((await redis.info("server"))["redis_version"])
    await redis.aclose()
    steps = sorted(int(step) for step in args.connections.split(","))
    async with Bench(args, workdir) as bench:
        bench.opened = [0] * len(bench.clients)
        sessions = await bench.sessions(args.subscribers)  # also warms the server up
        await asyncio.sleep(2)
        idle = bench.rss()
        bench.results["idle_rss"] = idle
        print(f"websocket: idle server RSS {idle:.1f} MiB", flush=True)
        raw = await bench.raw_redis_latency()
        bench.results["latency"].append(
            ("raw Redis PUBLISH -> SUBSCRIBE (baseline)", raw, len(raw), 0, None)
        )
        first = min(max(args.subscribers, steps[0]), steps[-1])
        await bench.memory_step(first, idle)
        seconds = args.fanout_seconds
        await bench.fanout("gateway, 1 subscriber, 1 event/s", sessions[:1], 1, min(seconds, 10))
        await bench.fanout(
            f"gateway, {args.subscribers} subscribers of one session, 1 event/s",
            sessions[:1], args.subscribers, seconds,
        )  # fmt: skip
        await bench.fanout(
            f"gateway, {args.subscribers} subscribers of as many sessions, 1 event/s each",
            sessions, args.subscribers, seconds,
        )  # fmt: skip
        for total in steps:
            if total > first:
                await bench.memory_step(total, idle)
        return bench.results, redis_version


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(args: argparse.Namespace, command: str) -> Report:
    load_start = _loadavg()
    with tempfile.TemporaryDirectory(prefix="aobench-ws-") as tmp:
        results, redis_version = asyncio.run(_measure(args, Path(tmp)))
    report = Report("websocket", command, machine(redis_version, "not used (SQLite)"))
    report.machine["load average (1/5/15 min) at start / end"] = f"{load_start} / {_loadavg()}"
    report.machine["layout"] = (
        f"1 server process (serve --no-worker, uvloop), {args.clients} client processes,"
        " publisher = the bench process, Redis on the same machine"
    )
    _summarise(report, results)
    return report


def _summarise(report: Report, results: dict[str, Any]) -> None:
    idle = results["idle_rss"]
    rows = [["0 (idle server, baseline)", f"{idle:.1f}", "-", "-", "-"]]
    for total, rss, delta, per_kib, seconds in results["memory"]:
        rows.append(
            [f"{total:,}", f"{rss:.1f}", f"{delta:.1f}", f"{per_kib:.1f}", f"{seconds:.1f}"]
        )
    total, rss, _delta, per_kib, _seconds = results["memory"][-1]
    if total >= TARGET_CONNECTIONS:
        at_target = idle + (rss - idle) * TARGET_CONNECTIONS / total
        how = f"measured at {total:,}"
    else:
        at_target = idle + per_kib * TARGET_CONNECTIONS / 1024
        how = f"extrapolated from {total:,} (not measured)"
    verdict = "meets" if at_target <= TARGET_RSS_MIB else "MISSES"
    memory = [
        "### Memory per open authenticated idle connection (server RSS)",
        "",
        *table(["connections", "RSS MiB", "over idle MiB", "KiB per connection", "open s"], rows),
        "",
        f"RSS at {TARGET_CONNECTIONS:,} connections: {at_target:.0f} MiB ({how}); target "
        f"<= {TARGET_RSS_MIB:.0f} MB: {verdict}.",
    ]
    lat_rows = []
    for label, samples, expected, errors, cpu in results["latency"]:
        lat_rows.append([
            label, f"{len(samples):,}/{expected:,}", f"{percentile(samples, 50):.2f}",
            f"{percentile(samples, 99):.2f}", f"{max(samples):.2f}" if samples else "-",
            str(errors), f"{cpu:.2f}" if cpu is not None else "-",
        ])  # fmt: skip
    worst = max(
        percentile(s, 99) for label, s, *_ in results["latency"] if label.startswith("gateway")
    )
    latency = [
        "### Event fan-out latency, publish (bench process) -> receive (client processes)",
        "",
        *table(
            [
                "scenario",
                "events received",
                "p50 ms",
                "p99 ms",
                "max ms",
                "errors",
                "server CPU s/s",
            ],
            lat_rows,
        ),
        "",
        f"Worst gateway p99: {worst:.1f} ms; target <= {TARGET_P99_MS:.0f} ms: "
        f"{'meets' if worst <= TARGET_P99_MS else 'MISSES'}.",
    ]
    notes = [
        "Memory: the server's VmRSS with the sockets open, authenticated and idle (after 3 s),"
        " minus its VmRSS before any socket, measured in the same run. Latency: `sent` is"
        " stamped by the publisher just before `EventBus.publish` (Redis: XADD + PUBLISH in"
        " one script) and compared with the arrival time at the client process. One session"
        " with N followers is a burst of N socket writes each second; N sessions get N events"
        " per second spread evenly. Server CPU is seconds of CPU per second of publishing.",
    ]
    latency += ["", *notes]
    report.markdown += [*memory, "", *latency]
    report.console += [*memory, "", *latency]


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.websocket", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--no-append", action="store_true")
    add_arguments(parser)
    args = parser.parse_args()
    report = run(args, "python -m bench.websocket " + " ".join(sys.argv[1:]))
    print("\n".join(report.console), flush=True)
    if not args.no_append:
        from bench.common import append_results

        append_results(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
