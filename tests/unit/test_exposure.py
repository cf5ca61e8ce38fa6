"""Closed by default (issue 15): what a deployment exposes, and what the operator reads.

vLLM reachable beyond loopback needs an API key or an explicit `open: true`, which the
plan table and the HTML report flag; text from models and fleet files is printed as text,
never as rich markup."""

from __future__ import annotations

import datetime as dt
import io
import re
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from orchestrator.config.fleet import load_fleet
from orchestrator.errors import PlanError
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.plan.planner import Plan, make_plan
from orchestrator.report.console import plan_table, probe_table
from orchestrator.report.htmlreport import render_report
from orchestrator.verify.httpprobe import ProbeReport, ProbeResult

REPO = Path(__file__).resolve().parents[2]

FLEET = """\
groups:
  g:
    profile: cpu
    hosts: {h: {address: 10.0.0.5}}
deployments:
  - name: chat
    model: Qwen/Qwen2.5-0.5B-Instruct
    engine: vllm
    hosts: g
    port: 8000
"""


def _plan(write, text: str) -> Plan:
    return make_plan(load_fleet(write("fleet.yml", text)), "g", load_knowledge(),
                     load_cuda_compat())


def _text(print_to) -> str:
    out = io.StringIO()
    print_to(Console(file=out, width=400, color_system=None))
    return out.getvalue()


def test_vllm_beyond_loopback_without_a_key_is_refused_naming_file_line_and_fixes(write):
    with pytest.raises(PlanError) as caught:
        _plan(write, FLEET)
    message = str(caught.value)
    assert re.match(r".*/fleet\.yml:6: deployments\[0\]: deployment 'chat' listens on "
                    r"0\.0\.0\.0 with no API key", message)
    assert "api_key_var" in message and "options.open: true" in message


def test_an_ollama_deployment_bound_beyond_loopback_needs_open_too(write):
    text = FLEET.replace("engine: vllm", "engine: ollama").replace(
        "port: 8000", "port: 11434\n    options: {bind_address: 0.0.0.0}")
    with pytest.raises(PlanError, match=r"fleet\.yml:6: .*'chat' listens on 0\.0\.0\.0 .*"
                                        r"bind it to loopback .*options\.open: true"):
        _plan(write, text)
    assert _plan(write, text.replace("0.0.0.0}", "0.0.0.0, open: true}")).hosts[0].probes[0].open


@pytest.mark.parametrize("extra", ["    api_key_var: vault_chat_key\n",
                                   "    options: {bind_address: 127.0.0.1}\n",
                                   "    options: {bind_address: '::1'}\n",
                                   "    options: {bind_address: localhost}\n"])
def test_a_key_or_loopback_plans_a_closed_deployment(write, extra: str) -> None:
    probe = _plan(write, FLEET + extra).hosts[0].probes[0]
    assert not probe.open


def test_open_true_is_planned_and_flagged_red_in_the_plan_table_and_the_report(write):
    plan = _plan(write, FLEET + "    options: {open: true}\n")
    assert plan.hosts[0].probes[0].open
    out = io.StringIO()
    plan_table(plan, Console(file=out, width=400, force_terminal=True, color_system="standard"))
    line = next(x for x in out.getvalue().splitlines() if "OPEN" in x)
    assert "\x1b[1;31mOPEN\x1b[0m" in line and "chat: no API key" in line
    html = render_report(command="plan", run_id="r", plan=plan, probes=None, bench=None,
                         now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert '<td class="fail">OPEN: no API key' in html
    closed = _plan(write, FLEET + "    api_key_var: k\n")
    assert "OPEN" not in _text(lambda c: plan_table(closed, c))


def test_inits_template_fleet_is_closed_with_a_vault_key() -> None:
    text = (REPO / "templates" / "fleet.yml").read_text(encoding="utf-8")
    assert "openssl rand -hex 32" in text and "ansible-vault create" in text
    loaded = load_fleet(REPO / "templates" / "fleet.yml")
    assert loaded.fleet.secrets and loaded.fleet.secrets.endswith("secrets.vault.yml")
    plan = make_plan(loaded, "gpu-cluster", load_knowledge(), load_cuda_compat())
    vllm = [t for h in plan.hosts for t in h.probes if t.engine == "vllm"]
    assert vllm and all(t.api_key_var and not t.open for t in vllm)
    assert all(t.loopback_only for h in plan.hosts for t in h.probes if t.engine == "ollama")


def test_model_answers_and_fleet_text_are_printed_as_text_not_markup(write) -> None:
    # A chat template's closing tag in a probe's evidence made rich raise MarkupError.
    report = ProbeReport(group="g[/x]", results=[
        ProbeResult(host="h[/b]", deployment="chat[/i]", probe="chat", passed=False,
                    evidence="answered '[/INST] [bold]hi'", next_step="see [/x]")])
    printed = _text(lambda c: probe_table(report, c))
    assert "answered '[/INST] [bold]hi'" in printed and "next: see [/x]" in printed
    assert "probes failed on: h[/b]" in printed
    plan = _plan(write, FLEET + "    api_key_var: k\n"
                 "    options: {extra_args: ['--chat-template-content-format=[/x]']}\n")
    assert "--chat-template-content-format=[/x]" in _text(lambda c: plan_table(plan, c))


def test_pip_conf_which_may_hold_index_credentials_is_root_only() -> None:
    """Checked on a host by molecule/python_env (verify.yml); here the task as written."""
    tasks = yaml.safe_load((REPO / "roles" / "python_env" / "tasks" / "main.yml")
                           .read_text(encoding="utf-8"))
    [task] = [t for t in tasks if t.get("ansible.builtin.template", {}).get("src")
              == "pip.conf.j2"]
    assert task["ansible.builtin.template"]["mode"] == "0600"
    assert task["ansible.builtin.template"]["owner"] == "root"
