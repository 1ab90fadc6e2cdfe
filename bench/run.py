"""One-command benchmark runner.

    .venv/bin/python -m bench.run queue            # this engine vs RQ (about 5 minutes)
    .venv/bin/python -m bench.run queue --rq-tasks 100   # quick: RQ extrapolated per task
    .venv/bin/python -m bench.run chat             # chat turns and overhead (about 4 minutes)
    .venv/bin/python -m bench.run chat --quick     # the same, shorter phases
    .venv/bin/python -m bench.run websocket        # memory per connection, fan-out latency (~2 min)
    .venv/bin/python -m bench.run instructions --baseline REF   # callgrind count per turn (~2 min)
    .venv/bin/python -m bench.run batch            # a batch against client-sent chats (~1 min)
    .venv/bin/python -m bench.run all              # every benchmark with its defaults

Each benchmark is a module with `NAME`, `add_arguments(parser)` and
`run(args, command) -> Report`; add it to BENCHMARKS to get a subcommand (and a place in
`all`). Results are printed and appended to bench/RESULTS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from types import ModuleType

from bench import batch, chat, instructions, queue_bench, websocket
from bench.common import RESULTS, append_results

BENCHMARKS: dict[str, ModuleType] = {
    queue_bench.NAME: queue_bench,
    chat.NAME: chat,
    websocket.NAME: websocket,
    instructions.NAME: instructions,
    batch.NAME: batch,
}


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    top = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    top.add_argument("--no-append", action="store_true", help="do not write bench/RESULTS.md")
    top.add_argument("--results", type=Path, default=RESULTS, help="results file to append to")
    subs = top.add_subparsers(dest="benchmark", required=True)
    children = {}
    for name, module in BENCHMARKS.items():
        child = subs.add_parser(name, help=(module.__doc__ or "").split("\n")[0])
        module.add_arguments(child)
        children[name] = child
    subs.add_parser("all", help="run every benchmark with its defaults")
    return top, children


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top, children = parser()
    args = top.parse_args(argv)
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    for name in names:
        own = args if args.benchmark == name else children[name].parse_args([])
        command = "python -m bench.run " + shlex.join(argv)
        report = BENCHMARKS[name].run(own, command)
        print("\n".join(report.console), flush=True)
        if not args.no_append:
            append_results(report, args.results)
            print(f"appended to {args.results}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
