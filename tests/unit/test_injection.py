"""Fleet values reach Ansible and the hosts as data: never a template, never shell, never a
systemd specifier or variable; runs keep no environment and stop cleanly on Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from orchestrator.plan.planner import STAGES, HostPlan, Plan
from orchestrator.run.render import render
from orchestrator.run.runner import Progress, RunResult, failure_message, run_playbook

REPO = Path(__file__).resolve().parents[2]
LOCAL = {"ansible_host": "127.0.0.1", "ansible_connection": "local",
         "ansible_python_interpreter": sys.executable}


def local_plan(variables: dict[str, object], reasons: list[str] | None = None) -> Plan:
    host = HostPlan(name="local-1", group="test", profile="cpu", connection=LOCAL,
                    vars=variables, probes=[], reasons=reasons or [])
    return Plan(group="test", stages=list(STAGES), hosts=[host])


def playbook(tmp_path: Path, tasks: list[dict[str, object]]) -> str:
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump([{"name": "Under test", "hosts": "all",
                                     "gather_facts": False, "tasks": tasks}]))
    return str(path)


def test_a_lookup_in_a_fleet_value_never_runs_in_check_mode(tmp_path: Path) -> None:
    made = tmp_path / "made-by-the-fleet"
    hostile = "{{ lookup('pipe', 'touch " + str(made) + "') }}"
    plan = local_plan({"vllm_deployments": [{"name": "x", "args": ["--served-model-name", hostile],
                                             "api_key": "{{ planned_secret }}"}],
                       "planned_secret": "s3cret"})
    run = render(plan, tmp_path / "runs", "check", check=True)
    run = run.__class__(**{**vars(run), "playbook": playbook(tmp_path, [
        {"name": "Use the values", "ansible.builtin.assert": {"that": [
            "vllm_deployments[0]['args'][1] | length > 0",
            # The planned reference to a secret is still resolved.
            "vllm_deployments[0]['api_key'] == 's3cret'"]}},
        {"name": "Show the option", "ansible.builtin.debug": {
            "msg": "{{ vllm_deployments[0]['args'][1] }}"}}])})

    result = run_playbook(run, lambda _: None)

    assert not made.exists()
    assert result.ok, result.failures
    stdout = (run.artifacts / "ansible" / "stdout").read_text()
    assert "lookup(" in stdout and "made-by-the-fleet" in stdout  # the literal text


def test_a_newline_in_a_reason_cannot_leave_the_host_vars_comment(tmp_path: Path) -> None:
    plan = local_plan({"x": 1}, reasons=["model at /m\nansible_ssh_common_args: -o ProxyCommand=x"])
    run = render(plan, tmp_path, "comment")
    text = (run.inventory / "host_vars" / "local-1.yml").read_text()
    loaded = yaml.load(text, Loader=type("L", (yaml.SafeLoader,), {}))
    assert "ansible_ssh_common_args" not in (loaded or {})
    assert "#   - model at /m ansible_ssh_common_args: -o ProxyCommand=x" in text


def test_the_run_directory_is_the_operators_alone(tmp_path: Path) -> None:
    run = render(local_plan({"x": 1}), tmp_path, "private")
    for path in [run.path, *run.path.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{path}: {oct(mode)}"


def test_no_environment_in_the_artifacts_even_during_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPERATOR_CLOUD_TOKEN", "tok-do-not-keep")
    command = tmp_path / "runs" / "env" / "artifacts" / "ansible" / "command"
    run = render(local_plan({"x": 1}), tmp_path / "runs", "env")
    # Read while Ansible runs: a crash or kill at this point leaves the file as it is.
    run = run.__class__(**{**vars(run), "playbook": playbook(tmp_path, [
        {"name": "Read the saved command", "ansible.builtin.set_fact": {
            "saved": "{{ lookup('file', '" + str(command) + "') }}"}},
        {"name": "No operator environment in it", "ansible.builtin.assert": {
            "that": ["'tok-do-not-keep' not in saved", "'OPERATOR_CLOUD_TOKEN' not in saved"]}}])})

    result = run_playbook(run, lambda _: None)

    assert result.ok, result.failures
    assert "env" not in json.loads(command.read_text())


def test_a_vault_password_file_path_with_a_space(tmp_path: Path) -> None:
    folder = tmp_path / "my vault"
    folder.mkdir()
    (folder / "pass word").write_text("not-a-real-password\n")
    run = render(local_plan({"x": 1}), tmp_path / "runs", "vault",
                 vault_password_file=folder / "pass word")
    run = run.__class__(**{**vars(run), "playbook": playbook(tmp_path, [
        {"name": "Anything", "ansible.builtin.debug": {"msg": "ran"}}])})

    result = run_playbook(run, lambda _: None)

    assert result.ok and result.rc == 0, (result.status, result.failures)


def test_ctrl_c_cancels_once_and_a_second_one_is_not_swallowed() -> None:
    from orchestrator.run.runner import cancel_on_ctrl_c
    before = signal.getsignal(signal.SIGINT)
    with cancel_on_ctrl_c() as cancelled:
        assert not cancelled()
        os.kill(os.getpid(), signal.SIGINT)
        assert cancelled()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_ssh_never_waits_for_an_answer() -> None:
    from orchestrator.run.runner import environment
    args = environment()["ANSIBLE_SSH_ARGS"]
    assert "BatchMode=yes" in args and "ServerAliveCountMax" in args
    assert "ControlPersist" in args  # ansible.cfg's own options kept
    message = failure_message({"msg": "Failed to connect to the host via ssh: Host key "
                                      "verification failed.", "unreachable": True})
    assert "ssh-keyscan" in message and "known_hosts" in message


def test_systemd_never_expands_an_argument(tmp_path: Path) -> None:
    out = tmp_path / "x.conf"
    defaults = yaml.safe_load((REPO / "roles/vllm/defaults/main.yml").read_text())
    play = tmp_path / "render.yml"
    play.write_text(yaml.safe_dump([{
        "name": "Render", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": {**defaults, "vllm_env_path": "/opt/env", "item": {
            "name": "x", "args": ["--served-model-name", "a$HOME%h"]}},
        "tasks": [{"ansible.builtin.template": {
            "src": str(REPO / "roles/vllm/templates/deployment.conf.j2"), "dest": str(out),
            "mode": "0644"}}]}]))
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                           "localhost,", "-e", f"ansible_python_interpreter={sys.executable}",
                           str(play)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"--served-model-name" "a$$HOME%%h"' in out.read_text()


HOSTILE = "127.0.0.1;touch {marker};#"
SCRIPT_TASKS = [
    # (task file, the vars its script arguments read, the argument holding the fleet value)
    ("roles/ollama/tasks/service.yml",
     {"_ollama_url": "http://" + HOSTILE + ":11434", "ollama_ready_timeout": 60,
      "ollama_ready_interval": 2}, 2),
    ("roles/ray_cluster/tasks/service.yml",
     {"ray_cluster_env_path": "/opt/" + HOSTILE, "__ray_cluster_node_ip": "10.0.0.1",
      "ray_cluster_port": 6379, "ray_cluster_expected_nodes": 2,
      "ray_cluster_ready_timeout": 60, "ray_cluster_ready_interval": 2}, 1),
    ("roles/ray_cluster/tasks/verify.yml",
     {"ray_cluster_env_path": "/opt/" + HOSTILE, "__ray_cluster_node_ip": "10.0.0.1",
      "ray_cluster_port": 6379, "ray_cluster_expected_nodes": 2,
      "ray_cluster_ready_interval": 2}, 1),
]


@pytest.mark.parametrize(("tasks", "variables", "index"), SCRIPT_TASKS,
                         ids=[t[0] for t in SCRIPT_TASKS])
def test_a_fleet_value_in_script_arguments_never_reaches_a_shell(
        tmp_path: Path, tasks: str, variables: dict[str, object], index: int) -> None:
    marker = tmp_path / "ran-as-root"
    [script] = [t["ansible.builtin.script"] for t in yaml.safe_load((REPO / tasks).read_text())
                if "ansible.builtin.script" in t]
    out = tmp_path / "cmd.txt"
    play = tmp_path / "render.yml"
    values = {k: v.replace("{marker}", str(marker)) if isinstance(v, str) else v
              for k, v in variables.items()}
    # The arguments as Ansible renders them, then through a shell as the script module runs them.
    play.write_text(yaml.safe_dump([{
        "name": "Render", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars": values, "tasks": [{"ansible.builtin.copy": {
            "content": script["cmd"], "dest": str(out), "mode": "0600"}}]}]))
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                           "localhost,", "-e", f"ansible_python_interpreter={sys.executable}",
                           str(play)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    words = subprocess.run(["sh", "-c", "printf '%s\\n' " + out.read_text()], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert not marker.exists()
    assert HOSTILE.format(marker=marker) in words[index]


def test_ctrl_c_during_a_run_stops_ansible_and_nothing_after_it_runs(tmp_path: Path) -> None:
    from orchestrator.run.runner import Interrupted
    run = render(local_plan({"x": 1}), tmp_path / "runs", "interrupted")
    run = run.__class__(**{**vars(run), "playbook": playbook(tmp_path, [
        {"name": "Take long", "ansible.builtin.command": {"cmd": "sleep 60"},
         "changed_when": False}])})
    before = signal.getsignal(signal.SIGINT)

    def press_ctrl_c(progress: Progress) -> None:
        if progress.kind == "task":
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as caught:
        run_playbook(run, press_ctrl_c)

    assert caught.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_during_up_skips_the_probes_and_exits_130(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import contextmanager

    from orchestrator.config.fleet import load_fleet
    from orchestrator.run.runner import Interrupted
    from orchestrator.workflows import up as up_module
    from orchestrator.workflows.common import Events, Target
    fleet = tmp_path / "fleet.yml"
    fleet.write_text(yaml.safe_dump({
        "groups": {"g": {"profile": "cpu", "hosts": {"h": {"address": "127.0.0.1",
                                                          "ssh_port": 9}}}},
        "deployments": [{"name": "chat", "model": "Qwen/Qwen2.5-0.5B-Instruct",
                         "engine": "vllm", "hosts": "g", "port": 8000,
                         "options": {"open": True}}]}))
    probed: list[object] = []
    monkeypatch.setattr(up_module, "probe_all", lambda *a, **k: probed.append(a))

    @contextmanager
    def progress(hosts: list[str]) -> Iterator[Callable[[Progress], None]]:
        def press_ctrl_c(event: Progress) -> None:
            if event.kind == "play":
                os.kill(os.getpid(), signal.SIGINT)
        yield press_ctrl_c

    with pytest.raises(Interrupted) as caught:
        up_module.up(up_module.UpOptions(
            Target("g", builtin=load_fleet(fleet), state_dir=tmp_path / "state"),
            only=("preflight", "verify")), Events(progress=progress))

    assert caught.value.exit_code == 130
    assert probed == []


def test_an_unknown_host_key_fails_that_host_at_once_with_the_fix(tmp_path: Path) -> None:
    """Against a STAND-IN sshd (paramiko's server side on loopback, a host key nobody knows):
    ssh must not wait for a yes/no nobody types; the host fails, with how to fix it."""
    import socket
    import threading

    import paramiko

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    host_key = paramiko.ECDSAKey.generate()
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(sock)
            transport.add_server_key(host_key)
            transports.append(transport)
            # The client gives up during the key exchange: that ends this connection.
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                transport.start_server(server=paramiko.ServerInterface())

    threading.Thread(target=serve, daemon=True).start()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    host = HostPlan(name="new-host", group="test", profile="cpu", connection={
        "ansible_host": "127.0.0.1", "ansible_port": port, "ansible_user": "root",
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts} "
                                   "-o GlobalKnownHostsFile=/dev/null"},
        vars={}, probes=[], reasons=[])
    run = render(Plan(group="test", stages=list(STAGES), hosts=[host]), tmp_path / "runs", "hk")
    run = run.__class__(**{**vars(run), "playbook": playbook(tmp_path, [
        {"name": "Anything", "ansible.builtin.ping": {}}])})
    outcome: list[RunResult] = []
    worker = threading.Thread(target=lambda: outcome.append(run_playbook(run, lambda _: None)),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    listener.close()
    for transport in transports:
        transport.close()

    assert outcome, "ssh waited for an answer"
    [failure] = outcome[0].failures
    assert failure.host == "new-host" and failure.unreachable
    assert "ssh-keyscan" in failure.message and "known_hosts" in failure.message
