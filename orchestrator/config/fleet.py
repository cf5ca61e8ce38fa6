"""The fleet description: typed, validated, with errors that name file, key and line.

A fleet is host groups (how to reach each host and how to provision it) plus
deployments (which model, on which engine, on which group, on which port).
Settings resolve from `defaults` to the group to the host, the most specific
winning, as Ansible's group_vars and host_vars do.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from ansible.module_utils.parsing.convert_bool import boolean
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from orchestrator.config.yamlsource import YamlDocument, dotted, load_yaml
from orchestrator.errors import ConfigError

HostName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=253)]
GroupName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=64)]
# A deployment name becomes a systemd instance name (vllm@NAME) and a directory.
DeploymentName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=63)]
Port = Annotated[int, Field(ge=1, le=65535)]

RESERVED_GROUPS = {"all", "ungrouped"}

# A host name (DNS labels; a leading '-' would read as an ssh option) or an IP address.
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")


def _address(value: str) -> str:
    if not _HOSTNAME.fullmatch(value):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("expected a host name or an IP address (letters, digits, '.', "
                             "'-', '_'; no spaces)") from None
    return value


def _bind_address(value: str) -> str:
    if value != "localhost":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("expected an IP address to listen on (127.0.0.1, 0.0.0.0, ::1, "
                             "a host's own address) or localhost") from None
    return value


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("expected an absolute path on the host (starting with /)")
    return value


Address = Annotated[str, AfterValidator(_address)]
BindAddress = Annotated[str, AfterValidator(_bind_address)]
HostPath = Annotated[str, AfterValidator(_absolute_path)]
Url = Annotated[str, Field(pattern=r"^(https?|file)://\S+$")]
# pip's --find-links on the host: a directory there, or a URL.
Links = Annotated[str, Field(pattern=r"^(/|(https?|file)://)\S*$")]


def _printable(value: Any) -> None:
    """Refuse a control character anywhere in `value` (strings, list items, mapping keys)."""
    if isinstance(value, str):
        if not value.isprintable():
            char = next(c for c in value if not c.isprintable())
            raise ValueError(f"character U+{ord(char):04X} is not allowed (newlines and other "
                             "control or invisible characters would reach unit files, "
                             "host_vars and command lines)")
    elif isinstance(value, list):
        for item in value:
            _printable(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _printable(key)
            _printable(item)


class Strict(BaseModel):
    # strict: YAML's `true` is not the port 1, nor "8000" a number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @field_validator("*")
    @classmethod
    def _no_control_characters(cls, value: Any, info: ValidationInfo) -> Any:
        # `vars` are the operator's own Ansible variables, passed through as they are.
        if info.field_name != "vars":
            _printable(value)
        return value


class PythonSettings(Strict):
    """The Python environment vLLM runs in."""

    manager: Literal["venv", "conda"] | None = None
    version: Annotated[str, Field(pattern=r"^3\.\d+$")] | None = None
    # The environment's path; with per_deployment, the directory holding one per deployment.
    path: HostPath | None = None
    # One environment per deployment (<path>/<deployment>), so that deployments upgrade
    # vLLM independently; default: one environment per host, shared.
    per_deployment: bool | None = None
    conda_installer_url: Url | None = None


class PipSettings(Strict):
    """Where hosts take Python packages from: the public index, a mirror, or a wheelhouse."""

    index_url: Url | None = None
    extra_index_urls: list[Url] | None = None
    find_links: Links | None = None
    no_index: bool | None = None


class GpuSettings(Strict):
    """The GPUs of a host, as nvidia-smi names them, for fit planning before it is reached."""

    name: str | None = None
    count: Annotated[int, Field(ge=1)] | None = None
    # The host's NVIDIA driver version when known ("535.104.05"): the plan then picks the
    # vLLM release and torch build that driver runs (orchestrator/knowledge/compat.py decide()).
    driver: str | None = None

    @field_validator("driver", mode="before")
    @classmethod
    def _driver_version(cls, value: Any) -> Any:
        # A two-part version (570.26) is a YAML float, and 570.10 would lose its zero.
        if value is not None and not (isinstance(value, str)
                                      and re.fullmatch(r"[0-9]{3,4}(\.[0-9]{1,4}){1,2}", value)):
            raise ValueError('expected an NVIDIA driver version as a quoted string, e.g. '
                             '"535.104.05" (nvidia-smi --query-gpu=driver_version '
                             '--format=csv,noheader)')
        return value


class DriverSettings(Strict):
    """Whether the toolkit installs the NVIDIA driver (role nvidia_driver) on GPU hosts;
    by default the driver is the host owners' and the drivers stage only checks it."""

    manage: bool | None = None
    # Driver branch ("580"), whose vLLM and torch build the plan then picks; default: the
    # lowest packaged branch that runs the pinned vLLM's build (never older than gpu.driver).
    branch: str | None = None
    # distro: the distribution's packages; cuda: NVIDIA's CUDA repository (role default:
    # distro on Debian and Ubuntu, cuda on RHEL/Rocky).
    source: Literal["distro", "cuda"] | None = None
    # NVIDIA's open kernel modules; default: chosen from the GPU (gpu.name): open on
    # Blackwell and Grace Hopper, proprietary before Turing, else NVIDIA's default (open
    # from R560). Refused where the GPU cannot run the flavour set.
    open_kernel_modules: bool | None = None
    # NVSwitch systems (HGX/DGX): Fabric Manager at the driver's exact version.
    fabric_manager: bool | None = None
    # The NVLink Subnet Manager (nvlsm) of fourth-generation NVSwitch systems; default:
    # with fabric_manager on Blackwell data-centre GPUs (compute capability 10.x).
    nvlink_subnet_manager: bool | None = None

    @field_validator("branch", mode="before")
    @classmethod
    def _branch_number(cls, value: Any) -> Any:
        # `branch: 580` is how an operator writes it; YAML reads that as a number.
        text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
        if value is not None and not re.fullmatch(r"[0-9]{3,4}", text):
            raise ValueError('expected a driver branch, the first number of a driver version '
                             '(580 for 580.95.05)')
        return text if value is not None else None


class HostSettings(Strict):
    """Settings that `defaults`, a group or a host may set; the most specific wins."""

    ssh_user: str | None = None
    ssh_key: str | None = None
    ssh_port: Port | None = None
    become: bool | None = None
    profile: Literal["gpu", "cpu"] | None = Field(
        default=None, description="gpu: NVIDIA driver + CUDA torch; cpu: CPU builds (sandbox)")
    python: PythonSettings | None = None
    pip: PipSettings | None = None
    gpu: GpuSettings | None = None
    driver: DriverSettings | None = None
    vars: dict[str, Any] | None = Field(
        default=None, description="extra Ansible variables, passed through unchanged")


# A number of hosts (2) or a share of a group's hosts ("25%", rounded down, at least one).
_HOST_SHARE = re.compile(r"([1-9][0-9]?|100)%")


class RolloutSettings(Strict):
    """How the services stage rolls a change across hosts (`defaults`, a group or a
    deployment; the most specific wins, key by key): batch after batch, each behind a
    health gate, the first failed batch stopping the rollout (README, Rolling changes)."""

    # Hosts changed at once. Default: one host at a time in a group of two or more.
    batch: int | str | None = None
    # The most hosts out of service at once: batches are made no larger. Default: the batch.
    max_unavailable: int | str | None = None
    # After each batch its deployments must answer /health, /v1/models and a chat (vLLM),
    # /api/version and /api/tags (Ollama) before the next starts (roles/health_gate).
    health_gate: bool | None = None
    # Seconds a host's gate waits for its deployments to answer.
    health_gate_timeout: Annotated[int, Field(ge=10, le=86400)] | None = None

    @field_validator("batch", "max_unavailable", mode="before")
    @classmethod
    def _host_count(cls, value: Any) -> Any:
        if value is None or (type(value) is int and value >= 1) or (
                isinstance(value, str) and _HOST_SHARE.fullmatch(value)):
            return value
        raise ValueError('expected a number of hosts (1 or more) or a share of them as a '
                         'percentage from 1% to 100% ("25%")')


class Defaults(HostSettings):
    rollout: RolloutSettings | None = None


class Host(HostSettings):
    address: Address
    port_map: dict[Port, Port] | None = Field(
        default=None,
        description="service port on the host -> port reachable on `address` (NAT, sandbox)")


class Group(HostSettings):
    hosts: dict[HostName, Host] = Field(min_length=1)
    rollout: RolloutSettings | None = None


class EngineOptions(Strict):
    max_model_len: Annotated[int, Field(ge=16)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    tensor_parallel_size: Annotated[int, Field(ge=1)] | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    enforce_eager: bool | None = None
    pipeline_parallel_size: Annotated[int, Field(ge=1)] | None = None
    # Forces vLLM's quantization method; by default vLLM reads it from the model's config
    # (and picks the faster Marlin kernels for AWQ/GPTQ where the GPU has them).
    quantization: Literal["awq", "awq_marlin", "gptq", "gptq_marlin", "fp8"] | None = None
    # Qwen2.5's tool calls are Hermes-style <tool_call> JSON (vLLM's docs for Qwen).
    tool_calling: bool | None = None
    tool_call_parser: str = "hermes"
    # vLLM's own default applies when unset.
    prefix_caching: bool | None = None
    # Where the server listens. Default: vLLM on every address, which the plan allows only
    # with an API key (api_key_var) or open: true; Ollama, which has no authentication, on
    # loopback only (its HTTP probes are then skipped; the services stage checks it).
    bind_address: BindAddress | None = None
    # Ollama: the GGUF file inside model_dir to import (air-gapped), instead of a pull.
    gguf_file: Annotated[str, Field(pattern=r"^[^/]+\.gguf$")] | None = None
    # Ollama: GPU memory the model takes, where the catalog cannot tell (GGUF imports,
    # tags outside the catalog); used to split GPUs shared with vLLM.
    gpu_memory_gib: Annotated[float, Field(gt=0)] | None = None
    kv_cache_space_gib: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="vLLM CPU build only: KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    # The operator's explicit choice to serve beyond loopback without an API key: the plan
    # refuses such a deployment unless this is set, and flags it when it is.
    open: bool = False
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("extra_args")
    @classmethod
    def _no_secret_flags(cls, value: list[str]) -> list[str]:
        # vLLM's parser reads --api_key as --api-key, and argparse takes an unambiguous
        # prefix (--api-k): refuse every spelling, in any case.
        names = (arg.split("=", 1)[0].lower().replace("_", "-") for arg in value)
        if any(len(name) > len("--api-") and "--api-key".startswith(name) for name in names):
            raise ValueError("--api-key on the command line is readable by every user on the "
                             "host (ps); give the key as a secret instead")
        return value


class RaySettings(Strict):
    """The Ray cluster (roles/ray_cluster) a deployment that spans hosts runs on."""

    # Name of the Ansible variable holding the cluster's token (32 characters or more,
    # `openssl rand -hex 32`), kept Vault-encrypted in the fleet's secrets file like an
    # api_key_var: only the name is ever written here.
    auth_token_var: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    # The interface the hosts reach each other on: Ray's node address, NCCL and Gloo
    # (a fabric such as ib0, or a cluster VLAN); default: the default route's interface.
    network_interface: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:@-]{1,15}$")] | None = None


class Deployment(Strict):
    name: DeploymentName
    model: Annotated[str, Field(min_length=1)]
    engine: Literal["vllm", "ollama"]
    hosts: GroupName
    port: Port
    served_model_name: str | None = None
    model_dir: str | None = Field(
        default=None, description="model directory on the control machine, copied to hosts "
                                  "instead of downloading `model`")
    revision: str | None = None
    # Name of the Ansible variable holding the API key, kept Vault-encrypted in the fleet's
    # secrets file (or the operator's inventory): only that name is ever written here.
    api_key_var: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    # Hosts one vLLM instance spans, on a Ray cluster of its group's hosts (tensor parallel
    # inside each host, one pipeline stage per host); 1: an instance on every host.
    nodes: Annotated[int, Field(ge=1, le=64)] = 1
    ray: RaySettings | None = None
    options: EngineOptions = Field(default_factory=EngineOptions)
    rollout: RolloutSettings | None = None


class MirrorSettings(Strict):
    """`orchestrate mirror`: the weights a plan needs, fetched once onto the control machine
    and served from there, so that hosts never reach the origin (also the air-gapped mode)."""

    # How the hosts reach the mirror server (`orchestrate mirror --serve`, or any HTTP
    # server of `dir`); with it set, every host takes its weights from there.
    url: Annotated[str, Field(pattern=r"^https?://[^/\s]+(/\S*)?$")]
    # The mirror directory on the control machine; default .orchestrate/mirror.
    dir: str | None = None
    # The ModelScope hub the weights are downloaded from.
    modelscope_endpoint: Annotated[str, Field(pattern=r"^https?://\S+$")] = \
        "https://modelscope.cn"
    # Where `orchestrate mirror` downloads the Ollama release archive from, laid out as
    # <origin>/v<version>/ollama-linux-<arch>.tar.zst; default: the ollama role's
    # ollama_archive_base_url default (GitHub's release downloads).
    ollama_origin: Annotated[str | None, Field(pattern=r"^https?://\S+$")] = None
    # `orchestrate up` stages what its plan needs into `dir` before any host is changed (a
    # staged model is trusted by its manifest; `orchestrate mirror --verify` re-hashes).
    # false: the mirror is kept on another machine, by `orchestrate mirror` run there.
    stage: bool = True
    # [HOST:]PORT: `orchestrate up` serves `dir` there while its playbooks run. Unset: the
    # mirror is served by something else (`orchestrate mirror --serve` under systemd, nginx).
    listen: Annotated[str | None,
                      Field(pattern=r"^((\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):)?[0-9]{1,5}$")] = None
    # Name of the variable in the fleet's Vault-encrypted secrets file holding the mirror's
    # token (like api_key_var: only the name is written here). Set: the mirror server
    # answers 401 without it, and the hosts send it (weights: Authorization: Bearer; pip:
    # the find-links URL's password, in the environment's 0600 pip.conf).
    token_var: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]")
                             else host)
        valid = bool(sep) and port.isdigit() and 1 <= int(port) <= 65535 and (
            host.startswith("[") == (":" in host))
    except ValueError:
        valid = False
    if not valid:
        raise ValueError("expected ADDRESS:PORT with an IP address, e.g. 127.0.0.1:9100, "
                         "0.0.0.0:9100 or [::1]:9100")
    return value


class MonitoringSettings(Strict):
    """What the monitoring stage sets up on the hosts and `orchestrate monitoring` writes
    for Prometheus (README, Monitoring)."""

    # Where node_exporter listens on every host. It has no authentication: beyond loopback
    # a host's metrics are open to whoever reaches it, which the plan flags; on loopback
    # only a Prometheus on the host itself can scrape it.
    node_exporter_listen: Annotated[str, AfterValidator(_listen)] = "127.0.0.1:9100"
    scrape_interval: Annotated[str, Field(pattern=r"^[1-9][0-9]*(s|m)$")] = "15s"


class Fleet(Strict):
    # An Ansible Vault-encrypted YAML file of secrets (API keys by their api_key_var names),
    # given to every run as extra variables; opened with --vault-password-file.
    secrets: str | None = None
    mirror: MirrorSettings | None = None
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    defaults: Defaults = Field(default_factory=Defaults)
    groups: dict[GroupName, Group] = Field(default_factory=dict)
    deployments: list[Deployment] = Field(default_factory=list)


@dataclass(frozen=True)
class ResolvedHost:
    """A host with every setting resolved: what the planner works from."""

    name: str
    group: str
    address: str
    ssh_port: int
    ssh_user: str
    ssh_key: str | None
    become: bool
    profile: str
    python: PythonSettings
    pip: PipSettings
    gpu: GpuSettings
    driver: DriverSettings
    # Each driver setting (and "gpu.driver") -> the fleet key that set it (the most specific
    # layer), so that a plan refusing the setting can name it.
    driver_keys: dict[str, tuple[str, ...]]
    port_map: dict[int, int]
    vars: dict[str, Any]

    def connection(self) -> dict[str, Any]:
        """How Ansible reaches the host: the inventory variables every run (the stages, the
        facts gathering) gives it, so that all of them connect the same way."""
        conn: dict[str, Any] = {"ansible_host": self.address, "ansible_port": self.ssh_port,
                                "ansible_user": self.ssh_user}
        if self.ssh_key:
            conn["ansible_ssh_private_key_file"] = self.ssh_key
        if self.become and self.ssh_user != "root":
            conn["ansible_become"] = True
        return conn


@dataclass(frozen=True)
class LoadedFleet:
    fleet: Fleet
    source: str
    documents: tuple[YamlDocument, ...] = ()
    # Group -> its resolved hosts: the planner asks per host and per deployment, so that
    # resolving on each call would grow with the square of the fleet.
    _resolved: dict[str, tuple[ResolvedHost, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def locate(self, loc: tuple[str | int, ...]) -> str:
        """'file:line: key' of a key of the fleet, for errors found after loading."""
        parts = tuple(str(part) for part in loc)
        for doc in self.documents:
            if parts in doc.lines:
                return f"{doc.path}:{doc.lines[parts]}: {dotted(loc)}"
        return f"{self.source}: {dotted(loc)}"

    def group_names(self) -> list[str]:
        return sorted(self.fleet.groups)

    def hosts_of(self, group: str) -> list[ResolvedHost]:
        """Hosts of `group` ('all' for every host), settings resolved; ConfigError if unknown."""
        groups = self.fleet.groups
        if group != "all" and group not in groups:
            known = ", ".join(sorted(groups)) or "none defined"
            raise ConfigError(f"unknown host group '{group}' (groups in {self.source}: {known})",
                              key="--hosts")
        cached = self._resolved.get(group)
        if cached is None:
            if group == "all":
                # A host in several groups takes the settings of the first one.
                resolved: dict[str, ResolvedHost] = {}
                for name in groups:
                    for host in self.hosts_of(name):
                        resolved.setdefault(host.name, host)
                cached = tuple(resolved.values())
            else:
                grp = groups[group]
                cached = tuple(_resolve(self.fleet.defaults, group, grp, host_name, host)
                               for host_name, host in grp.hosts.items())
            self._resolved[group] = cached
        return list(cached)


def _merge(*layers: BaseModel | None) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:
            merged.update(layer.model_dump(exclude_none=True))
    return merged


def _resolve(defaults: HostSettings, group_name: str, group: Group, name: str,
             host: Host) -> ResolvedHost:
    layers = (defaults, group, host)

    def pick(key: str, default: Any) -> Any:
        # Read field by field: dumping the group would dump all of its hosts, per host.
        return next((v for v in (getattr(layer, key) for layer in reversed(layers))
                     if v is not None), default)

    variables: dict[str, Any] = {}
    for layer in layers:
        variables.update(layer.vars or {})
    driver_keys: dict[str, tuple[str, ...]] = {}
    for prefix, layer in ((("defaults",), defaults), (("groups", group_name), group),
                          (("groups", group_name, "hosts", name), host)):
        for key in (layer.driver.model_dump(exclude_none=True) if layer.driver else {}):
            driver_keys[key] = (*prefix, "driver", key)
        if layer.gpu is not None and layer.gpu.driver is not None:
            driver_keys["gpu.driver"] = (*prefix, "gpu", "driver")
    return ResolvedHost(
        name=name,
        group=group_name,
        address=host.address,
        ssh_port=pick("ssh_port", 22),
        ssh_user=pick("ssh_user", "root"),
        ssh_key=pick("ssh_key", None),
        become=pick("become", True),
        profile=pick("profile", "gpu"),
        python=PythonSettings(**_merge(*(layer.python for layer in layers))),
        pip=PipSettings(**_merge(*(layer.pip for layer in layers))),
        gpu=GpuSettings(**_merge(*(layer.gpu for layer in layers))),
        driver=DriverSettings(**_merge(*(layer.driver for layer in layers))),
        driver_keys=driver_keys,
        port_map=dict(host.port_map or {}),
        vars=variables,
    )


# --- validation errors, translated for an operator -------------------------------------------

def _model_at(model: Any, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that `loc` (a path of keys) points into."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
            continue
        origin = typing.get_origin(current)
        args = typing.get_args(current)
        if origin is dict:
            current = args[1]
        elif origin is list:
            current = args[0]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Strip Optional[...] and Annotated[...] down to the real type."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _describe(error: Any, root: type[BaseModel]) -> str:
    kind = error["type"]
    loc = error["loc"]
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        return f"unknown key (expected one of: {', '.join(allowed)}){hint}"
    if kind == "missing":
        return "required key is missing"
    got = error.get("input")
    shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
    # A validator's own message, without pydantic's "Value error, " before it.
    message = str(error["ctx"]["error"]) if kind == "value_error" else error["msg"]
    return f"{message}{shown}"


def _most_telling(exc: ValidationError) -> Any:
    """A typo'd key also makes the real key 'missing': report the typo, it explains both."""
    errors = exc.errors()
    return next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])


def validate_document(doc: YamlDocument, model: type[BaseModel]) -> BaseModel:
    if doc.data is None:
        raise ConfigError("file is empty; `orchestrate init` writes a commented example",
                          file=doc.path)
    if not isinstance(doc.data, dict):
        raise ConfigError(f"expected a mapping of keys at the top, got {type(doc.data).__name__}",
                          file=doc.path, line=1)
    try:
        return model.model_validate(doc.data)
    except ValidationError as exc:
        first = _most_telling(exc)
        raise doc.error(first["loc"], _describe(first, model)) from None


# --- cross-checks that a schema cannot express --------------------------------------------

def _check_fleet(fleet: Fleet, doc: YamlDocument | None, source: str) -> None:
    def fail(loc: tuple[Any, ...], message: str) -> ConfigError:
        if doc is not None:
            return doc.error(loc, message)
        return ConfigError(message, file=source, key=dotted(loc))

    for reserved in RESERVED_GROUPS & set(fleet.groups):
        raise fail(("groups", reserved), f"'{reserved}' is reserved by Ansible; choose "
                                         "another group name")
    seen_hosts: dict[str, tuple[str, Host]] = {}
    for group_name, group in fleet.groups.items():
        for host_name, host in group.hosts.items():
            if host_name in seen_hosts and seen_hosts[host_name][1] != host:
                raise fail(("groups", group_name, "hosts", host_name),
                           f"host '{host_name}' is already defined differently in group "
                           f"'{seen_hosts[host_name][0]}'")
            seen_hosts.setdefault(host_name, (group_name, host))

    names: set[str] = set()
    ports: dict[tuple[str, int], str] = {}
    # host -> the deployment on it, for the check that one spanning hosts has them alone.
    users: dict[str, list[tuple[int, Deployment]]] = {}
    for index, dep in enumerate(fleet.deployments):
        if dep.name in names:
            raise fail(("deployments", index, "name"), f"deployment name '{dep.name}' is "
                                                       "used twice")
        names.add(dep.name)
        if dep.hosts != "all" and dep.hosts not in fleet.groups:
            known = ", ".join(sorted(fleet.groups)) or "none defined"
            raise fail(("deployments", index, "hosts"),
                       f"unknown host group '{dep.hosts}' (groups: {known})")
        group_hosts = (seen_hosts if dep.hosts == "all" else fleet.groups[dep.hosts].hosts)
        for host_name in group_hosts:
            other = ports.get((host_name, dep.port))
            if other:
                raise fail(("deployments", index, "port"),
                           f"port {dep.port} on host '{host_name}' is already used by "
                           f"deployment '{other}'")
            ports[(host_name, dep.port)] = dep.name
            users.setdefault(host_name, []).append((index, dep))
        _check_span(index, dep, list(group_hosts), fail)
    spanning = [(i, d) for i, d in enumerate(fleet.deployments) if d.nodes > 1]
    if len(spanning) > 1:
        raise fail(("deployments", spanning[1][0], "nodes"),
                   f"deployment '{spanning[0][1].name}' already spans hosts: the toolkit sets "
                   "up one Ray cluster per fleet; give this deployment nodes: 1, or put it in "
                   "a fleet of its own")
    for _, dep in spanning:
        for host_name, on_host in users.items():
            others = [(i, d) for i, d in on_host if d.name != dep.name]
            if others and len(others) < len(on_host):
                raise fail(("deployments", others[0][0], "hosts"),
                           f"host '{host_name}' belongs to deployment '{dep.name}', which "
                           "spans hosts and takes all of their GPUs; give "
                           f"'{others[0][1].name}' other hosts")


def _check_span(index: int, dep: Deployment, hosts: list[str],
                fail: typing.Callable[[tuple[Any, ...], str], ConfigError]) -> None:
    """A deployment across hosts: vLLM on a Ray cluster of exactly its group's hosts."""
    if dep.nodes == 1:
        if dep.ray is not None:
            raise fail(("deployments", index, "ray"),
                       "ray applies only to a deployment that spans hosts (nodes: 2 or more)")
        return
    if dep.engine != "vllm":
        raise fail(("deployments", index, "nodes"),
                   f"only vLLM spans hosts (on a Ray cluster); {dep.engine} serves from one "
                   "host: remove nodes")
    if len(hosts) != dep.nodes:
        raise fail(("deployments", index, "nodes"),
                   f"nodes: {dep.nodes}, but group '{dep.hosts}' has {len(hosts)} host(s) "
                   f"({', '.join(hosts)}): one instance spans every host of its group, the "
                   f"first one ({hosts[0]}) as the Ray head; use a group of exactly "
                   f"{dep.nodes} hosts, or nodes: {len(hosts)}")
    pipeline = dep.options.pipeline_parallel_size
    if pipeline is not None and pipeline != dep.nodes:
        raise fail(("deployments", index, "options", "pipeline_parallel_size"),
                   f"a deployment across {dep.nodes} hosts runs one pipeline stage per host "
                   f"(pipeline_parallel_size {dep.nodes}); remove it or set {dep.nodes}")


# --- Ansible inventories --------------------------------------------------------------------

_INVENTORY_KEYS = {
    "ansible_port": "ssh_port",
    "ansible_user": "ssh_user",
    "ansible_ssh_private_key_file": "ssh_key",
    "ansible_become": "become",
}


def _as_ansible_reads(key: str, value: Any) -> Any:
    """An inventory is Ansible's format, read with Ansible's types: an INI inventory's
    `ansible_become=true` and `ansible_port=2200` arrive as strings."""
    if key == "become" and isinstance(value, str | int) and not isinstance(value, bool):
        try:
            return boolean(value, strict=True)
        except TypeError:
            return value  # refused by validation, naming the variable
    if key == "ssh_port" and isinstance(value, str) and value.isdecimal():
        return int(value)
    return value


def _settings_from_vars(variables: dict[str, Any]) -> dict[str, Any]:
    """Connection variables become fleet settings; the rest pass through as `vars`."""
    rest = dict(variables)
    settings = {key: _as_ansible_reads(key, rest.pop(ansible_key))
                for ansible_key, key in _INVENTORY_KEYS.items() if ansible_key in rest}
    if rest:
        settings["vars"] = rest
    return settings


def _inventory_groups(doc: YamlDocument) -> dict[str, Any]:
    """Turn a YAML Ansible inventory into fleet groups (the hosts part of a fleet)."""
    data = doc.data
    if not isinstance(data, dict):
        raise ConfigError("not a YAML inventory (convert an INI one with "
                          "`ansible-inventory -i FILE --list -y`)", file=doc.path, line=1)
    groups: dict[str, Any] = {}

    def walk(name: str, node: Any, loc: tuple[Any, ...], inherited: dict[str, Any]) -> None:
        if node is None:
            return
        if not isinstance(node, dict):
            raise doc.error(loc, "expected a mapping with hosts, vars or children")
        group_vars = {**inherited, **(node.get("vars") or {})}
        hosts = node.get("hosts") or {}
        if hosts:
            converted = {}
            for host_name, host_vars in hosts.items():
                host_vars = dict(host_vars or {})
                address = host_vars.pop("ansible_host", host_name)
                converted[str(host_name)] = {"address": address,
                                             **_settings_from_vars(host_vars)}
            groups[name] = {"hosts": converted, **_settings_from_vars(group_vars)}
        for child, child_node in (node.get("children") or {}).items():
            walk(str(child), child_node, (*loc, "children", child), group_vars)

    for top, node in data.items():
        walk(str(top), node, (top,), {})
    groups.pop("all", None)
    groups.pop("ungrouped", None)
    return groups


# --- entry point ---------------------------------------------------------------------------

def _paths_relative_to(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative ssh_key, model_dir, secrets and mirror.dir paths mean: next to the fleet file,
    wherever the command runs from (Ansible itself runs from the project directory)."""
    def fix(path: str) -> str:
        return path if path.startswith(("/", "~")) else str(base / path)

    def settings(node: dict[str, Any]) -> dict[str, Any]:
        return {**node, "ssh_key": fix(node["ssh_key"])} if isinstance(
            node.get("ssh_key"), str) else node

    out = dict(raw)
    if isinstance(out.get("defaults"), dict):
        out["defaults"] = settings(out["defaults"])
    if isinstance(out.get("groups"), dict):
        out["groups"] = {
            name: ({**settings(group), "hosts": {h: settings(v) if isinstance(v, dict) else v
                                                 for h, v in group["hosts"].items()}}
                   if isinstance(group, dict) and isinstance(group.get("hosts"), dict)
                   else settings(group) if isinstance(group, dict) else group)
            for name, group in out["groups"].items()}
    if isinstance(out.get("secrets"), str):
        out["secrets"] = fix(out["secrets"])
    if isinstance(out.get("mirror"), dict) and isinstance(out["mirror"].get("dir"), str):
        out["mirror"] = {**out["mirror"], "dir": fix(out["mirror"]["dir"])}
    if isinstance(out.get("deployments"), list):
        out["deployments"] = [
            {**d, "model_dir": fix(d["model_dir"])} if isinstance(d, dict)
            and isinstance(d.get("model_dir"), str) else d
            for d in out["deployments"]]
    return out


def load_fleet(fleet_path: Path | None, inventory_path: Path | None = None, *,
               base: Path | None = None) -> LoadedFleet:
    """Load fleet.yml and/or an Ansible inventory into one validated fleet. `base`: where
    the fleet's relative paths lead from (default: the fleet file's directory; a copy kept
    in a run directory means them from the original's)."""
    documents: list[YamlDocument] = []
    raw: dict[str, Any] = {}
    fleet_doc: YamlDocument | None = None
    if fleet_path is not None:
        fleet_doc = load_yaml(fleet_path)
        validate_document(fleet_doc, Fleet)
        raw = dict(fleet_doc.data)
        documents.append(fleet_doc)
    if inventory_path is not None:
        try:
            inv_doc = load_yaml(inventory_path)
        except ConfigError as exc:
            raise ConfigError(f"{exc.detail}; only YAML inventories are read (convert an INI "
                              "one with `ansible-inventory -i FILE --list -y`)",
                              file=exc.file, line=exc.line) from None
        documents.append(inv_doc)
        inv_groups = _inventory_groups(inv_doc)
        clash = set(inv_groups) & set(raw.get("groups") or {})
        if clash:
            name = sorted(clash)[0]
            raise ConfigError(f"group '{name}' is defined both here and in {inv_doc.path}",
                              file=fleet_doc.path if fleet_doc else None,
                              line=fleet_doc.line_of(("groups", name)) if fleet_doc else None)
        try:
            inv_fleet = Fleet.model_validate({"groups": inv_groups})
        except ValidationError as exc:
            first = _most_telling(exc)
            # loc is groups.G.hosts.H.key: name the inventory host and variable.
            raise ConfigError(_describe(first, Fleet), file=inv_doc.path,
                              key=dotted(first["loc"][1:])) from None
        raw["groups"] = {**(raw.get("groups") or {}),
                         **inv_fleet.model_dump(exclude_none=True)["groups"]}
    source = " + ".join(d.path for d in documents) or "(no fleet)"
    if fleet_path is not None:
        raw = _paths_relative_to(raw, base or fleet_path.resolve().parent)
    fleet = Fleet.model_validate(raw)
    _check_fleet(fleet, fleet_doc, source)
    return LoadedFleet(fleet=fleet, source=source, documents=tuple(documents))
