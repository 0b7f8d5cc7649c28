"""How long building (and validating) a workflow definition takes, at 1k, 10k and 100k nodes.

Run: ``python benchmarks/bench_definition.py`` (options: ``--sizes 1000,10000 --repeat 3``).

Three shapes, each built with :func:`asyncflow.definition.build_definition` (validation included) and
checked alone with :func:`asyncflow.definition.validate_config`:

* ``chain``: N nodes in a line (the deepest graph: N levels).
* ``fan-out``: one head feeding N-2 parallel nodes that all feed one tail (root has one child, the head;
  the tail has N-2 parents).
* ``ladder``: N/2 rungs of two nodes; each node feeds both nodes of the next rung, so there are
  2**(N/2) root-to-end paths (Go's path-marking DFS is exponential on it; a linear build is not).

Each figure is the median of ``--repeat`` runs with the [min-max] spread, in milliseconds, plus
microseconds per node and the growth factor against the previous size (10x nodes should cost about 10x).
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.definition import build_definition, validate_config
from asyncflow.worker import BaseTaskWorker

WORKER = BaseTaskWorker()


def resolve(task_type: str) -> BaseTaskWorker:
    return WORKER


def chain(n: int) -> WorkflowConfig:
    nodes = [NodeConfig(f"n{i}", next_nodes=[f"n{i + 1}"] if i + 1 < n else []) for i in range(n)]
    return WorkflowConfig("chain", nodes=nodes)


def fan_out(n: int) -> WorkflowConfig:
    middle = [f"m{i}" for i in range(n - 2)]
    nodes = [NodeConfig("head", next_nodes=middle)]
    nodes += [NodeConfig(node_id, next_nodes=["tail"]) for node_id in middle]
    nodes.append(NodeConfig("tail"))
    return WorkflowConfig("fan-out", nodes=nodes)


def ladder(n: int) -> WorkflowConfig:
    rungs = n // 2
    nodes = []
    for rung in range(rungs):
        nexts = [f"l{rung + 1}", f"r{rung + 1}"] if rung + 1 < rungs else []
        nodes += [NodeConfig(f"l{rung}", next_nodes=nexts), NodeConfig(f"r{rung}", next_nodes=nexts)]
    return WorkflowConfig("ladder", nodes=nodes)


SHAPES: dict[str, Callable[[int], WorkflowConfig]] = {"chain": chain, "fan-out": fan_out, "ladder": ladder}


def count_edges(config: WorkflowConfig) -> int:
    """Edges of the built DAG: config edges, plus root -> each source and each sink -> end."""
    named = {target for node in config.nodes for target in node.next_nodes}
    sources = sum(1 for node in config.nodes if node.id not in named)
    return sum(len(node.next_nodes) or 1 for node in config.nodes) + sources


def measure(action: Callable[[], object], repeat: int) -> list[float]:
    """Wall-clock milliseconds of ``repeat`` runs of ``action`` (a collection before each, none during)."""
    times = []
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            action()
            times.append((time.perf_counter() - start) * 1000)
        finally:
            gc.enable()
    return times


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):9.1f} [{min(times):.1f}-{max(times):.1f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated node counts")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median reported)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    print(f"python {platform.python_version()} on {platform.machine()}, {args.repeat} runs per figure")
    header = (
        f"{'shape':8} {'nodes':>7} {'edges':>7}  {'validate ms [min-max]':>26}  {'build ms [min-max]':>26}"
    )
    print(header + f"  {'us/node':>7}  {'growth':>6}")
    worst_10k = 0.0
    for name, make in SHAPES.items():
        previous: float | None = None
        for n in sizes:
            config = make(n)
            edges = count_edges(config)
            validate = measure(partial(validate_config, config), args.repeat)
            build = measure(partial(build_definition, config, resolve), args.repeat)
            median = statistics.median(build)
            growth = f"{median / previous:6.1f}x" if previous else f"{'':>7}"
            print(
                f"{name:8} {len(config.nodes):7d} {edges:7d}  {spread(validate):>26}  {spread(build):>26}"
                f"  {median * 1000 / len(config.nodes):7.2f}  {growth}"
            )
            previous = median
            if n == 10_000:
                worst_10k = max(worst_10k, median)
    if worst_10k:
        verdict = "meets" if worst_10k < 1000 else "MISSES"
        print(f"slowest 10k-node build: {worst_10k:.1f} ms ({verdict} the 'well under a second' target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
