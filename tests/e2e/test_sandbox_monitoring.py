"""Day 2 on the sandbox: a real Prometheus (the Debian package's binary, on this machine's
127.0.0.1, its storage in a temp dir) runs the config `orchestrate monitoring` writes and
scrapes both sandbox hosts: node_exporter (the monitoring stage's, with the host_metrics
textfile metrics) and vLLM's /metrics.

Checked: every target up; vLLM's request counter rises after a chat; stopping
vllm@tiny-qwen2 on one host fires DeploymentDown (/api/v1/alerts) within two minutes, and
starting it again clears it; every query of the dashboard returns data.

GPU queries: the sandbox hosts have no GPU, so the collector exports
orchestrate_gpu_driver_loaded 0 there and no per-GPU series; that is asserted. For the
per-GPU queries to be checked against data, one more node target is a STAND-IN GPU host:
this test serves the host_metrics collector's own output for a REPLAYED nvidia-smi capture
(a Tesla P100) and kernel log with Xid lines, over HTTP on 127.0.0.1, labelled
host="gpu-standin". Leaves the sandbox serving, as it found it."""

from __future__ import annotations

import http.server
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from sandboxkit import HEALTH, HOSTS, STATE, UNIT, VLLM, Sandbox, orchestrate, ssh

from orchestrator.config.vault import load_secrets
from orchestrator.run import monitoring as render

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
COLLECTOR = REPO / "roles" / "host_metrics" / "files" / "host_metrics.py"
P100 = REPO / "tests" / "data" / "nvidia-smi" / "xml__Tesla-P100-PCIE-16GB__510.47.03.txt"
XID_LOG = REPO / "tests" / "data" / "host_metrics" / "kernel-xid.log"
API = {"sandbox-1": "http://127.0.0.1:18000", "sandbox-2": "http://127.0.0.1:18001"}
STANDIN = "gpu-standin"
STOPPED = "sandbox-2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _standin_gpu_text() -> bytes:
    spec = importlib.util.spec_from_file_location("host_metrics", COLLECTOR)
    assert spec is not None and spec.loader is not None
    collector: Any = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules["host_metrics"] = collector
    spec.loader.exec_module(collector)
    report = collector.parse_xml(P100.read_text())
    now = time.time()
    families = collector.gpu_families(report, collector.count_xids(XID_LOG.read_text()),
                                      now, now)
    return str(collector.render(families)).encode()


@dataclass(frozen=True)
class Prometheus:
    url: str
    out: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = answer.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def alerts(self, name: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()
        return [a for a in body["data"]["alerts"] if a["labels"]["alertname"] == name]


def wait_for(what: str, seconds: float, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {seconds:.0f} s")
        time.sleep(2)


@pytest.fixture(scope="module")
def prometheus(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: scripts/install-host-deps.sh installs it"
    out = tmp_path_factory.mktemp("monitoring")
    ran = orchestrate(sandbox.cwd, sandbox.env, "monitoring", "--hosts", "sandbox",
                      "--out", str(out), "--json")
    assert ran.rc == 0, ran.tail()
    assert ran.json()["plan"]["unscraped"] == []

    text = _standin_gpu_text()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args: Any) -> None:
            pass

    standin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=standin.serve_forever, daemon=True).start()
    nodes = out / "targets" / "orchestrate-node.json"
    nodes.write_text(json.dumps([*json.loads(nodes.read_text()), {
        "targets": [f"127.0.0.1:{standin.server_address[1]}"],
        "labels": {"host": STANDIN, "group": "standin", "profile": "gpu",
                   "weights_mount": "/"}}]))

    port = _free_port()
    log = (out / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={out / 'prometheus.yml'}",
         f"--storage.tsdb.path={out / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("Prometheus ready", 60, lambda: _ready(url))
        yield Prometheus(url, out)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        standin.shutdown()
        # The sandbox as found: vLLM serving on every host.
        for host in HOSTS:
            ssh(sandbox.cwd, host, f"systemctl start {UNIT}")
        for host in HOSTS:
            assert wait_for(f"{host} healthy again", 300, partial(_healthy, HEALTH[host]))


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_up_wrote_the_monitoring_files_into_its_run_dir(sandbox: Sandbox) -> None:
    run = Path(sandbox.result["run_dir"]) / "monitoring"
    assert (run / "prometheus.yml").is_file() and (run / render.RULES_NAME).is_file()
    nodes = json.loads((run / "targets" / "orchestrate-node.json").read_text())
    assert sorted(t["labels"]["host"] for t in nodes) == sorted(HOSTS)
    assert {t["targets"][0] for t in nodes} == {"127.0.0.1:19100", "127.0.0.1:19101"}


def test_every_target_is_up(prometheus: Prometheus) -> None:
    def every_up() -> list[dict[str, Any]] | None:
        ups = prometheus.query("up")
        return ups if len(ups) == 5 and all(u["value"][1] == "1" for u in ups) else None

    ups = wait_for("every target up == 1", 60, every_up)
    seen = {(u["metric"]["job"], u["metric"]["host"]) for u in ups}
    assert seen == {*(("orchestrate-node", h) for h in (*HOSTS, STANDIN)),
                    *(("orchestrate-vllm", h) for h in HOSTS)}
    for u in ups:
        if u["metric"]["job"] == "orchestrate-vllm":
            assert (u["metric"]["deployment"], u["metric"]["engine"]) == (VLLM, "vllm")


def _served(prometheus: Prometheus, host: str) -> float:
    found = prometheus.query(f'sum(vllm:request_success_total{{host="{host}"}})')
    return float(found[0]["value"][1]) if found else -1.0


def _chat(sandbox: Sandbox, host: str) -> None:
    key = load_secrets(sandbox.cwd / STATE / "secrets.yml",
                       sandbox.cwd / STATE / "vault-password")["vault_sandbox_api_key"]
    answer = httpx.post(f"{API[host]}/v1/chat/completions", timeout=120,
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": VLLM, "max_tokens": 8, "temperature": 0,
                              "messages": [{"role": "user", "content": "Hello"}]})
    assert answer.status_code == 200, answer.text


def test_request_counter_rises_after_a_chat(sandbox: Sandbox, prometheus: Prometheus) -> None:
    host = HOSTS[0]

    def scraped() -> tuple[float] | None:
        value = _served(prometheus, host)
        return (value,) if value >= 0 else None

    (before,) = wait_for("vllm:request_success_total scraped", 60, scraped)
    _chat(sandbox, host)
    wait_for(f"the request counter of {host} above {before}", 60,
             lambda: _served(prometheus, host) > before)


def test_every_dashboard_query_returns_data(sandbox: Sandbox, prometheus: Prometheus) -> None:
    # Fresh traffic for the latency quantiles (rates over the last minute).
    for host in HOSTS:
        _chat(sandbox, host)
    time.sleep(12)
    # The sandbox hosts: no GPU, said by the collector (driver_loaded 0), no per-GPU series.
    loaded = {r["metric"]["host"]: r["value"][1]
              for r in prometheus.query("orchestrate_gpu_driver_loaded")}
    assert loaded == {"sandbox-1": "0", "sandbox-2": "0", STANDIN: "1"}
    empty = []
    for expr in render.dashboard_queries():
        query = (expr.replace("$__rate_interval", "1m").replace("$host", ".*")
                 .replace("$deployment", ".*"))
        result = prometheus.query(query)
        hosts = {r["metric"].get("host") for r in result}
        if "orchestrate_gpu_" in expr and "driver_loaded" not in expr:
            # Per-GPU data comes from the STAND-IN GPU host only.
            assert hosts == {STANDIN}, (query, result)
        elif not result:
            empty.append(query)
    assert not empty, f"queries without data: {empty}"


def test_deployment_down_fires_and_clears(sandbox: Sandbox, prometheus: Prometheus) -> None:
    assert not [a for a in prometheus.alerts("DeploymentDown") if a["state"] == "firing"]
    stopped = ssh(sandbox.cwd, STOPPED, f"systemctl stop {UNIT}")
    assert stopped.returncode == 0, stopped.stderr
    started = time.monotonic()

    def firing() -> list[dict[str, Any]]:
        return [a for a in prometheus.alerts("DeploymentDown")
                if a["state"] == "firing" and a["labels"]["host"] == STOPPED]

    [alert] = wait_for("DeploymentDown firing", 120, firing)
    print(f"DeploymentDown fired {time.monotonic() - started:.0f} s after the stop")
    assert alert["labels"]["deployment"] == VLLM
    assert STOPPED in alert["annotations"]["summary"]
    assert "orchestrate logs" in alert["annotations"]["description"]
    assert ssh(sandbox.cwd, STOPPED, f"systemctl start {UNIT}").returncode == 0
    assert wait_for(f"{STOPPED} healthy", 300, lambda: _healthy(HEALTH[STOPPED]))
    wait_for("DeploymentDown cleared", 60,
             lambda: not prometheus.alerts("DeploymentDown") or None)
