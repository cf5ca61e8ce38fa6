#!/usr/bin/env python3
"""What one control core can drive: `orchestrate bench`'s load generator against a trivial endpoint.

The endpoint (tests/doubles/bench_endpoint.py) answers every request at once with
`--output-tokens` one-token chunks, in a child process on another core; this
process is pinned to one core. Whatever it measures is therefore the load
generator's own cost: the requests/s and tokens/s ceilings, and the latency it
adds to every request (TTFT and whole-request time at concurrency 1).
If the endpoint's core is busier than the client's, the numbers are the endpoint's
limit, not the client's: both CPU loads are printed so that a reader can tell.
The client's CPU time per request (warm-up included) is printed too: it is
what each request costs, whatever else the machine runs.

    .venv/bin/python scripts/bench-overhead.py [--concurrency 1,4,16,64,256]
        [--requests 2000] [--output-tokens 128]

Linux only (CPU affinity and /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

# The test double lives with the tests, not in the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from doubles import bench_endpoint

from orchestrator.errors import ConfigError
from orchestrator.verify import bench


def _endpoint(core: int, conn: Connection) -> None:
    os.sched_setaffinity(0, {core})
    asyncio.run(bench_endpoint.serve(0, conn.send))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,4,16,64,256")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--output-tokens", type=int, default=128)
    args = parser.parse_args()
    try:
        levels = bench.make_workload(args.concurrency, args.requests, 16,
                                     args.output_tokens).concurrency
    except ConfigError as exc:
        parser.error(str(exc))

    cores = sorted(os.sched_getaffinity(0))
    client_core, endpoint_core = cores[0], cores[-1]
    ours, theirs = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_endpoint, args=(endpoint_core, theirs), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{ours.recv()}"
    os.sched_setaffinity(0, {client_core})
    pid = server.pid or 0
    print(f"client on core {client_core}, endpoint on core {endpoint_core} "
          f"({len(cores)} cores); {args.requests} requests per level, "
          f"{args.output_tokens} tokens each")
    print(f"{'protocol':8} {'conc':>5} {'req/s':>8} {'tokens/s':>9} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'req p50':>8} {'client CPU':>10} {'CPU/req':>8} "
          f"{'endpoint CPU':>12} errors")

    best: dict[str, tuple[float, float]] = {}
    for protocol in ("openai", "ollama"):
        for concurrency in levels:
            workload = bench.Workload(concurrency=[concurrency], requests=args.requests,
                                      warmup=1, input_tokens=16,
                                      output_tokens=args.output_tokens, timeout_s=30)
            wall, cpu, server_cpu = (time.perf_counter(), time.process_time(),
                                     _cpu_seconds(pid))
            level = bench.run_level(url, protocol, "selftest", workload, concurrency)
            wall = time.perf_counter() - wall
            cpu = time.process_time() - cpu
            server_cpu = _cpu_seconds(pid) - server_cpu
            per_request = cpu / (args.requests + concurrency)  # warm-up included
            print(f"{protocol:8} {concurrency:5} {level.requests_per_s:8.0f} "
                  f"{level.output_tokens_per_s:9.0f} {level.ttft_ms.p50 or 0:7.2f}ms "
                  f"{level.ttft_ms.p99 or 0:7.2f}ms {level.latency_ms.p50 or 0:6.2f}ms "
                  f"{cpu / wall:10.0%} {per_request * 1000:6.2f}ms "
                  f"{server_cpu / wall:12.0%} {level.errors}")
            if concurrency == levels[0] or level.requests_per_s > best[protocol][0]:
                best[protocol] = (level.requests_per_s, level.output_tokens_per_s)
    server.terminate()
    for protocol, (rps, tps) in best.items():
        print(f"ceiling ({protocol}): {rps:.0f} requests/s, {tps:.0f} output tokens/s "
              "on one core (the best level)")


if __name__ == "__main__":
    main()
