"""``python -m benchmarks``: run the benchmark matrix, print a table, write JSON and the README table.

Examples::

    python -m benchmarks run --scenario linear3 --mode direct --backend postgres --lock local \\
        -n 2000 -c 32 --repeat 3 --json out.json
    python -m benchmarks run --scenario all --mode all --backend postgres,sqlite -c 32,64 --readme
    python -m benchmarks run --scenario none --reference dbos,floor -c 32,64     # references only
    python -m benchmarks readme pg.json sqlite.json                               # tables from JSON files
    python -m benchmarks dashboard -n 100000 --nodes 200                          # dashboard page times
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from . import dashboard, report
from .observers import OBSERVERS
from .runner import ALL_SCENARIOS, EXTRA_SCENARIOS, SLOW_SCENARIOS, BenchOptions, parse_list, run_benchmarks

README = Path(__file__).resolve().parent / "README.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run benchmark rows")
    scenarios = ", ".join(ALL_SCENARIOS + SLOW_SCENARIOS + EXTRA_SCENARIOS)
    named_only = ", ".join(SLOW_SCENARIOS + EXTRA_SCENARIOS)
    run.add_argument(
        "--scenario",
        default="linear3",
        help=f"{scenarios} (comma list), all or none; all leaves out {named_only} "
        "(a 2 s node; 20 child workflows per run: name them)",
    )
    run.add_argument("--mode", default="direct", help="direct, driver or all")
    run.add_argument("--backend", default="postgres", help="postgres, sqlite, memory (comma list) or all")
    run.add_argument("--lock", default="local", help="local, redis, database or all")
    run.add_argument("-n", type=int, default=2000, help="workflows per run (default 2000)")
    run.add_argument("-c", "--concurrency", default="32", help="in-flight workflows, e.g. 32 or 32,64")
    run.add_argument("--repeat", type=int, default=3, help="runs per row; the median is reported (>= 3)")
    run.add_argument("--reference", default="dbos,floor", help="dbos,floor (default), dbos, floor or none")
    run.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    run.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    run.add_argument("--poll-interval", type=float, default=0.05, help="driver poll interval, seconds")
    run.add_argument("--create", choices=("service", "bulk"), default="service",
                     help="driver mode: create_workflow or the repo's bulk insert")  # fmt: skip
    run.add_argument("--pool-size", type=int, default=None,
                     help="PostgreSQL pool of asyncflow (default: the concurrency)")  # fmt: skip
    run.add_argument("--backlog", default="0", metavar="N",
                     help="pre-load N due instances of the scenario's type before the timed part, e.g. "
                     "100000 or 10000,100000 (a row each); driver mode then times -n completions out of "
                     "that queue")  # fmt: skip
    run.add_argument("--backlog-create", choices=("bulk", "service"), default="bulk",
                     help="how the backlog is made: the repo's bulk insert or create_workflow")  # fmt: skip
    run.add_argument("--dbos-launch", choices=("bounded", "queue"), default="bounded")
    run.add_argument("--observer", default="none",
                     help="asyncflow rows with these service observers: none, noop, prometheus, otel "
                     "(comma list) or all; each is a row of its own")  # fmt: skip
    run.add_argument("--visible-after", default="none",
                     help="asyncflow rows with these WorkflowService(visible_after=): none or seconds "
                     "(comma list, e.g. none,1); each is a row of its own")  # fmt: skip
    run.add_argument("--gc-freeze", action="store_true",
                     help="asyncflow rows: tune the collector in the run's process once it is set up, as "
                     "asyncflow worker does (gc.freeze() and a first threshold of 10,000)")  # fmt: skip
    run.add_argument("--json", metavar="FILE", help="write the results as JSON")
    run.add_argument("--readme", nargs="?", const=str(README), metavar="PATH",
                     help="rewrite the results table of benchmarks/README.md (or PATH)")  # fmt: skip
    dashboard.add_parser(sub)
    readme = sub.add_parser("readme", help="rewrite the README results from JSON files (a section each)")
    readme.add_argument("json_files", nargs="+", metavar="json_file")
    readme.add_argument("--path", default=str(README))
    return parser


def _options(args: argparse.Namespace) -> BenchOptions:
    concurrencies = tuple(int(c) for c in str(args.concurrency).split(",") if c.strip())
    if not concurrencies or min(concurrencies) < 1:
        raise ValueError("--concurrency needs positive integers")
    if args.n < 1:
        raise ValueError("-n must be at least 1")
    if args.repeat < 1:
        raise ValueError("--repeat must be at least 1")
    backlogs = tuple(int(b) for b in str(args.backlog).split(",") if b.strip()) or (0,)
    if min(backlogs) < 0:
        raise ValueError("--backlog needs integers >= 0")
    if any(0 < b < args.n for b in backlogs) and args.mode in ("driver", "all"):
        raise ValueError("--backlog must be at least -n in driver mode (the timed part drains -n of it)")
    return BenchOptions(
        scenarios=(
            ALL_SCENARIOS
            if args.scenario == "all"
            else parse_list(args.scenario, ALL_SCENARIOS + SLOW_SCENARIOS + EXTRA_SCENARIOS, "scenario")
        ),
        modes=parse_list(args.mode, ("direct", "driver"), "mode"),
        backends=parse_list(args.backend, ("postgres", "sqlite", "memory"), "backend"),
        locks=parse_list(args.lock, ("local", "redis", "database"), "lock"),
        n=args.n,
        concurrencies=concurrencies,
        repeat=args.repeat,
        references=parse_list(args.reference, ("dbos", "floor"), "reference"),
        pg_url=args.pg_url,
        redis_url=args.redis_url,
        poll_interval=args.poll_interval,
        create=args.create,
        dbos_launch=args.dbos_launch,
        pool_size=args.pool_size,
        observers=parse_list(args.observer, OBSERVERS, "observer") or ("none",),
        visible_after=_visible_after(args.visible_after),
        backlogs=backlogs,
        backlog_create=args.backlog_create,
        gc_freeze=args.gc_freeze,
    )


def _visible_after(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in str(text).split(",") if v.strip()) or ("none",)
    for value in values:
        if value != "none":
            try:
                if float(value) < 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"--visible-after needs none or seconds >= 0, got {value!r}") from None
    return values


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "dashboard":
        return dashboard.main(args)
    if args.command == "readme":
        payloads = [json.loads(Path(name).read_text(encoding="utf-8")) for name in args.json_files]
        report.update_readme(args.path, payloads)
        print(f"updated {args.path}")
        return 0
    try:
        options = _options(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if options.repeat < 3:
        print(
            f"note: --repeat {options.repeat}: the issue asks for medians of at least 3 runs", file=sys.stderr
        )
    payload = asyncio.run(run_benchmarks(options, progress=lambda line: print(line, file=sys.stderr)))
    print(report.format_table(payload["results"]) if payload["results"] else "no rows ran")
    for item in payload["skipped"]:
        print(f"skipped {item['row']}: {item['reason']}")
    if args.json:
        report.write_json(args.json, payload)
        print(f"wrote {args.json}")
    if args.readme:
        report.update_readme(args.readme, payload)
        print(f"updated {args.readme}")
    return 0 if payload["results"] or not payload["skipped"] else 1


if __name__ == "__main__":
    sys.exit(main())
