"""The real `orchestrate` command on bad input: exit 2, one line, nothing run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")
REPO = Path(__file__).resolve().parents[2]


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ORCHESTRATE, *args], cwd=cwd, capture_output=True, text=True,
                          check=False)


def test_typo_in_fleet_file(tmp_path: Path) -> None:
    (tmp_path / "fleet.yml").write_text("groups:\n  g:\n    hosts:\n      h: {adress: 1.2.3.4}\n")
    proc = run(tmp_path, "up", "--hosts", "g")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "fleet.yml:4: groups.g.hosts.h.adress: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / ".orchestrate").exists()  # nothing rendered, nothing run


def test_unknown_group(tmp_path: Path) -> None:
    proc = run(tmp_path, "plan", "--hosts", "nosuch", "-f", str(REPO / "templates/fleet.yml"))
    assert proc.returncode == 2
    assert "unknown host group 'nosuch' (groups in" in proc.stderr
    assert "gpu-cluster" in proc.stderr


def test_no_fleet_file_says_what_to_do(tmp_path: Path) -> None:
    proc = run(tmp_path, "plan", "--hosts", "gpu-cluster")
    assert proc.returncode == 2
    assert "orchestrate init" in proc.stderr


def test_unknown_stage(tmp_path: Path) -> None:
    proc = run(tmp_path, "plan", "--hosts", "gpu-cluster", "-f",
               str(REPO / "templates/fleet.yml"), "--only", "drivrs")
    assert proc.returncode == 2 and "unknown stage 'drivrs'" in proc.stderr
    assert not (tmp_path / ".orchestrate").exists()  # refused before any host was reached


def test_init_then_plan_json(tmp_path: Path) -> None:
    assert run(tmp_path, "init").returncode == 0
    assert run(tmp_path, "init").returncode == 2  # never overwrites silently
    # The example fleet's addresses are placeholders: plan from its declarations.
    proc = run(tmp_path, "plan", "--hosts", "gpu-cluster", "--json", "--no-gather")
    assert proc.returncode == 0, proc.stderr
    assert '"vllm_requirement": "vllm==0.32.0"' in proc.stdout


def test_down_of_real_hosts_asks_first_and_needs_their_fleet(tmp_path: Path) -> None:
    # No terminal to ask on: refused before anything runs.
    proc = subprocess.run([ORCHESTRATE, "down", "--hosts", "gpu-cluster"], cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "pass --yes" in proc.stderr
    proc = run(tmp_path, "down", "--hosts", "gpu-cluster", "--yes")
    assert proc.returncode == 2 and "no fleet file here" in proc.stderr


FIXTURES = REPO / "tests" / "data" / "nvidia-smi"


def test_facts_parse_json_of_a_healthy_host(tmp_path: Path) -> None:
    proc = run(tmp_path, "facts", "parse", str(FIXTURES / "table__A10__550.127.05.txt"), "--json")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert (facts["driver_version"], facts["cuda_version"], facts["error"]) == (
        "550.127.05", "12.4", None)
    assert facts["gpus"][0]["name"] == "NVIDIA A10"


def test_facts_parse_of_a_broken_driver_exits_1_with_next_step(tmp_path: Path) -> None:
    path = FIXTURES / "error_driver_comm__unknown__460.x.txt"
    proc = run(tmp_path, "facts", "parse", str(path), "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["kind"] == "driver_not_loaded"


def test_compat_json_for_an_h100_on_r590(tmp_path: Path) -> None:
    proc = run(tmp_path, "compat", "--driver", "590.48.01", "--gpu", "NVIDIA H100 80GB HBM3",
               "--json")
    assert proc.returncode == 0, proc.stderr
    decision = json.loads(proc.stdout)
    assert decision["max_cuda"] == "13.1"
    assert decision["torch"]["cuda_build"] == "cu130"
    assert decision["torch"]["index_url"] == "https://download.pytorch.org/whl/cu130"
    assert decision["vllm"] == {"version": "0.32.0"}


@pytest.mark.parametrize(("driver", "max_cuda", "vllm", "torch", "build"), [
    ("535.104.05", "12.2", "0.7.3", "2.5.1", "cu121"),
    ("550.54.14", "12.4", "0.8.5.post1", "2.6.0", "cu124"),
])
def test_compat_json_falls_back_to_the_newest_vllm_the_driver_runs(
        tmp_path: Path, driver: str, max_cuda: str, vllm: str, torch: str, build: str) -> None:
    proc = run(tmp_path, "compat", "--driver", driver, "--gpu", "Tesla T4", "--json")
    assert proc.returncode == 0, proc.stderr
    decision = json.loads(proc.stdout)
    assert set(decision) == {"driver", "gpu", "compute_capability", "max_cuda", "torch",
                             "vllm", "reasons", "refused"}
    assert (decision["driver"], decision["max_cuda"]) == (driver, max_cuda)
    assert (decision["gpu"], decision["compute_capability"], decision["refused"]) == (
        "Tesla T4", "7.5", None)
    assert decision["torch"] == {"version": torch, "cuda_build": build,
                                 "cuda": decision["torch"]["cuda"],
                                 "index_url": f"https://download.pytorch.org/whl/{build}",
                                 "min_driver": decision["torch"]["min_driver"]}
    assert decision["vllm"] == {"version": vllm}
    assert ("not vLLM 0.32.0 (torch 2.13.0, built for cu130): needs driver >= 580.65.06 (R580)"
            in decision["reasons"])


def test_compat_refuses_a_driver_too_old_for_every_vllm(tmp_path: Path) -> None:
    """The refusal is one line on stderr and, with --json, the same keys as an answer with
    `refused` saying why."""
    proc = run(tmp_path, "compat", "--driver", "470.82.01", "--gpu", "Tesla T4", "--json")
    assert proc.returncode == 2
    refusal = json.loads(proc.stdout)
    assert (refusal["torch"], refusal["vllm"], refusal["max_cuda"]) == (None, None, None)
    assert refusal["driver"] == "470.82.01" and refusal["compute_capability"] == "7.5"
    for said in (refusal["refused"], " ".join(proc.stderr.split())):
        assert "no supported combination for NVIDIA driver 470.82.01 (CUDA <= 11.4)" in said
        assert "install the R530 driver branch or newer" in said
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    plain = run(tmp_path, "compat", "--driver", "470.82.01", "--gpu", "Tesla T4")
    assert (plain.returncode, plain.stdout) == (2, "")


def test_compat_unknown_gpu_name(tmp_path: Path) -> None:
    proc = run(tmp_path, "compat", "--driver", "590.48.01", "--gpu", "Voodoo 5")
    assert proc.returncode == 2 and "--compute-capability" in proc.stderr
    as_json = run(tmp_path, "compat", "--driver", "590.48.01", "--gpu", "Voodoo 5", "--json")
    assert as_json.returncode == 2
    assert "GPU 'Voodoo 5' is not in data/gpus.yml" in json.loads(as_json.stdout)["refused"]


def test_fit_7b_on_one_a10(tmp_path: Path) -> None:
    proc = run(tmp_path, "fit", "--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu", "NVIDIA A10",
               "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["fits"], result["tensor_parallel"], result["dtype"]) == (True, 1, "bfloat16")
    assert result["max_model_len"] == 32768


def test_fit_72b_on_one_h100_refuses_and_suggests(tmp_path: Path) -> None:
    proc = run(tmp_path, "fit", "--model", "Qwen/Qwen2.5-72B-Instruct", "--gpu",
               "NVIDIA H100 80GB HBM3", "--json")
    assert proc.returncode == 2
    result = json.loads(proc.stdout)
    assert not result["fits"] and result["refused"] is None
    assert any("4x" in s for s in result["suggestions"])
    assert any("AWQ" in s for s in result["suggestions"])


SMI = REPO / "tests" / "data" / "nvidia-smi"


def test_fit_takes_gpu_count_and_memory_from_saved_facts(tmp_path: Path) -> None:
    # This A100-SXM4-40GB reports 40960 MiB; data/gpus.yml's A100 row holds 40536.
    facts = str(SMI / "table__A100-SXM4-40GB__570.124.06.txt")
    proc = run(tmp_path, "fit", "--model", "Qwen/Qwen2.5-14B-Instruct", "--facts", facts,
               "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["gpu"], result["count"], result["gpu_memory_mib"]) == (
        "NVIDIA A100-SXM4-40GB", 1, 40960)
    assert result["reasons"][0] == (f"1x NVIDIA A100-SXM4-40GB: compute capability 8.0, "
                                    f"40960 MiB each (found in {facts})")
    table = run(tmp_path, "fit", "--model", "Qwen/Qwen2.5-14B-Instruct", "--gpu",
                "NVIDIA A100-SXM4-40GB", "--json")
    assert json.loads(table.stdout)["gpu_memory_mib"] == 40536
    assert json.loads(table.stdout)["kv_cache_tokens"] < result["kv_cache_tokens"]
    # The count in the file wins over --count: eight V100S (below the pinned vLLM's 7.5).
    proc = run(tmp_path, "fit", "--model", "Qwen/Qwen2.5-7B-Instruct", "--count", "2",
               "--facts", str(SMI / "xml__8x-V100S-PCIE-32GB__460.73.01.txt"), "--json")
    assert proc.returncode == 2
    result = json.loads(proc.stdout)
    assert (result["gpu"], result["count"], result["gpu_memory_mib"]) == (
        "Tesla V100S-PCIE-32GB", 8, 32510)


def test_fit_refuses_a_gpu_that_is_not_the_one_in_the_facts(tmp_path: Path) -> None:
    facts = str(SMI / "table__A100-SXM4-40GB__570.124.06.txt")
    proc = run(tmp_path, "fit", "--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu", "NVIDIA A10",
               "--facts", facts)
    assert proc.returncode == 2
    assert "'NVIDIA A10'" in proc.stderr and "'NVIDIA A100-SXM4-40GB'" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    (tmp_path / "a100.txt").write_bytes(Path(facts).read_bytes())
    same = run(tmp_path, "fit", "--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu", "A100",
               "--facts", "a100.txt")
    assert same.returncode == 0, same.stderr
    assert "on 1x NVIDIA A100-SXM4-40GB (found in a100.txt): fits" in same.stdout


def test_fit_with_measured_memory(tmp_path: Path) -> None:
    proc = run(tmp_path, "fit", "--model", "Qwen/Qwen2.5-7B-Instruct", "--gpu", "NVIDIA A10",
               "--memory-mib", "22000", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["gpu_memory_mib"] == 22000
    assert result["reasons"][0].endswith("22000 MiB each (measured on the host)")
    both = run(tmp_path, "fit", "--model", "Qwen/Qwen2.5-7B-Instruct", "--memory-mib", "22000",
               "--facts", str(SMI / "table__A10__550.127.05.txt"))
    assert both.returncode == 2 and "not both" in both.stderr
    neither = run(tmp_path, "fit", "--model", "Qwen/Qwen2.5-7B-Instruct")
    assert neither.returncode == 2 and "give --gpu, or --facts" in neither.stderr


def test_fit_unknown_model_is_one_line(tmp_path: Path) -> None:
    proc = run(tmp_path, "fit", "--model", "Qwen/Qwen2.5-4B-Instruct", "--gpu", "Tesla T4")
    assert proc.returncode == 2 and "not in the catalog" in proc.stderr
    assert proc.stdout == "" and proc.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("args", [
    ["--model", "Qwen/Qwen2.5-4B-Instruct", "--gpu", "Tesla T4"],
    ["--model", "Qwen/Qwen2.5-7B-Instruct"],
    ["--model", "Qwen/Qwen2.5-7B-Instruct", "--facts", "missing.txt"],
    ["--model", "Qwen/Qwen2.5-7B-Instruct", "--facts",
     str(SMI / "error_driver_comm__unknown__460.x.txt")],
])
def test_fit_json_refusals_print_json_with_the_reason(tmp_path: Path, args: list[str]) -> None:
    proc = run(tmp_path, "fit", *args, "--json")
    assert proc.returncode == 2
    refusal = json.loads(proc.stdout)
    assert refusal["fits"] is False and refusal["model"] == args[1]
    assert refusal["refused"] and refusal["refused"] in " ".join(proc.stderr.split())


def test_plan_table_for_an_inventory_without_deployments(tmp_path: Path) -> None:
    proc = run(tmp_path, "plan", "--hosts", "gpu_cluster", "--no-gather", "-i",
               str(REPO / "inventory/gpu-cluster/hosts.yml"))
    assert proc.returncode == 0, proc.stderr
    assert "gpu-01" in proc.stdout and "Traceback" not in proc.stderr


SECRET_FLEET = """\
secrets: secrets.yml
groups:
  g:
    profile: cpu
    hosts: {h: {address: 127.0.0.1}}
deployments:
  - name: chat
    model: Qwen/Qwen2.5-0.5B-Instruct
    engine: vllm
    hosts: g
    port: 9
    api_key_var: vault_chat_key
"""


def _encrypted_fleet(tmp_path: Path) -> Path:
    from ansible.parsing.vault import VaultLib, VaultSecret

    (tmp_path / "fleet.yml").write_text(SECRET_FLEET)
    (tmp_path / "secrets.yml").write_bytes(
        VaultLib([("default", VaultSecret(b"right"))]).encrypt("vault_chat_key: s3cret-key\n"))
    (tmp_path / "pw").write_text("right\n")
    (tmp_path / "wrong-pw").write_text("wrong\n")
    return tmp_path


def test_probe_without_the_vault_password_stops_before_probing(tmp_path: Path) -> None:
    _encrypted_fleet(tmp_path)
    proc = run(tmp_path, "probe", "--hosts", "g", "--no-ssh")
    assert proc.returncode == 2, proc.stderr
    assert "secrets.yml" in proc.stderr and "--vault-password-file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_vault_password_names_the_file_not_the_content(tmp_path: Path) -> None:
    _encrypted_fleet(tmp_path)
    proc = run(tmp_path, "up", "--hosts", "g", "--vault-password-file", "wrong-pw")
    assert proc.returncode == 2, proc.stderr
    assert "secrets.yml" in proc.stderr and "wrong-pw" in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout
    assert not (tmp_path / ".orchestrate").exists()  # nothing rendered, nothing run


def test_probe_takes_the_vault_password_file_from_ansibles_variable(tmp_path: Path) -> None:
    """ANSIBLE_VAULT_PASSWORD_FILE opens the secrets file: the probes run (and fail on the
    closed port), and the key is never printed."""
    _encrypted_fleet(tmp_path)
    env_run = subprocess.run(
        [ORCHESTRATE, "probe", "--hosts", "g", "--no-ssh", "--json"], cwd=tmp_path,
        capture_output=True, text=True, check=False,
        env={**os.environ, "ANSIBLE_VAULT_PASSWORD_FILE": str(tmp_path / "pw")})
    assert env_run.returncode == 1, env_run.stderr  # nothing listens on port 9
    results = json.loads(env_run.stdout)["results"]
    assert results and all(r["host"] == "h" for r in results)
    assert "s3cret" not in env_run.stdout + env_run.stderr


def test_plan_shows_the_gpu_memory_split_between_ollama_and_vllm(tmp_path: Path) -> None:
    # The example fleet puts qwen7b (vLLM) and qwen3b-ollama on the same A10: the table
    # shows Ollama's share, the vLLM flag it leaves, and why.
    proc = subprocess.run([ORCHESTRATE, "plan", "--hosts", "gpu-cluster", "--no-gather", "-f",
                           str(REPO / "templates/fleet.yml")], cwd=tmp_path,
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    split = ("GPU memory split on 1x NVIDIA A10 (22.49 GiB): ollama qwen3b-ollama ~3.01 GiB, "
             "vLLM qwen7b gpu_memory_utilization 0.77, 10% left free")
    assert proc.stdout.count(split) == 2  # both hosts of the group
    assert proc.stdout.count("--gpu-memory-utilization 0.77") == 2
    assert proc.stdout.count("qwen3b-ollama: ollama qwen2.5:3b on 127.0.0.1:11434") == 2
