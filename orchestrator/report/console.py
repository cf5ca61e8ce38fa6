"""What the operator reads: plan, live progress, run outcome and probe results."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from orchestrator.facts.hostfacts import HostFacts, NvidiaFacts
from orchestrator.mirror.packages import OLLAMA, WHEELS, OllamaArchive, WheelStack
from orchestrator.mirror.weights import Staged, Traffic
from orchestrator.plan.planner import Plan, command_line
from orchestrator.run.runner import Progress, RunResult
from orchestrator.verify.bench import BenchReport
from orchestrator.verify.httpprobe import ProbeReport, ProbeResult
from orchestrator.verify.liveness import DeploymentStatus, Skew

# A deployment served beyond loopback without an API key (options.open).
OPEN_MARK = "[bold red]OPEN[/bold red]"


def plan_table(plan: Plan, console: Console, facts: Mapping[str, str] | None = None) -> None:
    """The plan, a row per host; `facts`: per host, where its facts came from."""
    table = Table(title=escape(f"Plan for '{plan.group}' (stages: {', '.join(plan.stages)})"))
    columns = ["host", "profile", "address", "batch", "deployments", "why"]
    for column in [*columns, *(["facts"] if facts is not None else [])]:
        table.add_column(column, overflow="fold")
    ray = plan.ray_cluster
    # The services stage's batch of each host, 1 first (fleet.yml rollout:).
    batch_of = {host: str(number) for number, batch in enumerate(plan.rollout.batches, 1)
                for host in batch}
    for host in plan.hosts:
        planned = host.vars.get("vllm_deployments", [])
        lines = [f"{d['name']}: vllm {command_line(d['args'])}" for d in planned]
        if ray is not None and host.name in ray.members:
            lines.insert(0, f"{ray.deployment}: Ray head" if host.name == ray.head
                         else f"{ray.deployment}: Ray worker (head {ray.head})")
        # One Ollama server per host serves its Ollama deployments (roles/ollama).
        lines += [f"{t.deployment}: ollama {t.served_model_name} on "
                  f"{host.vars.get('ollama_host')}:{host.vars.get('ollama_port')}"
                  for t in host.probes if t.engine == "ollama"]
        deployments = "\n".join(escape(line) for line in lines) or "-"
        deployments += "".join(f"\n{OPEN_MARK} {escape(t.deployment)}: no API key, "
                               "listens beyond loopback" for t in host.probes if t.open)
        conn = host.connection
        # Reasons quote what the hosts reported (GPU names, errors): text, never markup.
        cells = [escape(c) for c in [
            host.name, host.profile,
            f"{conn['ansible_user']}@{conn['ansible_host']}:{conn['ansible_port']}",
            batch_of.get(host.name, "-")]]
        table.add_row(*cells, deployments, escape("\n".join(host.reasons)),
                      *([escape(facts.get(host.name, "-"))] if facts is not None else []))
    console.print(table)
    batches = plan.rollout.batches
    if "services" in plan.stages and batches:
        console.print(escape(f"services stage in {len(batches)} batch(es), each behind the "
                             "health gate, the first failed one stopping the rollout: "
                             + "; ".join(f"{n}: {', '.join(b)}" for n, b in enumerate(batches, 1))
                             + f" ({'; '.join(plan.rollout.reasons)})"))


def _counted(values: list[str]) -> str:
    """Distinct values, with how many GPUs have each where they differ."""
    seen = {v: values.count(v) for v in values}
    return (next(iter(seen)) if len(seen) == 1
            else ", ".join(f"{n}x {v}" for v, n in seen.items()))


def _driver_text(nvidia: NvidiaFacts) -> str:
    state = nvidia.driver_state
    if state == "loaded":
        return f"{nvidia.driver_version} / CUDA {nvidia.cuda_version or '?'}"
    if state == "no_gpu":
        return "no NVIDIA GPU"
    if state == "not_installed":
        found = "" if nvidia.pci_gpus is None else f" ({nvidia.pci_gpus} NVIDIA GPU(s) on " \
                                                     "the PCI bus)"
        return f"not installed{found}"
    error = nvidia.error
    return (f"broken: {error.kind}: {error.message}; next: {error.next_step}" if error
            else "broken")


def _facts_rows(facts: HostFacts) -> list[tuple[str, str]]:
    """A host's facts, one (name, value) per row, as facts_tables prints them."""
    rows: list[tuple[str, str]] = []
    nvidia = facts.nvidia
    if nvidia is not None:
        gpus = nvidia.gpus
        kinds = [f"{g.name}, {g.memory_total_mib if g.memory_total_mib is not None else '?'} "
                 f"MiB" + (f", compute capability {g.compute_capability}"
                           if g.compute_capability else "") for g in gpus]
        fabric = nvidia.fabric_manager_needed
        rows += [
            ("GPUs", f"{len(gpus)}x {_counted(kinds)}" if gpus else "none found"),
            ("driver / CUDA", _driver_text(nvidia)),
            ("MIG", _counted([g.mig_mode or "not supported" for g in gpus])
             + (f" ({len(nvidia.mig_devices)} MIG devices)" if nvidia.mig_devices else "")
             if gpus else "-"),
            ("persistence", _counted([g.persistence_mode or "unknown" for g in gpus])
             if gpus else "-"),
            ("ECC", _counted([g.ecc_mode or "not supported" for g in gpus]) if gpus else "-"),
            ("Fabric Manager", "unknown" if fabric is None else
             f"needed ({nvidia.nvswitches} NVSwitches)" if fabric else "not needed"),
            ("read with", nvidia.source),
        ]
    system = facts.os
    if system is not None:
        headers = {True: "headers installed", False: "headers MISSING",
                   None: "headers unknown"}[system.kernel_headers]
        rows += [
            ("OS", " ".join(p for p in (system.distribution, system.version) if p)
             + (f" ({system.family})" if system.family else "") or "unknown"),
            ("kernel", f"{system.kernel or 'unknown'}, {headers}"),
            ("Secure Boot", system.secure_boot or "unknown"),
            ("Python", system.python_version or "unknown"),
        ]
    if facts.memory_mib is not None:
        rows.append(("RAM", f"{facts.memory_mib} MiB ({facts.memory_mib / 1024:.1f} GiB)"))
    rows += [("free disk", f"{d.path}: {d.free_mib} MiB ({d.free_mib / 1024:.1f} GiB) on "
                           f"{d.mount}") for d in facts.disk]
    return rows


def facts_tables(group: str, hosts: list[tuple[HostFacts, str]], console: Console) -> None:
    """`orchestrate facts`: a table per host (its facts, and where they came from), or the
    reason it was not reached. Every value is the host's: printed as text, never markup."""
    for facts, origin in hosts:
        if not facts.reachable:
            console.print(f"[red]{escape(facts.host)}: not reached[/red]: "
                          f"{escape(facts.unreachable or 'no reason given')}", highlight=False)
            continue
        table = Table(title=escape(f"{facts.host} ({origin}, {facts.where()})"),
                      show_header=False)
        table.add_column("fact")
        table.add_column("value", overflow="fold")
        for name, value in _facts_rows(facts):
            table.add_row(name, escape(value))
        console.print(table)
    if not hosts:
        console.print(f"no hosts in '{escape(group)}'", highlight=False)


@dataclass
class _HostProgress:
    play: str = ""
    task: str = ""
    ok: int = 0
    changed: int = 0
    failed: int = 0


class LiveProgress:
    """Per-host progress: a live table on a terminal, one line per event elsewhere (CI logs)."""

    def __init__(self, console: Console, hosts: list[str]) -> None:
        self.console = console
        self.state = {h: _HostProgress() for h in hosts}
        self.play = ""
        self.live = Live(self._table(), console=console, refresh_per_second=4,
                         transient=False) if console.is_terminal else None

    def __enter__(self) -> LiveProgress:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.__exit__(None, None, None)

    def _table(self) -> Table:
        table = Table(box=None)
        for column in ("host", "stage", "task", "ok", "changed", "failed"):
            table.add_column(column)
        for host, s in self.state.items():
            failed = f"[red]{s.failed}[/red]" if s.failed else "0"
            table.add_row(escape(host), escape(s.play), escape(s.task), str(s.ok),
                          str(s.changed), failed)
        return table

    def __call__(self, event: Progress) -> None:
        if event.kind == "play":
            self.play = event.play
            if not self.live:
                self.console.print(f"[bold]PLAY[/bold] {escape(event.play)}", highlight=False)
        elif event.host in self.state:
            s = self.state[event.host]
            s.play, s.task = event.play, event.task
            if event.kind in ("ok", "changed"):
                s.ok += 1
            if event.kind == "changed":
                s.changed += 1
            if event.kind == "failed":
                s.failed += 1
            if event.kind in ("failed", "unreachable") and not self.live:
                self.console.print(f"  [red]{event.kind.upper()}[/red] {escape(event.host)}: "
                                   f"{escape(event.task)}", highlight=False)
        if self.live:
            self.live.update(self._table())


def run_summary(result: RunResult, console: Console, run_dir: str) -> None:
    table = Table(title="Ansible run")
    for column in ("host", "ok", "changed", "failed", "unreachable", "skipped"):
        table.add_column(column)
    for host, s in sorted(result.stats.items()):
        table.add_row(escape(host), str(s.ok), str(s.changed),
                      f"[red]{s.failed}[/red]" if s.failed else "0",
                      f"[red]{s.unreachable}[/red]" if s.unreachable else "0", str(s.skipped))
    console.print(table)
    for failure in result.failures:
        what = "UNREACHABLE" if failure.unreachable else "FAILED"
        console.print(f"[red]{what}[/red] [bold]{escape(failure.host)}[/bold] "
                      f"({escape(failure.play)} / {escape(failure.task)}):", highlight=False)
        console.print(f"    {failure.message}".replace("\n", "\n    "), markup=False,
                      highlight=False)
    if result.rc != 0 and not result.failures:
        console.print(f"[red]ansible-playbook exited with {result.rc}[/red] ({result.status}) "
                      f"without a failed task; its output is in "
                      f"{escape(run_dir)}/artifacts/ansible/stdout")
    console.print(f"changed={result.changed_total}  run directory: {escape(run_dir)}")


# On every row a stand-in engine answered: its results are the stand-in's, not a model's.
STANDIN_MARK = "[bold yellow]STAND-IN[/bold yellow]"


def probe_table(report: ProbeReport, console: Console) -> None:
    table = Table(title=escape(f"Probes for '{report.group}'"))
    for column in ("host", "deployment", "probe", "result", "evidence"):
        table.add_column(column, overflow="fold")
    for r in report.results:
        verdict = {"pass": "[green]pass[/green]", "skip": "[yellow]skip[/yellow]",
                   "fail": "[red]FAIL[/red]"}[r.status]
        # Evidence quotes what the models answered ("[/INST]"): text, never markup.
        evidence = r.evidence if r.passed else f"{r.evidence}\nnext: {r.next_step}"
        table.add_row(escape(r.host),
                      escape(r.deployment) + (f" {STANDIN_MARK}" if r.standin else ""),
                      escape(r.probe), verdict, escape(evidence))
    console.print(table)
    if report.results:
        failed = report.failed_hosts()
        console.print("[green]all probes passed[/green]" if not failed
                      else f"[red]probes failed on: {escape(', '.join(failed))}[/red]")
    else:
        console.print("no deployments to probe")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_OR_NEWLINE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def shown(text: str, *, one_line: bool = False) -> str:
    """Text from a host or a service, safe to print through rich: its markup escaped and
    its control characters (ANSI escapes, carriage returns; line breaks too when
    `one_line`, so that no line can pass for another host's) shown as \\xNN, never obeyed."""
    control = _CONTROL_OR_NEWLINE if one_line else _CONTROL
    return escape(control.sub(lambda m: f"\\x{ord(m.group()):02x}", text))


def log_line(host: str, unit: str, when: dt.datetime, message: str) -> str:
    """One journal entry for `orchestrate logs`: host and unit first, the message as
    text on the same line."""
    return (f"[bold]{shown(host, one_line=True)}[/bold] [cyan]{shown(unit, one_line=True)}"
            f"[/cyan] [dim]{when.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}[/dim] "
            f"{shown(message, one_line=True)}")


def _release(d: DeploymentStatus) -> str:
    engine = f"{d.engine} {d.engine_version or '?'}"
    parts = [engine] + ([f"torch {d.torch_version}"] if d.torch_version else []) + (
        [f"driver {d.driver_version}"] if d.driver_version else [])
    return ", ".join(parts)


def status_table(group: str, deployments: list[DeploymentStatus],
                 unreachable: list[ProbeResult], skew: list[Skew], console: Console) -> None:
    """`orchestrate status`: one row per deployment, its unit, whether it is up and the
    release it runs; then each failed check, the hosts SSH did not reach, and what
    differs between hosts."""
    table = Table(title=f"Status of '{escape(group)}'")
    for column in ("host", "deployment", "unit", "state", "restarts", "up", "model",
                   "release"):
        table.add_column(column, overflow="fold")
    for d in deployments:
        state = "/".join(s for s in (d.active_state, d.sub_state) if s) or "unknown"
        weights = f"{d.model_id}@{d.revision or '?'}" if d.model_id else None
        model = "\n".join(x for x in (d.served_model or "not listed", weights) if x)
        table.add_row(escape(d.host), escape(d.deployment), escape(d.unit or "-"),
                      shown(state + (f" since {d.since}" if d.since else "")),
                      "-" if d.restarts is None else str(d.restarts),
                      "[green]up[/green]" if d.up else "[red]DOWN[/red]",
                      shown(model), shown(_release(d)))
    console.print(table)
    for d in deployments:
        for r in d.checks:
            if not r.passed:
                console.print(f"[red]{escape(d.host)}/{escape(d.deployment)} {escape(r.probe)}"
                              f"[/red]: {shown(r.evidence)}"
                              + (f"\n  next: {shown(r.next_step)}" if r.next_step else ""),
                              highlight=False)
    for r in unreachable:
        console.print(f"[yellow]{escape(r.host)}: SSH did not answer, its units are "
                      f"unknown[/yellow]: {shown(r.evidence)}", highlight=False)
    for found in skew:
        console.print(f"[red]skew[/red]: {shown(found.line(), one_line=True)}", highlight=False)
    if not deployments:
        console.print("no deployments on these hosts")


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def bench_table(bench: BenchReport, console: Console) -> None:
    w = bench.workload
    table = Table(title=escape(f"Benchmark of '{bench.group}': {w.requests} requests per "
                               f"level, {w.input_tokens} words in, {w.output_tokens} tokens out"))
    for column in ("host", "deployment", "conc.", "req/s", "out tok/s", "TTFT p50/p95/p99 ms",
                   "ITL p50/p95/p99 ms", "errors"):
        table.add_column(column, overflow="fold")
    for d in bench.deployments:
        name = escape(f"{d.deployment} ({d.engine})") + (f" {STANDIN_MARK}" if d.standin
                                                         else "")
        if d.skipped:
            table.add_row(escape(d.host), name, "-", "-", "-", "-", "-",
                          f"[red]skipped[/red]: {escape(d.skipped)}")
        for lv in d.levels:
            t, i = lv.ttft_ms, lv.itl_ms
            errors = (f"[red]{lv.errors}/{lv.requests}[/red] {escape(lv.error_messages[0])}"
                      if lv.errors else f"0/{lv.requests}")
            table.add_row(escape(d.host), name, str(lv.concurrency),
                          f"{lv.requests_per_s:.2f}",
                          f"{lv.output_tokens_per_s:.1f} ({lv.tokens_from})",
                          f"{_ms(t.p50)}/{_ms(t.p95)}/{_ms(t.p99)}",
                          f"{_ms(i.p50, 2)}/{_ms(i.p95, 2)}/{_ms(i.p99, 2)}", errors)
    console.print(table)
    standins = [f"{d.host}/{d.deployment}" for d in bench.deployments if d.standin]
    if standins:
        console.print(f"{STANDIN_MARK}: {escape(', '.join(standins))} answered as a stand-in "
                      "engine (its Server header says so): the numbers measure the stand-in, "
                      "not the real engine, and are not compared with real engines")


def mirror_table(staged: list[Staged], directory: str, console: Console) -> None:
    table = Table(title=escape(f"Mirror {directory}"))
    for column in ("model", "origin", "deployments", "files", "size", "from origin now"):
        table.add_column(column, overflow="fold")
    for s in staged:
        table.add_row(escape(s.key), escape(s.origin), escape(", ".join(s.deployments)),
                      str(s.files),
                      f"{s.total_bytes} B ({s.total_bytes / 2**30:.2f} GiB)",
                      f"{s.origin_bytes} B" + (" (already staged)" if s.already_staged else "")
                      + escape(f" (fetched again, damaged: {', '.join(s.repaired)})"
                         if s.repaired else ""))
    console.print(table)
    console.print(f"bytes taken from the origin by this run: "
                  f"{sum(s.origin_bytes for s in staged)}", highlight=False)


def mirror_packages(stacks: list[WheelStack], archives: list[OllamaArchive], directory: str,
                    console: Console) -> None:
    """The wheels and Ollama archives `orchestrate mirror` staged beside the weights."""
    if stacks:
        table = Table(title=escape(f"Wheels {directory}/{WHEELS}"))
        for column in ("python", "requirements", "torch index", "hosts", "this run"):
            table.add_column(column, overflow="fold")
        for s in stacks:
            table.add_row(s.python_version, escape(", ".join(s.requirements)),
                          escape(s.index or "PyPI"), escape(", ".join(s.hosts)),
                          "already staged, nothing downloaded" if s.already_staged
                          else "downloaded")
        console.print(table)
    if archives:
        table = Table(title=escape(f"Ollama {directory}/{OLLAMA}"))
        for column in ("archive", "sha256", "hosts", "from origin now"):
            table.add_column(column, overflow="fold")
        for a in archives:
            table.add_row(escape(a.path), escape(a.sha256), escape(", ".join(a.hosts)),
                          f"{a.origin_bytes} B" + (" (already staged)" if a.already_staged
                                                   else f" from {escape(a.url)}"))
        console.print(table)


def mirror_traffic(traffic: Traffic, console: Console) -> None:
    """What the mirror served to the hosts during `up`: each file, how often, how much."""
    served = traffic.to_dict()
    console.print(f"the mirror served {served['requests']} request(s), {served['bytes']} B",
                  highlight=False)
    for path, seen in served["paths"].items():
        console.print(f"  {escape(path)}: {seen['ok']} of {seen['requests']} answered, "
                      f"{seen['bytes']} B", highlight=False)
