"""The variables a plan gives each role, typed, each field named as the role names it.

One model per role (and one for the playbooks' own switches): a misspelt or mistyped
variable is an error where the plan builds it, and tests/unit/test_plan_role_contract.py
holds every field to the option of the same name in roles/<role>/meta/argument_specs.yml.

A field without a default is always emitted, null included (the plan's value then takes
precedence over an operator's inventory); a field that defaults to None is emitted only
when the plan gives it a value, so that the role's own default applies otherwise.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer


class EmittedVars(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        fields = type(self).model_fields
        return {k: v for k, v in data.items() if v is not None or fields[k].is_required()}

    def emitted(self) -> dict[str, Any]:
        """The variables as Ansible reads them (plain data, for host_vars)."""
        return self.model_dump()


class PlaybookVars(EmittedVars):
    """Read by the stage playbooks, not by a role (the contract test says where)."""

    orchestrate_profile: str
    # One environment per deployment (fleet python.per_deployment): the python_env stage
    # runs the python_env and pytorch roles once per path.
    python_env_paths: list[str] | None = None
    # The drivers stage runs the nvidia_driver role only where this is true.
    nvidia_driver_manage: bool | None = None


class RoleVars(EmittedVars):
    role: ClassVar[str]


class PreflightVars(RoleVars):
    role = "preflight"
    preflight_min_free_gib: int


class NvidiaDriverVars(RoleVars):
    role = "nvidia_driver"
    nvidia_driver_branch: str
    nvidia_driver_source: Literal["distro", "cuda"] | None = None
    nvidia_driver_open_kernel_modules: bool
    nvidia_driver_fabricmanager: bool | None = None
    nvidia_driver_nvlsm: bool | None = None


class GpuCheckVars(RoleVars):
    role = "gpu_check"
    gpu_check_min_driver: str
    gpu_check_expected_name: str | None = None
    gpu_check_expected_count: int | None = None


class PythonEnvVars(RoleVars):
    role = "python_env"
    python_env_manager: str
    python_env_path: str
    python_env_python_version: str
    python_env_pip_index_url: str | None
    python_env_pip_extra_index_urls: list[str]
    python_env_pip_find_links: str | None
    python_env_pip_no_index: bool
    python_env_build_tools: bool | None = None
    # A reference to the fleet's secrets ("{{ var }}"): the mirror's token, for a find-links
    # under mirror.url (mirror.token_var).
    python_env_pip_find_links_password: str | None = None
    python_env_conda_installer_url: str | None = None


class PytorchVars(RoleVars):
    role = "pytorch"
    pytorch_requirement: str
    pytorch_index_url: str | None
    pytorch_require_cuda: bool | None = None
    pytorch_expected_gpus: int | None = None


class WeightsEntry(EmittedVars):
    """One model_weights_models entry."""

    name: str
    model_id: str
    dest: str
    source: Literal["modelscope", "local", "mirror"]
    revision: str | None = None
    local_dir: str | None = None
    url: str | None = None
    manifest_url: str | None = None


class ModelWeightsVars(RoleVars):
    role = "model_weights"
    model_weights_models: list[WeightsEntry]
    # A reference to the fleet's secrets ("{{ var }}"): the mirror's token (mirror.token_var).
    model_weights_mirror_token: str | None = None


class RayClusterVars(RoleVars):
    role = "ray_cluster"
    # The interface's name, or the role's own expression for the default route's.
    ray_cluster_network_interface: str
    # A reference to the fleet's secrets ("{{ var }}"), resolved by Ansible at run time.
    ray_cluster_auth_token: str | None = None
    ray_cluster_device_allow: list[str] | None = None
    ray_cluster_wait_for_devices: list[str] | None = None
    ray_cluster_rdma: bool | None = None


class VllmRayClient(EmittedVars):
    """What an instance driving the host's Ray cluster needs of it (Jinja references to
    the ray_cluster role's variables)."""

    group: str
    temp_dir: str


class VllmDeployment(EmittedVars):
    """One vllm_deployments entry: the instance vllm@<name>.service."""

    name: str
    port: int
    args: list[str]
    env: dict[str, str]
    # A reference to the fleet's secrets ("{{ var }}"), resolved by Ansible at run time.
    api_key: str | None = None
    ray_client: VllmRayClient | None = None
    env_path: str | None = None


class VllmVars(RoleVars):
    role = "vllm"
    vllm_requirement: str
    vllm_remove_packages: list[str]
    vllm_deployments: list[VllmDeployment] | None = None
    vllm_device_allow: list[str] | None = None
    vllm_wait_for_devices: list[str] | None = None
    vllm_rdma: bool | None = None


class OllamaModel(EmittedVars):
    """One ollama_models entry: a tag to pull, or a GGUF file on the host to import."""

    name: str
    gguf: str | None = None


class OllamaVars(RoleVars):
    role = "ollama"
    ollama_models: list[OllamaModel]
    ollama_port: int
    ollama_host: str
    ollama_gpu_devices: list[str] | None = None
    ollama_device_allow: list[str] | None = None
    ollama_wait_for_devices: list[str] | None = None
    # A reference to the fleet's secrets ("{{ var }}"): the mirror's token (mirror.token_var),
    # where the archives come from the mirror.
    ollama_archive_token: str | None = None


class HealthGateVars(RoleVars):
    """The gate after each batch of the services stage (fleet.yml rollout:)."""

    role = "health_gate"
    # vLLM deployments whose rollout turns the gate off.
    health_gate_skip: list[str] | None = None
    # False where every Ollama deployment of the host turns it off.
    health_gate_ollama: bool | None = None
    health_gate_timeout: int | None = None


class NodeExporterVars(RoleVars):
    """Where node_exporter listens: fleet.yml monitoring.node_exporter_listen, emitted only
    where the fleet sets it (the role's loopback default applies otherwise)."""

    role = "node_exporter"
    node_exporter_listen_address: str


# Every model a plan emits, in the order host_vars lists them (the stages' order).
EMITTED: tuple[type[EmittedVars], ...] = (
    PlaybookVars, PreflightVars, NvidiaDriverVars, GpuCheckVars, PythonEnvVars, PytorchVars,
    ModelWeightsVars, RayClusterVars, VllmVars, OllamaVars, HealthGateVars, NodeExporterVars)


def merge(*parts: EmittedVars | None) -> dict[str, Any]:
    """A host's variables from its parts, in EMITTED's order."""
    given = {type(p): p for p in parts if p is not None}
    return {k: v for kind in EMITTED if kind in given for k, v in given[kind].emitted().items()}
