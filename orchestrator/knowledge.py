"""The project's knowledge tables (model catalog, software stack), loaded from cited data files.

Loading is kept apart from planning so that the planner stays a pure function of
its inputs.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

DATA_DIR = Path(__file__).parent / "data"


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogModel(_Data):
    params_billion: float
    dtype: str
    ollama_tag: str
    license: str

    @property
    def weights_gib(self) -> float:
        bytes_per_param = {"bfloat16": 2, "float16": 2, "float32": 4}[self.dtype]
        return self.params_billion * 1e9 * bytes_per_param / 2**30


class StackProfile(_Data):
    vllm_package: str
    vllm_version: str
    torch_version: str
    torch_local_version: str | None
    torch_index_url: str | None
    python_min: str
    remove_packages: list[str]

    @property
    def torch_requirement(self) -> str:
        return f"torch=={self.torch_version}{self.torch_local_version or ''}"

    @property
    def vllm_requirement(self) -> str:
        return f"{self.vllm_package}=={self.vllm_version}"


class Catalog(_Data):
    schema_version: int
    models: dict[str, CatalogModel]


class Compat(_Data):
    schema_version: int
    profiles: dict[str, StackProfile]


class Knowledge(_Data):
    catalog: Catalog
    compat: Compat


def load_knowledge(data_dir: Path = DATA_DIR) -> Knowledge:
    def read(name: str) -> object:
        return yaml.safe_load((data_dir / name).read_text(encoding="utf-8"))

    return Knowledge(catalog=Catalog.model_validate(read("catalog.yml")),
                     compat=Compat.model_validate(read("compat.yml")))
