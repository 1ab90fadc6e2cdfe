"""Batch benchmark: N chat messages as one batch against the same N sent by a client as
`mode=wait` chats with `--parallel` in flight, the way one would without the batch API;
same server, same run.

    .venv/bin/python -m bench.run batch               # 1,000 items, parallel 8, 3 runs (~1 min)
    .venv/bin/python -m bench.run batch --items 200   # quicker

The server is `agent-orchestrator serve` in its embedded default (SQLite, in-process
queue, echo model) in a temporary directory, with BULK_CONCURRENCY equal to the
parallelism, so that both ways run at most `--parallel` turns at once. A batch run is
from the POST until its final `batch.progress` event (followed over SSE from the POST's
answer); a client run is from its first request until its last answer. The two
alternate within each run; figures are medians over the runs, with the server's CPU per
item read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench.chat import _clean_env, _cli, _free_port, _spawn, _token
from bench.common import Report, machine, median, table
from bench.queue_bench import _cpu_seconds, _stop
from bench.ws_harness import wait_ok

NAME = "batch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=1000, help="items per run (default 1000)")
    parser.add_argument("--parallel", type=int, default=8, help="turns at once (default 8)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each way (default 3)")


def run(args: argparse.Namespace, command: str) -> Report:
    figures = asyncio.run(_measure(args))
    return _report(args, command, figures)


async def _measure(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """Per way: (seconds, server CPU seconds) of each run."""
    figures: dict[str, list[tuple[float, float]]] = {"batch": [], "client": []}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        home = Path(tmp)
        env = _clean_env()
        env.update(
            DATA_DIR=str(home / "data"),
            LOG_LEVEL="WARNING",
            BULK_CONCURRENCY=str(args.parallel),
            BATCH_MAX_ITEMS=str(max(args.items, 1)),
            BATCH_MAX_PARALLEL=str(max(args.parallel, 1)),
            MAX_REQUEST_BYTES=str(64 * 1024 * 1024),
        )
        token = _token(env, home)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        log = home / "serve.log"
        serve = _spawn(_cli("serve", "--port", str(port)), env, home, log)
        headers = {"Authorization": f"Bearer {token}"}
        try:
            await wait_ok(f"{base}/health", serve, log=log)
            limits = httpx.Limits(max_connections=args.parallel + 2)
            async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits) as http:
                await _client_run(http, 50, args.parallel)  # warm-up
                for number in range(args.runs):
                    for way in ("batch", "client") if number % 2 == 0 else ("client", "batch"):
                        cpu = _cpu_seconds(serve.pid)
                        started = time.perf_counter()
                        if way == "batch":
                            await _batch_run(http, args.items, args.parallel)
                        else:
                            await _client_run(http, args.items, args.parallel)
                        seconds = time.perf_counter() - started
                        figures[way].append((seconds, _cpu_seconds(serve.pid) - cpu))
                        print(f"batch bench: run {number + 1} {way}: {seconds:.2f} s", flush=True)
        finally:
            _stop(serve)
    return figures


def _messages(count: int) -> list[str]:
    return [f"item {i}: summarise this ticket in one line" for i in range(count)]


async def _batch_run(http: httpx.AsyncClient, items: int, parallel: int) -> None:
    body = {"items": [{"message": m} for m in _messages(items)], "max_parallel": parallel}
    answer = await http.post("/api/v1/batch", json=body, timeout=120)
    answer.raise_for_status()
    final = None
    events_url = answer.json()["events_url"]
    async with http.stream("GET", events_url, timeout=600) as stream:
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                final = json.loads(line[5:])["data"]
    if final is None or final["counts"]["succeeded"] != items:
        raise RuntimeError(f"the batch did not end with every item succeeded: {final}")


async def _client_run(http: httpx.AsyncClient, items: int, parallel: int) -> None:
    pending = iter(_messages(items))

    async def sender() -> None:
        for message in pending:
            body = {"message": message, "mode": "wait"}
            answer = await http.post("/api/v1/chat", json=body, timeout=120)
            answer.raise_for_status()
            if answer.json()["task"]["status"] != "succeeded":
                raise RuntimeError(f"a turn did not succeed: {answer.text[:300]}")

    await asyncio.gather(*(sender() for _ in range(parallel)))


def _report(
    args: argparse.Namespace, command: str, figures: dict[str, list[tuple[float, float]]]
) -> Report:
    report = Report(NAME, command, machine("not used", "not used (SQLite)"))
    rows = []
    rate: dict[str, float] = {}
    for way, label in (("batch", "one batch"), ("client", f"{args.parallel} clients' wait chats")):
        seconds = median([s for s, _ in figures[way]])
        cpu = median([c for _, c in figures[way]])
        rate[way] = args.items / seconds
        runs = ", ".join(f"{s:.2f}" for s, _ in figures[way])
        rows.append(
            [
                label,
                str(args.items),
                f"{seconds:.2f} s ({runs})",
                f"{rate[way]:.1f}",
                f"{cpu / args.items * 1000:.2f} ms",
            ]
        )
    lines = table(["way", "items", "wall (runs)", "items/s", "server CPU per item"], rows)
    ratio = rate["batch"] / rate["client"]
    report.markdown = [
        f"### {args.items} chat messages, at most {args.parallel} at once, embedded, echo model",
        "",
        (__doc__ or "").split("\n\n", 2)[2].replace("\n", " ").strip(),
        "",
        *lines,
        "",
        f"Batch items/s against the client's: **{ratio:.2f}x** (medians of {args.runs} runs).",
    ]
    report.console = [*lines, f"batch / client items per second: {ratio:.2f}x"]
    return report
