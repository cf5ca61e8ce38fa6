"""The files a Prometheus needs to watch a fleet, from its monitoring plan:

    prometheus.yml                    scrape configs reading the targets below (file_sd)
    targets/orchestrate-node.json     node_exporter per host (with the textfile metrics)
    targets/orchestrate-vllm.json     every vLLM instance's /metrics
    rules/orchestrate.rules.yml       alert rules (templates/monitoring/)
    dashboards/orchestrate.json       a Grafana dashboard

Paths inside prometheus.yml are relative, which Prometheus reads from the config file's
directory: the folder works as it is, or copied into an existing Prometheus's.
Fleet values (host names, labels) reach the files only through json/yaml dumps: data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from orchestrator.knowledge.roles import ROOT
from orchestrator.plan.monitoring import NODE_JOB, VLLM_JOB, MonitoringPlan

RULES = ROOT / "templates" / "monitoring" / "orchestrate.rules.yml"
RULES_NAME = "rules/orchestrate.rules.yml"
DASHBOARD_NAME = "dashboards/orchestrate.json"
DASHBOARD_UID = "orchestrate-fleet"

# Grafana's template variables, matched as regular expressions (multi-value, All = .*).
_DEP = 'job="orchestrate-vllm", host=~"$host", deployment=~"$deployment"'
_NODE = 'job="orchestrate-node", host=~"$host"'


def _rate(metric: str) -> str:
    return f"rate({metric}{{{_DEP}}}[$__rate_interval])"


def _quantile(q: float, histogram: str) -> str:
    return (f"histogram_quantile({q}, sum by (host, deployment, le) "
            f"({_rate(histogram + '_bucket')}))")


# (title, unit, [(PromQL, legend)]): per deployment, then per host.
DEPLOYMENT_PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Requests finished /s", "reqps", [
        (f"sum by (host, deployment) ({_rate('vllm:request_success_total')})",
         "{{deployment}} @ {{host}}")]),
    ("Requests running and waiting", "short", [
        (f"vllm:num_requests_running{{{_DEP}}}", "running {{deployment}} @ {{host}}"),
        (f"vllm:num_requests_waiting{{{_DEP}}}", "waiting {{deployment}} @ {{host}}")]),
    ("Time to first token", "s", [
        (_quantile(0.5, "vllm:time_to_first_token_seconds"), "p50 {{deployment}} @ {{host}}"),
        (_quantile(0.95, "vllm:time_to_first_token_seconds"), "p95 {{deployment}} @ {{host}}")]),
    ("Inter-token latency", "s", [
        (_quantile(0.5, "vllm:inter_token_latency_seconds"), "p50 {{deployment}} @ {{host}}"),
        (_quantile(0.95, "vllm:inter_token_latency_seconds"),
         "p95 {{deployment}} @ {{host}}")]),
    ("Tokens /s", "short", [
        (f"sum by (host, deployment) ({_rate('vllm:generation_tokens_total')})",
         "generated {{deployment}} @ {{host}}"),
        (f"sum by (host, deployment) ({_rate('vllm:prompt_tokens_total')})",
         "prompt {{deployment}} @ {{host}}")]),
    ("KV cache used", "percentunit", [
        (f"vllm:kv_cache_usage_perc{{{_DEP}}}", "{{deployment}} @ {{host}}")]),
    ("Scrape up (1 = serving /metrics)", "short", [
        (f"up{{{_DEP}}}", "{{deployment}} @ {{host}}")]),
]
HOST_PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("GPU driver loaded (1 = yes)", "short", [
        (f"orchestrate_gpu_driver_loaded{{{_NODE}}}", "{{host}}")]),
    ("GPU utilization", "percentunit", [
        (f"orchestrate_gpu_utilization_ratio{{{_NODE}}}", "{{host}} GPU {{gpu}}")]),
    ("GPU memory used", "bytes", [
        (f"orchestrate_gpu_memory_used_bytes{{{_NODE}}}", "used {{host}} GPU {{gpu}}"),
        (f"orchestrate_gpu_memory_total_bytes{{{_NODE}}}", "total {{host}} GPU {{gpu}}")]),
    ("GPU temperature", "celsius", [
        (f"orchestrate_gpu_temperature_celsius{{{_NODE}}}", "{{host}} GPU {{gpu}}")]),
    ("GPU power", "watt", [
        (f"orchestrate_gpu_power_watts{{{_NODE}}}", "{{host}} GPU {{gpu}}"),
        (f"orchestrate_gpu_power_limit_watts{{{_NODE}}}", "limit {{host}} GPU {{gpu}}")]),
    ("GPU throttling (clocks event reasons active)", "short", [
        (f"orchestrate_gpu_clocks_event_active{{{_NODE}}}", "{{host}} GPU {{gpu}} {{reason}}")]),
    ("GPU errors: uncorrected ECC, pending retirements, Xid", "short", [
        (f'orchestrate_gpu_ecc_errors{{{_NODE}, type="uncorrected"}}',
         "ECC {{scope}} {{host}} GPU {{gpu}}"),
        (f"orchestrate_gpu_retired_pages_pending{{{_NODE}}}",
         "pending retirement {{host}} GPU {{gpu}}"),
        (f"increase(orchestrate_gpu_xid_errors_total{{{_NODE}}}[1h])",
         "Xid {{xid}} {{host}} (last hour)")]),
    ("Weights filesystem free", "percentunit", [
        (f"node_filesystem_avail_bytes{{{_NODE}}} / node_filesystem_size_bytes{{{_NODE}}} "
         f'and on (instance, mountpoint) label_replace(up{{{_NODE}}}, "mountpoint", "$1", '
         '"weights_mount", "(.+)")', "{{host}} {{mountpoint}}")]),
    ("Ollama answering (1 = yes)", "short", [
        (f"orchestrate_ollama_up{{{_NODE}}}", "{{host}}")]),
]


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, Grafana's variables still in them."""
    return [expr for _, _, queries in DEPLOYMENT_PANELS + HOST_PANELS for expr, _ in queries]


def _panel(index: int, title: str, unit: str, queries: list[tuple[str, str]],
           y: int) -> dict[str, Any]:
    return {
        "id": index + 1, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": (index % 2) * 12, "y": y + (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for n, (expr, legend) in enumerate(queries)],
    }


def _variable(name: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": name, "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query,
            "multi": True, "includeAll": True, "allValue": ".*", "refresh": 2, "sort": 1,
            "current": {"text": "All", "value": "$__all"}}


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard (schema of Grafana 10/11): deployments, then hosts."""
    panels: list[dict[str, Any]] = [{"id": 100, "type": "row", "title": "Deployments",
                                     "collapsed": False,
                                     "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0}, "panels": []}]
    panels += [_panel(i, *panel, y=1) for i, panel in enumerate(DEPLOYMENT_PANELS)]
    host_y = 1 + ((len(DEPLOYMENT_PANELS) + 1) // 2) * 8
    panels.append({"id": 101, "type": "row", "title": "Hosts", "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": host_y}, "panels": []})
    panels += [{**_panel(i, *panel, y=host_y + 1), "id": 50 + i}
               for i, panel in enumerate(HOST_PANELS)]
    return {
        "uid": DASHBOARD_UID, "title": "orchestrate fleet", "schemaVersion": 39,
        "tags": ["orchestrate", "vllm"], "timezone": "browser", "editable": True,
        "time": {"from": "now-3h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus"},
            _variable("host", f'label_values(up{{job=~"{NODE_JOB}|{VLLM_JOB}"}}, host)'),
            _variable("deployment", f'label_values(up{{job="{VLLM_JOB}"}}, deployment)'),
        ]},
        "panels": panels,
    }


def prometheus_config(plan: MonitoringPlan) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": plan.scrape_interval,
                   "evaluation_interval": plan.scrape_interval},
        "rule_files": [RULES_NAME],
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics",
             "file_sd_configs": [{"files": [f"targets/{job}.json"]}]}
            for job in (NODE_JOB, VLLM_JOB)],
    }


def file_sd(plan: MonitoringPlan, job: str) -> list[dict[str, Any]]:
    """Prometheus's file_sd format: one entry per target, with its labels."""
    return [{"targets": [t.address], "labels": t.labels} for t in plan.targets if t.job == job]


def write_monitoring(plan: MonitoringPlan, out: Path) -> list[Path]:
    """Writes the files under `out` (made if missing); returns their paths."""
    files: dict[str, str] = {
        "prometheus.yml": "# Written by orchestrate monitoring for host group "
                          f"{json.dumps(plan.group)}.\n"
                          + yaml.safe_dump(prometheus_config(plan), sort_keys=False),
        RULES_NAME: RULES.read_text(),
        DASHBOARD_NAME: json.dumps(dashboard(), indent=2) + "\n",
        **{f"targets/{job}.json": json.dumps(file_sd(plan, job), indent=2) + "\n"
           for job in (NODE_JOB, VLLM_JOB)},
    }
    written = []
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # Replaced whole: Prometheus re-reads file_sd files on change and must never see
        # half of one.
        partial = path.with_name(path.name + ".tmp")
        partial.write_text(text)
        partial.replace(path)
        written.append(path)
    return written
