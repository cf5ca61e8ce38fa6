"""Fleet validation: every bad input is one ConfigError naming file, key and line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator.config import fleet as fleet_module
from orchestrator.config.fleet import load_fleet
from orchestrator.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
defaults:
  ssh_user: ubuntu
  profile: gpu
groups:
  gpu-cluster:
    hosts:
      gpu-01: {address: 10.0.0.11}
      gpu-02: {address: 10.0.0.12, ssh_port: 2222, profile: cpu}
deployments:
  - name: qwen7b
    model: Qwen/Qwen2.5-7B-Instruct
    engine: vllm
    hosts: gpu-cluster
    port: 8000
"""


def error_of(path: Path | None, inventory: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_fleet(path, inventory)
    return info.value


def test_example_fleet_written_by_init_is_valid() -> None:
    loaded = load_fleet(REPO / "templates" / "fleet.yml")
    assert loaded.group_names() == ["gpu-cluster"]
    assert [h.name for h in loaded.hosts_of("gpu-cluster")] == ["gpu-01", "gpu-02"]


def test_settings_resolve_from_defaults_to_group_to_host(write) -> None:
    loaded = load_fleet(write("fleet.yml", GOOD))
    one, two = loaded.hosts_of("gpu-cluster")
    assert (one.ssh_user, one.ssh_port, one.profile) == ("ubuntu", 22, "gpu")
    assert (two.ssh_port, two.profile) == (2222, "cpu")


@pytest.mark.parametrize(("text", "line", "key", "words"), [
    (GOOD.replace("{address: 10.0.0.11}", "{adress: 10.0.0.11}"), 7,
     "groups.gpu-cluster.hosts.gpu-01.adress", "did you mean 'address'"),
    (GOOD.replace("ssh_port: 2222", "ssh_port: twenty"), 8,
     "groups.gpu-cluster.hosts.gpu-02.ssh_port", "valid integer"),
    (GOOD.replace("engine: vllm", "engine: tgi"), 12, "deployments[0].engine",
     "'vllm' or 'ollama'"),
    (GOOD.replace("hosts: gpu-cluster\n", "hosts: nosuch\n"), 13, "deployments[0].hosts",
     "unknown host group 'nosuch'"),
    (GOOD.replace("  profile: gpu\n", "  profil: gpu\n"), 3, "defaults.profil", "unknown key"),
    (GOOD.replace("    port: 8000\n", ""), 10, "deployments[0].port", "required key is missing"),
    (GOOD + "  - {name: other, model: m, engine: vllm, hosts: gpu-cluster, port: 8000}\n", 15,
     "deployments[1].port", "port 8000 on host 'gpu-01' is already used by deployment 'qwen7b'"),
    (GOOD + "  - {name: qwen7b, model: m, engine: vllm, hosts: gpu-cluster, port: 8001}\n", 15,
     "deployments[1].name", "used twice"),
    (GOOD.replace("groups:\n", "groups:\n  all:\n    hosts: {x: {address: a}}\n"), 5, "groups.all",
     "reserved"),
    (GOOD.replace("ssh_user: ubuntu\n", "ssh_user: ubuntu\n  ssh_user: root\n"), 3,
     "defaults.ssh_user", "duplicate key"),
    (GOOD + "  - name: Bad_Name\n    model: m\n    engine: vllm\n    hosts: gpu-cluster\n"
            "    port: 9000\n", 15, "deployments[1].name", "pattern"),
    (GOOD.replace("    port: 8000\n", "    port: 8000\n    options: {extra_args: [--api-key=x]}\n"),
     15, "deployments[0].options.extra_args", "readable by every user"),
])
def test_bad_fleet_names_file_line_and_key(write, text, line, key, words) -> None:
    path = write("fleet.yml", text)
    err = error_of(path)
    assert (err.file, err.line, err.key) == (str(path), line, key)
    assert words in str(err)
    assert str(err).startswith(f"{path}:{line}: {key}: ")
    assert "\n" not in str(err)


def test_bad_yaml_names_line(write) -> None:
    err = error_of(write("fleet.yml", "groups:\n  g: [\n"))
    assert err.line == 3 and "invalid YAML" in str(err)


def test_missing_unreadable_and_empty_files(tmp_path: Path, write) -> None:
    assert "file not found" in str(error_of(tmp_path / "nope.yml"))
    assert "is a directory" in str(error_of(tmp_path))
    assert "orchestrate init" in str(error_of(write("empty.yml", "")))
    assert "expected a mapping" in str(error_of(write("list.yml", "- a\n")))


def test_unknown_group_lists_known_groups(write) -> None:
    loaded = load_fleet(write("fleet.yml", GOOD))
    with pytest.raises(ConfigError) as info:
        loaded.hosts_of("nosuch")
    assert info.value.exit_code == 2
    assert "unknown host group 'nosuch'" in str(info.value)
    assert "gpu-cluster" in str(info.value)


INVENTORY = """\
all:
  children:
    gpu:
      vars:
        ansible_python_interpreter: /usr/bin/python3
      hosts:
        node-a:
          ansible_host: 192.0.2.10
          ansible_user: ops
          ansible_port: 2200
        node-b:
          ansible_ssh_private_key_file: ~/.ssh/fleet
          nvidia_branch: "550"
"""


def test_ansible_inventory_becomes_groups(write) -> None:
    loaded = load_fleet(None, write("hosts.yml", INVENTORY))
    a, b = loaded.hosts_of("gpu")
    assert (a.address, a.ssh_user, a.ssh_port) == ("192.0.2.10", "ops", 2200)
    assert (b.address, b.ssh_key) == ("node-b", "~/.ssh/fleet")
    assert b.vars == {"ansible_python_interpreter": "/usr/bin/python3", "nvidia_branch": "550"}


def test_inventory_values_are_read_as_ansible_reads_them(write) -> None:
    """An INI inventory converted by ansible-inventory keeps its values as strings."""
    loaded = load_fleet(None, write("hosts.yml", INVENTORY.replace(
        "ansible_port: 2200", "ansible_port: '2200'\n          ansible_become: 'yes'")))
    node_a = loaded.hosts_of("gpu")[0]
    assert (node_a.ssh_port, node_a.become) == (2200, True)
    err = error_of(None, write("bad.yml", INVENTORY.replace("ansible_port: 2200",
                                                            "ansible_become: maybe")))
    assert err.key == "gpu.hosts.node-a.become" and "valid boolean" in str(err)


def test_inventory_plus_fleet_deployments(write) -> None:
    fleet = write("fleet.yml", "deployments:\n  - {name: d, model: m, engine: vllm, hosts: gpu, "
                               "port: 8000}\n")
    loaded = load_fleet(fleet, write("hosts.yml", INVENTORY))
    assert [d.name for d in loaded.fleet.deployments] == ["d"]


def test_inventory_group_clash_with_fleet(write) -> None:
    fleet = write("fleet.yml", "groups:\n  gpu:\n    hosts: {x: {address: a}}\n")
    err = error_of(fleet, write("hosts.yml", INVENTORY))
    assert err.line == 2 and "defined both here and in" in str(err)


def test_ini_inventory_is_refused_with_a_hint(write) -> None:
    err = error_of(None, write("hosts.ini", "[gpu]\nnode-a ansible_host=1.2.3.4\n"))
    assert "ansible-inventory" in str(err)


def test_relative_paths_are_relative_to_the_fleet_file(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    path = tmp_path / "site" / "fleet.yml"
    path.write_text(
        "defaults: {ssh_key: keys/fleet}\n"
        "groups:\n  g:\n    hosts:\n"
        "      a: {address: 1.2.3.4}\n      b: {address: 1.2.3.5, ssh_key: ~/.ssh/b}\n"
        "deployments:\n  - {name: d, model: m, engine: vllm, hosts: g, port: 8000, "
        "model_dir: models/tiny}\n")
    loaded = load_fleet(path)
    a, b = loaded.hosts_of("g")
    assert a.ssh_key == str(tmp_path / "site" / "keys" / "fleet")
    assert b.ssh_key == "~/.ssh/b"  # Ansible expands ~ itself
    assert loaded.fleet.deployments[0].model_dir == str(tmp_path / "site" / "models" / "tiny")


SPAN = GOOD.replace("    port: 8000\n", "    port: 8000\n    nodes: 2\n"
                    "    ray: {auth_token_var: vault_ray_token, network_interface: ens5}\n")


def test_deployment_across_hosts_is_valid(write) -> None:
    dep = load_fleet(write("fleet.yml", SPAN)).fleet.deployments[0]
    assert dep.nodes == 2 and dep.ray is not None and dep.ray.network_interface == "ens5"


@pytest.mark.parametrize(("text", "line", "key", "words"), [
    (SPAN.replace("nodes: 2", "nodes: 3"), 15, "deployments[0].nodes",
     "nodes: 3, but group 'gpu-cluster' has 2 host(s) (gpu-01, gpu-02)"),
    (SPAN.replace("engine: vllm", "engine: ollama"), 15, "deployments[0].nodes",
     "only vLLM spans hosts"),
    (GOOD.replace("    port: 8000\n", "    port: 8000\n    ray: {auth_token_var: t}\n"), 15,
     "deployments[0].ray", "only to a deployment that spans hosts"),
    (SPAN + "    options: {pipeline_parallel_size: 4}\n", 17,
     "deployments[0].options.pipeline_parallel_size", "one pipeline stage per host"),
    (SPAN.replace("network_interface: ens5", "network_interface: 'ens 5'"), 16,
     "deployments[0].ray.network_interface", "pattern"),
    (SPAN + "  - {name: small, model: m, engine: vllm, hosts: gpu-cluster, port: 8001}\n", 17,
     "deployments[1].hosts", "belongs to deployment 'qwen7b', which spans hosts"),
    (SPAN.replace("deployments:\n", "  other:\n    hosts: {o1: {address: a}, o2: {address: b}}\n"
                                    "deployments:\n")
     + "  - {name: second, model: m, engine: vllm, hosts: other, port: 8000, nodes: 2}\n", 19,
     "deployments[1].nodes", "one Ray cluster per fleet"),
])
def test_bad_deployment_across_hosts_names_file_line_and_key(write, text, line, key,
                                                             words) -> None:
    path = write("fleet.yml", text)
    err = error_of(path)
    assert (err.file, err.line, err.key) == (str(path), line, key)
    assert words in str(err)


def test_open_is_an_explicit_opt_in(write) -> None:
    closed = load_fleet(write("fleet.yml", GOOD)).fleet.deployments[0]
    assert closed.options.open is False
    opened = load_fleet(write("open.yml", GOOD.replace(
        "    port: 8000\n", "    port: 8000\n    options: {open: true}\n"))).fleet.deployments[0]
    assert opened.options.open is True


def _option(text: str) -> str:
    """GOOD with one line of options on its deployment (line 15)."""
    return GOOD.replace("    port: 8000\n", f"    port: 8000\n    options: {{{text}}}\n")


def _host(text: str) -> str:
    """GOOD with gpu-01's mapping (line 7) replaced."""
    return GOOD.replace("{address: 10.0.0.11}", f"{{{text}}}")


@pytest.mark.parametrize(("text", "line", "key", "words"), [
    # Strict types: YAML's true is not the port 1, nor a quoted number a number.
    (GOOD.replace("port: 8000", "port: true"), 14, "deployments[0].port", "valid integer"),
    (GOOD.replace("ssh_port: 2222", "ssh_port: '2222'"), 8,
     "groups.gpu-cluster.hosts.gpu-02.ssh_port", "valid integer"),
    (GOOD.replace("port: 8000", "port: 8000.0"), 14, "deployments[0].port", "valid integer"),
    (GOOD.replace("  profile: gpu\n", "  become: 'no'\n"), 3, "defaults.become",
     "valid boolean"),
    (_option("enforce_eager: 1"), 15, "deployments[0].options.enforce_eager", "valid boolean"),
    (_option("open: 'yes'"), 15, "deployments[0].options.open", "valid boolean"),
    (_option("gpu_memory_utilization: true"), 15,
     "deployments[0].options.gpu_memory_utilization", "valid number"),
    (GOOD.replace("    port: 8000\n", "    port: 8000\n    nodes: true\n"), 15,
     "deployments[0].nodes", "valid integer"),
    # Addresses are host names or IP addresses.
    (_host("address: ''"), 7, "groups.gpu-cluster.hosts.gpu-01.address", "host name or an IP"),
    (_host("address: 10.0.0.11 x"), 7, "groups.gpu-cluster.hosts.gpu-01.address",
     "no spaces"),
    (_host("address: '10.0.0.11;touch /tmp/x'"), 7,
     "groups.gpu-cluster.hosts.gpu-01.address", "host name or an IP"),
    (_host("address: -oProxyCommand=id"), 7, "groups.gpu-cluster.hosts.gpu-01.address",
     "host name or an IP"),
    (_option("bind_address: '127.0.0.1;touch X;#'"), 15,
     "deployments[0].options.bind_address", "expected an IP address to listen on"),
    (_option("bind_address: my-host"), 15, "deployments[0].options.bind_address",
     "or localhost"),
    # Paths on the host are absolute; nothing carries a newline or a control character.
    (GOOD.replace("  profile: gpu\n", "  python: {path: opt/venv}\n"), 3,
     "defaults.python.path", "absolute path"),
    (GOOD.replace("  profile: gpu\n", '  python: {path: "/opt/v\\nansible_become: false"}\n'),
     3, "defaults.python.path", "U+000A is not allowed"),
    (GOOD.replace("model: Qwen/Qwen2.5-7B-Instruct",
                  'model: "Qwen/Qwen2.5-7B-Instruct\\nansible_ssh_common_args: -oX"'), 11,
     "deployments[0].model", "U+000A is not allowed"),
    (GOOD.replace("    port: 8000\n", '    port: 8000\n    served_model_name: "q\\e[2Jx"\n'),
     15, "deployments[0].served_model_name", "U+001B is not allowed"),
    (GOOD.replace("    port: 8000\n", '    port: 8000\n    model_dir: "/m\\u2028x"\n'), 15,
     "deployments[0].model_dir", "U+2028 is not allowed"),
    (GOOD.replace("    port: 8000\n", '    port: 8000\n    revision: "v1\\rx"\n'), 15,
     "deployments[0].revision", "U+000D is not allowed"),
    (_option('extra_args: ["--max-num-seqs\\n8"]'), 15, "deployments[0].options.extra_args",
     "U+000A is not allowed"),
    (_option('env: {"A\\nB": x}'), 15, "deployments[0].options.env", "U+000A is not allowed"),
    (_option("gguf_file: \"a\\n.gguf\""), 15, "deployments[0].options.gguf_file",
     "U+000A is not allowed"),
    (GOOD.replace("  profile: gpu\n", "  pip: {find_links: wheels}\n"), 3,
     "defaults.pip.find_links", "pattern"),
    (GOOD.replace("  profile: gpu\n", "  pip: {index_url: 'pypi.example -i x'}\n"), 3,
     "defaults.pip.index_url", "pattern"),
    # The API key on vLLM's command line, in every spelling vLLM's parser takes.
    (_option("extra_args: [--api_key=x]"), 15, "deployments[0].options.extra_args",
     "readable by every user"),
    (_option("extra_args: [--api_key, x]"), 15, "deployments[0].options.extra_args",
     "readable by every user"),
    (_option("extra_args: [--API-KEY=x]"), 15, "deployments[0].options.extra_args",
     "readable by every user"),
    (_option("extra_args: [--api-k, x]"), 15, "deployments[0].options.extra_args",
     "readable by every user"),
])
def test_hostile_values_name_file_line_and_key(write, text, line, key, words) -> None:
    path = write("fleet.yml", text)
    err = error_of(path)
    assert (err.file, err.line, err.key) == (str(path), line, key)
    assert words in str(err)
    assert str(err).isprintable()


def test_addresses_bind_addresses_and_paths_that_are_valid(write) -> None:
    loaded = load_fleet(write("fleet.yml", GOOD.replace(
        "  profile: gpu\n", "  python: {path: '/opt/v;touch X;#'}\n").replace(
        "{address: 10.0.0.11}", "{address: 'fe80::1%eth0'}").replace(
        "{address: 10.0.0.12,", "{address: gpu-02.dc1.example.com.,") + (
        "    options: {bind_address: '::1', extra_args: [--api-server-count=2], "
        "env: {HF_HUB_OFFLINE: '1'}}\n")))
    one, two = loaded.hosts_of("gpu-cluster")
    assert (one.address, two.address) == ("fe80::1%eth0", "gpu-02.dc1.example.com.")
    assert loaded.fleet.deployments[0].options.bind_address == "::1"
    # A shell's characters in an absolute path are data: the render quotes every argument.
    assert one.python.path == "/opt/v;touch X;#"


def test_vars_pass_through_unchanged(write) -> None:
    """An operator's own Ansible variables may hold a multi-line value (a certificate)."""
    loaded = load_fleet(write("fleet.yml", GOOD.replace(
        "  profile: gpu\n", '  vars: {ca_pem: "-----BEGIN\\nx\\n-----END\\n"}\n')))
    assert loaded.hosts_of("gpu-cluster")[0].vars == {"ca_pem": "-----BEGIN\nx\n-----END\n"}


def test_hosts_are_resolved_once_per_group(write, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner asks for a group's hosts per host: each host is resolved once."""
    hosts = "".join(f"      h{i}: {{address: 10.1.0.{i}}}\n" for i in range(40))
    loaded = load_fleet(write("fleet.yml", f"groups:\n  g:\n    hosts:\n{hosts}"))
    calls: list[str] = []
    real = fleet_module._resolve
    monkeypatch.setattr(fleet_module, "_resolve",
                        lambda *args: calls.append(args[3]) or real(*args))
    for _ in range(40):
        assert len(loaded.hosts_of("g")) == 40
        assert len(loaded.hosts_of("all")) == 40
    assert sorted(calls) == sorted(f"h{i}" for i in range(40))
    assert loaded.hosts_of("g")[0] is loaded.hosts_of("all")[0]


def test_five_thousand_hosts_load_and_resolve_in_well_under_two_seconds(tmp_path: Path) -> None:
    """Once 15 s: every host's resolution dumped its whole group, and YAML was parsed twice."""
    lines = ["defaults: {ssh_user: ubuntu, gpu: {name: NVIDIA L4, count: 1}}",
             "groups:", "  gpu:", "    hosts:",
             *(f"      h{i}: {{address: 10.{i // 65536}.{i // 256 % 256}.{i % 256}}}"
               for i in range(5000)),
             "deployments:",
             "  - {name: d, model: Qwen/Qwen2.5-0.5B-Instruct, engine: vllm, hosts: gpu, "
             "port: 8000}"]
    path = tmp_path / "fleet.yml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    hosts = load_fleet(path).hosts_of("gpu")
    assert time.perf_counter() - start < 2.0  # about 0.3 s here
    assert len(hosts) == 5000 and hosts[-1].gpu.name == "NVIDIA L4"
