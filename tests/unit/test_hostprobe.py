"""SSH probes: the collector's evidence (real nvidia-smi outputs from the fixtures, a
weights directory and sockets of this machine) judged against the plan; hosts probed in
parallel, a dead or hanging one reported without holding up the rest."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from orchestrator import hostcollect
from orchestrator.compat import load_cuda_compat
from orchestrator.facts import parse_xml_health
from orchestrator.hostprobe import (
    CollectError,
    Service,
    gpu_evidence,
    gpu_results,
    listening_result,
    probe_hosts,
    service_results,
    weights_result,
)
from orchestrator.knowledge import load_knowledge
from orchestrator.plan import HostPlan, Plan, make_plan
from orchestrator.sandbox_fleet import sandbox_fleet

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "nvidia-smi"


def sandbox_plan() -> Plan:
    return make_plan(sandbox_fleet(Path("/k"), Path("/m")), "sandbox", load_knowledge(),
                     load_cuda_compat())


def gpu_host(**expect: Any) -> HostPlan:
    host = sandbox_plan().hosts[0]
    return host.model_copy(update={"profile": "gpu", "vars": {**host.vars, **expect}})


def smi(table_fixture: str, rc: int = 0) -> dict[str, Any]:
    text = (FIXTURES / table_fixture).read_text()
    return {"source": "nvidia-smi", "path": "/usr/bin/nvidia-smi",
            "table": {"argv": ["nvidia-smi"], "rc": rc, "stdout": text, "stderr": ""}}


def by_probe(results: list) -> dict[str, Any]:
    return {r.probe: r for r in results}


def test_driver_not_loaded_is_a_failure_with_the_next_step() -> None:
    host = gpu_host(gpu_check_min_driver="580.65.06")
    facts, health, source = gpu_evidence(smi("error_driver_comm__unknown__460.x.txt", rc=9))
    results = by_probe(gpu_results(host, facts, health, source))
    assert not results["gpu"].passed and "driver_not_loaded" in results["gpu"].evidence
    assert results["gpu"].next_step
    assert results["gpu_health"].status == "skip"


def test_driver_older_than_the_torch_build_needs() -> None:
    facts, health, source = gpu_evidence(smi("table__A10__550.127.05.txt"))
    old = by_probe(gpu_results(gpu_host(gpu_check_min_driver="580.65.06",
                                        gpu_check_expected_count=1,
                                        gpu_check_expected_name="A10"), facts, health, source))
    assert not old["gpu"].passed
    assert "550.127.05 is older than 580.65.06" in old["gpu"].evidence
    assert "install driver branch 580" in (old["gpu"].next_step or "")
    fine = by_probe(gpu_results(gpu_host(gpu_check_min_driver="535.104.05",
                                         gpu_check_expected_count=1,
                                         gpu_check_expected_name="A10"), facts, health, source))
    assert fine["gpu"].passed, fine["gpu"].evidence
    wrong = by_probe(gpu_results(gpu_host(gpu_check_expected_count=2), facts, health, source))
    assert not wrong["gpu"].passed and "1 GPU(s), the plan says 2" in wrong["gpu"].evidence


def test_cpu_host_skips_gpu_probes_and_says_why() -> None:
    results = by_probe(gpu_results(sandbox_plan().hosts[0], None, None, ""))
    assert results["gpu"].status == "skip" and results["gpu"].passed
    assert "profile cpu" in results["gpu"].evidence


def test_weights_complete_then_a_truncated_file_named(tmp_path: Path) -> None:
    host = sandbox_plan().hosts[0]
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    files = {p.name: {"size": p.stat().st_size, "sha256": ""} for p in tmp_path.iterdir()}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files}))
    entry = {"name": "tiny-qwen2", "dest": str(tmp_path), "source": "local"}
    good = weights_result(host, entry, hostcollect.model(entry, ".qwen-serve-complete"))
    assert good.passed, good.evidence
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    bad = weights_result(host, entry, hostcollect.model(entry, ".qwen-serve-complete"))
    assert not bad.passed and "model.safetensors" in bad.evidence and bad.next_step
    missing = weights_result(host, {"name": "m", "dest": str(tmp_path / "none")},
                             hostcollect.model({"name": "m", "dest": str(tmp_path / "none")},
                                               ".qwen-serve-complete"))
    assert not missing.passed and missing.next_step
    # A download (not a local copy) without its completion marker did not finish.
    download = {**entry, "source": "modelscope"}
    unfinished = weights_result(host, download, hostcollect.model(download,
                                                                  ".qwen-serve-complete"))
    assert not unfinished.passed and "no completion marker" in unfinished.evidence


def unit(**props: str) -> dict[str, Any]:
    base = {"LoadState": "loaded", "ActiveState": "active", "SubState": "running",
            "Result": "success", "NRestarts": "0", "ExecMainPID": "42"}
    text = "\n".join(f"{k}={v}" for k, v in {**base, **props}.items())
    return {"unit": "vllm@d.service", "argv": ["systemctl"], "rc": 0, "stdout": text,
            "stderr": ""}


def test_service_stopped_restart_loop_and_running() -> None:
    host = sandbox_plan().hosts[0]
    service = Service("d", "vllm@d.service", 8000, "0.0.0.0")
    sockets = {"sockets": [{"address": "0.0.0.0", "port": 8000}], "errors": []}
    ok, listening = service_results(host, service, unit(), sockets)
    assert ok.passed and listening.passed
    stopped, closed = service_results(host, service,
                                      unit(ActiveState="inactive", SubState="dead"),
                                      {"sockets": [], "errors": []})
    assert not stopped.passed and "journalctl -u vllm@d -n 200" in (stopped.next_step or "")
    assert not closed.passed and "nothing listens on TCP port 8000" in closed.evidence
    looping, _ = service_results(host, service, unit(NRestarts="7"), sockets)
    assert not looping.passed and "restarting in a loop" in looping.evidence


def test_listening_read_from_this_machines_proc() -> None:
    host = sandbox_plan().hosts[0]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        seen = hostcollect.listening()
        logs = "logs"
        assert listening_result(host, Service("d", "u", port, "127.0.0.1"), seen, logs).passed
        other = listening_result(host, Service("d", "u", port, "10.9.9.9"), seen, logs)
        assert not other.passed and "listening on 127.0.0.1 instead" in other.evidence


def test_a_dead_and_a_hanging_host_do_not_hold_up_the_others() -> None:
    plan = sandbox_plan()
    live, dead = plan.hosts
    hanging = live.model_copy(update={"name": "sandbox-3"})
    plan = plan.model_copy(update={"hosts": [live, dead, hanging]})

    def collect(host: HostPlan, timeout: float) -> dict[str, Any]:
        if host.name == dead.name:
            raise CollectError("connection refused", "start sshd on it")
        if host.name == hanging.name:
            time.sleep(30)
        return {"gpu": None, "envs": [], "models": [], "units": [],
                "listening": {"sockets": [], "errors": []}}

    started = time.monotonic()
    results = probe_hosts(plan, timeout=0.5, collect=collect)
    assert time.monotonic() - started < 15
    ssh = {r.host: r for r in results if r.probe == "ssh"}
    assert set(ssh) == {dead.name, hanging.name}
    assert "connection refused" in ssh[dead.name].evidence
    assert ssh[dead.name].next_step == "start sshd on it"
    assert "no answer within" in ssh[hanging.name].evidence
    assert any(r.host == live.name and r.probe == "service" for r in results)


def test_ecc_and_clock_event_reasons_from_real_xml() -> None:
    v100 = parse_xml_health((FIXTURES / "xml__8x-V100S-PCIE-32GB__460.73.01.txt").read_text())
    assert len(v100.gpus) == 8 and v100.error is None
    assert {(g.ecc_mode, g.ecc_volatile_uncorrected) for g in v100.gpus} == {("Enabled", 0)}
    a5000 = parse_xml_health((FIXTURES / "xml__2x-RTX-A5000__590.44.01.txt").read_text())
    assert [g.clock_event_reasons for g in a5000.gpus] == [["gpu_idle"], ["gpu_idle"]]
    assert a5000.gpus[0].ecc_mode == "Disabled"
    broken = parse_xml_health((FIXTURES / "error_driver_comm__unknown__460.x.txt").read_text())
    assert broken.error is not None and broken.error.kind == "driver_not_loaded"
