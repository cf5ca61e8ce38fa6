"""The built-in sandbox fleet: two local podman hosts in the CPU profile, as a fleet description.

`orchestrate up --hosts sandbox` with no fleet file of its own uses this; it is
the same kind of fleet an operator writes, so it goes through the same config,
plan, render, run and probe as a real one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from secrets import token_urlsafe
from typing import NamedTuple

import yaml
from ansible.parsing.vault import VaultLib, VaultSecret

from orchestrator.config.fleet import Fleet, LoadedFleet
from orchestrator.errors import MissingExtra
from orchestrator.knowledge.catalog import Knowledge
from orchestrator.knowledge.roles import role_defaults
from orchestrator.mirror.wheelhouse import stage_wheelhouse
from orchestrator.sandbox import hosts as sandbox
from orchestrator.sandbox import ollama_standin
from orchestrator.sandbox.ollama_standin_release import machine_arch, make_release

GROUP = "sandbox"
HOST_COUNT = 2
SSH_BASE_PORT = 2221
VLLM_PORT = 8000
DEPLOYMENT = "tiny-qwen2"
SERVED_MODEL = "tiny-qwen2"
# The second engine: one Ollama server per host, installed by the ollama role from a
# release archive. The real Ollama cannot be downloaded here, so that archive packs the
# Ollama STAND-IN (orchestrator/sandbox/ollama_standin.py): the real install path, but a server
# that answers Ollama's API with canned text and runs no model.
OLLAMA_PORT = 11434
OLLAMA_DEPLOYMENT = "qwen-ollama"
# A catalog model: the plan turns it into its Ollama tag (qwen2.5:0.5b), which the
# stand-in "pulls" as a placeholder (there is no registry to reach).
OLLAMA_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
STANDIN_NOTE = ("the sandbox's Ollama is the Ollama STAND-IN "
                "(orchestrator/sandbox/ollama_standin.py, installed from a release archive "
                "built here): the real Ollama binary cannot be downloaded on this machine, "
                "so it answers Ollama's API with canned text and runs no model")
# Inside each sandbox host: the control machine's wheelhouse, mounted read-only,
# stands in for the package mirror real hosts use.
WHEELHOUSE_MOUNT = "/srv/wheelhouse"
PYTHON_VERSION = "3.11"  # Debian 12's python3
# Fetch once, fan out: `up` stages the model into the sandbox's mirror and serves it on the
# control machine's loopback for the run; slirp4netns (allow_host_loopback) shows that
# loopback to each host as 10.0.2.2, so the hosts fetch from it like real hosts from a mirror.
# node_exporter (the monitoring stage) listens on every address inside each host, as the
# published port reaches the container on its network interface; only the control
# machine's 127.0.0.1 publishes it, where `orchestrate monitoring` points Prometheus.
NODE_EXPORTER_PORT = 9100
# node_exporter's default list of filesystem types it skips, less overlay: a container's /
# (which holds the weights here) is an overlay, and the weights' disk alert watches it.
NODE_EXPORTER_FS_TYPES = (
    "--collector.filesystem.fs-types-exclude=^(autofs|binfmt_misc|bpf|cgroup2?|configfs|"
    "debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|mqueue|nsfs|proc|procfs|pstore|"
    "rpc_pipefs|securityfs|selinuxfs|squashfs|sysfs|tracefs)$")
MIRROR_PORT = 18090
MIRROR_URL = f"http://{sandbox.HOST_LOOPBACK}:{MIRROR_PORT}"
API_KEY_VAR = "vault_sandbox_api_key"


def published_port(host_index: int, port: int) -> int:
    """Port on 127.0.0.1 where service `port` of sandbox host `host_index` (1-based) answers."""
    return port + sandbox.SERVICE_PORT_OFFSET + host_index - 1


def host_names() -> list[str]:
    return [f"sandbox-{i}" for i in range(1, HOST_COUNT + 1)]


def sandbox_model() -> Path:
    """The locally generated small Qwen2 model the sandbox serves (made once, cached)."""
    # Imported here: numpy, safetensors and tokenizers are the `sandbox` extra, and an
    # `orchestrate` installed without it must still run every other command.
    try:
        from orchestrator.sandbox.modelgen import generate_tiny_qwen2
    except ImportError as exc:
        raise MissingExtra(f"the sandbox's model generator needs the 'sandbox' extra "
                               f"({exc.name} is missing): pip install "
                               "'qwen-fleet-orchestrator[sandbox]'") from None
    return generate_tiny_qwen2(sandbox.cache_dir() / "models" / DEPLOYMENT)


class OllamaRelease(NamedTuple):
    """An Ollama release archive on the control machine, as the ollama role takes it."""

    archive: Path
    sha256: str
    arch: str


def sandbox_ollama_release() -> OllamaRelease:
    """The stand-in packed as the Ollama release archive for this machine's architecture
    (the sandbox hosts are containers on it). Rebuilt each time: it is reproducible, so
    its sha256 only changes with the stand-in's code."""
    arch = machine_arch()
    archive, sha256 = make_release(sandbox.cache_dir() / "ollama-standin",
                                   ollama_standin.VERSION, arch)
    return OllamaRelease(archive, sha256, arch)


def sandbox_wheelhouse(knowledge: Knowledge, log: Callable[[str], None]) -> Path:
    """Wheels for the CPU profile's torch and vLLM, for the sandbox hosts' Python (cached)."""
    profile = knowledge.compat.profiles["cpu"]
    dest = sandbox.cache_dir() / "wheelhouse"
    stage_wheelhouse(
        dest, [profile.torch_requirement, profile.vllm_requirement],
        python_version=PYTHON_VERSION,
        own_indexes=({profile.torch_requirement: profile.torch_index_url}
                     if profile.torch_index_url else {}),
        log=log)
    return dest


def sandbox_secrets(state_dir: Path) -> tuple[Path, Path]:
    """The sandbox's Vault-encrypted secrets file (its API key) and the vault password file,
    made once in state_dir, both 0600: the same path a real fleet's secrets take."""
    secrets_file, password_file = state_dir / "secrets.yml", state_dir / "vault-password"
    if secrets_file.exists() and password_file.exists():
        return secrets_file, password_file
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = token_urlsafe(32)
    plain = yaml.safe_dump({API_KEY_VAR: token_urlsafe(24)})
    encrypted = VaultLib([("default", VaultSecret(password.encode()))]).encrypt(plain)
    for path, content in ((password_file, password.encode() + b"\n"),
                          (secrets_file, encrypted)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(content)
    return secrets_file, password_file


def vllm_environment(index: int) -> dict[str, str]:
    """The vllm role's common environment, with the engine's worker bound to a core of its
    own for sandbox host `index` (1-based). vLLM's CPU build binds its worker to the
    machine's first core on every host ("auto" keeps the last one for the server); the
    sandbox hosts share this machine, so a serving host's worker starved the other's start
    on that core (seen: a restarted sandbox-1 stuck for 15 minutes while sandbox-2 served).
    """
    cores = sorted(os.sched_getaffinity(0))
    return {**role_defaults("vllm")["vllm_environment"],
            "VLLM_CPU_OMP_THREADS_BIND": str(cores[(index - 1) % len(cores)])}


def sandbox_fleet(ssh_key: Path, model_dir: Path, secrets_file: Path | None = None,
                  ollama_release: OllamaRelease | None = None,
                  mirror_dir: Path | None = None) -> LoadedFleet:
    """The fleet; with `ollama_release` (sandbox_ollama_release()) each host also serves
    the Ollama deployment; with `mirror_dir` the hosts take the model
    from the mirror there, which `up` stages from model_dir and serves for the run."""
    ports = [VLLM_PORT, *([OLLAMA_PORT] if ollama_release else []), NODE_EXPORTER_PORT]
    hosts = {
        name: {"address": "127.0.0.1", "ssh_port": SSH_BASE_PORT + i - 1,
               "port_map": {port: published_port(i, port) for port in ports},
               "vars": {"vllm_environment": vllm_environment(i)}}
        for i, name in enumerate(host_names(), start=1)
    }
    ollama_vars: dict[str, object] = {}
    ollama_deployments: list[dict[str, object]] = []
    if ollama_release:
        # The role's control-machine path: the archive is copied to each host and
        # installed only when its sha256 matches, as an operator's downloaded release is.
        ollama_vars = {"ollama_version": ollama_standin.VERSION,
                       "ollama_archive_src": str(ollama_release.archive),
                       "ollama_archive_sha256": {ollama_release.arch: ollama_release.sha256}}
        ollama_deployments = [{
            "name": OLLAMA_DEPLOYMENT,
            "model": OLLAMA_MODEL,
            "engine": "ollama",
            "hosts": GROUP,
            "port": OLLAMA_PORT,
            # Not Ollama's loopback default: a published port reaches the container on
            # its network interface, not on its loopback. Only 127.0.0.1 of the control
            # machine publishes it, so nothing outside this machine reaches it.
            "options": {"bind_address": "0.0.0.0", "open": True},
        }]
    fleet = Fleet.model_validate({
        "monitoring": {"node_exporter_listen": f"0.0.0.0:{NODE_EXPORTER_PORT}",
                       "scrape_interval": "5s"},
        "groups": {GROUP: {
            "ssh_user": "root",
            "ssh_key": str(ssh_key),
            "profile": "cpu",
            "pip": {"find_links": WHEELHOUSE_MOUNT, "no_index": True},
            # Sandbox hosts get new host keys whenever they are re-created.
            "vars": {"ansible_ssh_common_args":
                     "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                     "node_exporter_extra_args": [NODE_EXPORTER_FS_TYPES],
                     **ollama_vars},
            "hosts": hosts,
        }},
        "deployments": [{
            "name": DEPLOYMENT,
            "model": "orchestrate/tiny-qwen2",
            "model_dir": str(model_dir),
            "served_model_name": SERVED_MODEL,
            "engine": "vllm",
            "hosts": GROUP,
            "port": VLLM_PORT,
            # Without a secrets file open on purpose, as the Ollama deployment: only the
            # control machine's 127.0.0.1 publishes the containers' ports.
            "options": {"max_model_len": 1024, "kv_cache_space_gib": 1, "tool_calling": True,
                        **({} if secrets_file else {"open": True})},
            **({"api_key_var": API_KEY_VAR} if secrets_file else {}),
        }, *ollama_deployments],
        **({"secrets": str(secrets_file)} if secrets_file else {}),
        **({"mirror": {"url": MIRROR_URL, "dir": str(mirror_dir),
                       "listen": f"127.0.0.1:{MIRROR_PORT}"}} if mirror_dir else {}),
    })
    return LoadedFleet(fleet=fleet, source="(built-in sandbox fleet)")
