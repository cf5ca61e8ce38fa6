"""`orchestrate bench`: probe, then load-test each deployment."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from orchestrator.verify import bench as benchmark
from orchestrator.verify.httpprobe import probe_plan
from orchestrator.workflows.common import (
    CACHED,
    Bench,
    Events,
    Probes,
    Result,
    Target,
    open_secrets,
    plan_for,
)
from orchestrator.workflows.runs import new_run, save_results


@dataclass(frozen=True)
class BenchOptions:
    target: Target
    # Only these deployments (all when empty).
    deployments: tuple[str, ...] = ()
    # Requests in flight, one level after another: comma-separated.
    concurrency: str = "1,4,16"
    requests: int = 64
    input_tokens: int = 128
    output_tokens: int = 128


class BenchRun(Result):
    """`orchestrate bench --json` (docs/bench.md explains the measurements)."""

    run_id: str = Field(description="the run directory's name")
    run_dir: str = Field(description="holds plan.json, probes.json, bench.json, report.html")
    report: str = Field(description="the run's HTML report with the plots")
    passed: bool = Field(description="every probe passed and every request was answered "
                                     "(exit 0)")
    probes: Probes = Field(description="the HTTP probes run first")
    bench: Bench = Field(description="the measurements (bench.json in the run directory, "
                                     "without passed)")


def bench(options: BenchOptions, events: Events) -> BenchRun:
    target = options.target
    workload = benchmark.make_workload(options.concurrency, options.requests,
                                       options.input_tokens, options.output_tokens)
    plan = benchmark.only_deployments(plan_for(target, facts=CACHED, events=events).plan,
                                      list(options.deployments))
    secrets = open_secrets(plan.secrets_file, target.vault_password_file)
    # Before any request: a run directory that cannot be written stops it here.
    run_dir = new_run(plan, target.runs_root, "bench")
    probes = probe_plan(plan, secrets=secrets)
    failed = probes.failed_hosts()
    events.log(f"probes: {len(probes.results)}, "
               + (f"failed on {', '.join(failed)}" if failed else "all passed"))
    measured = benchmark.bench_plan(plan, workload, probes, events.log, secrets=secrets)
    html = save_results(run_dir, command="bench", plan=plan, probes=probes, bench=measured)
    return BenchRun(run_id=run_dir.name, run_dir=str(run_dir), report=str(html),
                    passed=probes.passed and measured.passed, probes=Probes.of(probes),
                    bench=Bench.of(measured))
