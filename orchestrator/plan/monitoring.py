"""What Prometheus scrapes in a plan: node_exporter on every host (with the textfile
metrics of the monitoring stage: GPUs, Ollama) and every vLLM instance's /metrics.

Pure: computed from the plan, the fleet's `monitoring:` settings and the hosts' facts
(for the mount that holds the weights); orchestrator/run/monitoring.py writes the files.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.config.fleet import LoadedFleet, MonitoringSettings, ResolvedHost
from orchestrator.facts.hostfacts import HostFacts
from orchestrator.plan.planner import Plan

# Job names carry the toolkit's prefix so that copying them into an operator's Prometheus
# clashes with none of its own jobs; the alert rules select by them.
NODE_JOB = "orchestrate-node"
VLLM_JOB = "orchestrate-vllm"


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScrapeTarget(_Out):
    job: str = Field(description="orchestrate-node (node_exporter) or orchestrate-vllm")
    address: str = Field(description="host:port as Prometheus reaches it from the control "
                                     "machine")
    labels: dict[str, str] = Field(description="host, group and (vLLM) deployment, model, "
                                               "engine; node: profile, weights_mount")
    open: bool = Field(default=False, description="served beyond loopback without "
                                                  "authentication (node_exporter has none)")


class Unscraped(_Out):
    job: str
    host: str
    deployment: str | None = None
    reason: str = Field(description="why no Prometheus off the host reaches it, and the fix")


class MonitoringPlan(_Out):
    group: str
    scrape_interval: str = Field(description="fleet.yml monitoring.scrape_interval")
    node_exporter_listen: str = Field(description="fleet.yml monitoring.node_exporter_listen")
    targets: list[ScrapeTarget]
    unscraped: list[Unscraped] = Field(description="listening on a host's loopback only: no "
                                                   "Prometheus elsewhere reaches them")


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _address(host: ResolvedHost, listen_ip: str, port: int) -> str | None:
    """Where the control machine reaches a service of `host` listening on listen_ip:port;
    None when it listens on the host's loopback only."""
    ip = ipaddress.ip_address(listen_ip)
    if ip.is_loopback:
        return None
    # A wildcard: the fleet's address, through its port_map (NAT, the sandbox); a given
    # address: that one.
    name = host.address if ip.is_unspecified else listen_ip
    mapped = host.port_map.get(port, port) if ip.is_unspecified else port
    return f"[{name}]:{mapped}" if ":" in name else f"{name}:{mapped}"


def weights_mount(facts: HostFacts | None, weights_root: str) -> str:
    """The mount point holding the weights, as the facts measured it; the root filesystem
    where the host has no facts yet (the weights' filesystem alert then watches /)."""
    disk = next((d for d in facts.disk if d.path == weights_root), None) if facts else None
    return disk.mount if disk else "/"


def plan_monitoring(plan: Plan, loaded: LoadedFleet, facts: Mapping[str, HostFacts],
                    weights_root: str) -> MonitoringPlan:
    """The scrape targets of `plan`'s hosts; `weights_root` is the model_weights role's."""
    settings: MonitoringSettings = loaded.fleet.monitoring
    resolved = {h.name: h for h in loaded.hosts_of(plan.group)}
    listen_ip, listen_port = _split(settings.node_exporter_listen)
    models = {d.name: d.model for d in loaded.fleet.deployments}
    targets: list[ScrapeTarget] = []
    unscraped: list[Unscraped] = []
    for host in plan.hosts:
        base = {"host": host.name, "group": host.group}
        address = _address(resolved[host.name], listen_ip, listen_port)
        if address is None:
            unscraped.append(Unscraped(
                job=NODE_JOB, host=host.name,
                reason=f"node_exporter listens on {settings.node_exporter_listen}, the host's "
                       "loopback: set monitoring.node_exporter_listen to an address the "
                       "Prometheus host reaches"))
        else:
            targets.append(ScrapeTarget(
                job=NODE_JOB, address=address, open=True,
                labels={**base, "profile": host.profile,
                        "weights_mount": weights_mount(facts.get(host.name), weights_root)}))
        for probe in host.probes:
            if probe.engine != "vllm":
                # Ollama has no /metrics: the textfile collector exports its state.
                continue
            labels = {**base, "deployment": probe.deployment,
                      "model": models.get(probe.deployment, probe.served_model_name),
                      "engine": probe.engine}
            if probe.loopback_only:
                unscraped.append(Unscraped(
                    job=VLLM_JOB, host=host.name, deployment=probe.deployment,
                    reason="the deployment listens on the host's loopback only"))
                continue
            # vLLM's --api-key guards /v1, /v2, /inference and /cohere only
            # (vllm/entrypoints/serve/middleware/authenticate.py, GUARDED_PREFIX, 0.32.0):
            # /metrics answers without the key, so the scrape config carries none.
            targets.append(ScrapeTarget(job=VLLM_JOB,
                                        address=probe.base_url.removeprefix("http://"),
                                        labels=labels, open=probe.open))
    return MonitoringPlan(group=plan.group, scrape_interval=settings.scrape_interval,
                          node_exporter_listen=settings.node_exporter_listen,
                          targets=targets, unscraped=unscraped)
