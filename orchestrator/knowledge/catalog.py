"""The project's knowledge tables (model catalog, software stack), loaded from cited data files.

Loading is kept apart from planning so that the planner stays a pure function of
its inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATA_DIR = Path(__file__).parent / "data"


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Data):
    """The shape of a Qwen2-style dense decoder, as its config.json states it.

    Parameter counts follow the modules transformers' Qwen2ForCausalLM builds: per layer
    q/k/v projections (with a bias when `attention_bias`), o_proj, a SwiGLU MLP
    (gate, up, down) and two RMSNorms; then a final norm, the token embedding and the
    LM head (shared with the embedding when `tie_word_embeddings`).
    """

    num_hidden_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool
    attention_bias: bool = True

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of the matrices a GPTQ/AWQ checkpoint quantizes (biases excluded)."""
        h = self.hidden_size
        attention = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        return attention + 3 * h * self.intermediate_size

    @property
    def linear_params(self) -> int:
        return self.num_hidden_layers * self.linear_params_per_layer

    @property
    def layer_params(self) -> int:
        bias = self.q_size + 2 * self.kv_size if self.attention_bias else 0
        return self.linear_params_per_layer + bias + 2 * self.hidden_size

    @property
    def non_embedding_params(self) -> int:
        """What Qwen's model cards call "Number of Parameters (Non-Embedding)"."""
        return self.num_hidden_layers * self.layer_params + self.hidden_size

    @property
    def embedding_params(self) -> int:
        tables = 1 if self.tie_word_embeddings else 2
        return tables * self.vocab_size * self.hidden_size

    @property
    def param_count(self) -> int:
        return self.non_embedding_params + self.embedding_params

    def gptq_index_bytes(self) -> int:
        """GPTQ's g_idx: one int32 per input feature of every quantized matrix."""
        per_layer = 3 * self.hidden_size + self.q_size + 2 * self.hidden_size
        per_layer += self.intermediate_size
        return 4 * self.num_hidden_layers * per_layer


QUANT_METHODS = ("awq", "gptq")
BYTES_PER_PARAM = {"bfloat16": 2, "float16": 2, "float32": 4}


class Quantization(_Data):
    """A quantized-checkpoint format (config.json's quantization_config) and the lowest GPU
    compute capability vLLM runs its kernels on."""

    method: str
    bits: int
    group_size: int = Field(gt=0)
    # None for a format read from a config.json outside the catalog.
    min_compute_capability: str | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in QUANT_METHODS:
            raise ValueError(f"quantization method {value!r} is not one of {QUANT_METHODS}")
        return value

    @field_validator("bits")
    @classmethod
    def _known_bits(cls, value: int) -> int:
        if value not in (4, 8):
            raise ValueError(f"{value} bits: only 4- and 8-bit GPTQ/AWQ are modelled")
        return value

    @property
    def label(self) -> str:
        return "AWQ" if self.method == "awq" else f"GPTQ-Int{self.bits}"


def weight_bytes(arch: Architecture, dtype: str, quantization: Quantization | None) -> int:
    """Bytes of the weights a checkpoint holds (and vLLM loads).

    Unquantized: every parameter in `dtype`. GPTQ/AWQ: the linear layers' weights packed at
    `bits` per weight, plus per group of `group_size` input features one float16 scale and
    one `bits`-wide zero point per output feature (plus GPTQ's int32 g_idx); embeddings,
    LM head, norms and biases stay float16.
    """
    if quantization is None:
        return arch.param_count * BYTES_PER_PARAM[dtype]
    linear = arch.linear_params
    packed = linear * quantization.bits // 8
    groups = linear // quantization.group_size
    scales_and_zeros = groups * 2 + groups * quantization.bits // 8
    index = arch.gptq_index_bytes() if quantization.method == "gptq" else 0
    unquantized = (arch.param_count - linear) * 2
    return packed + scales_and_zeros + index + unquantized


class CatalogModel(_Data):
    params_billion: float
    dtype: str
    ollama_tag: str | None
    license: str
    family: str
    variant: str
    non_embedding_params_billion: float
    architecture: Architecture
    # config.json's value: the longest context vLLM accepts without overrides.
    max_position_embeddings: int = Field(gt=0)
    # The longest context the model card documents (with YaRN where it says so).
    max_context: int = Field(gt=0)
    # YaRN rope_scaling factor the model card gives to reach max_context.
    yarn_factor: float | None = None
    hf_id: str
    modelscope_id: str
    quantization: Quantization | None = None
    quantized_from: str | None = None
    gguf_repo: str | None = None
    # Largest tensor parallel size the publisher says works (known issues), if limited.
    tensor_parallel_max: int | None = None
    known_issues: list[str] = []

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in BYTES_PER_PARAM:
            raise ValueError(f"dtype {value!r} is not one of {sorted(BYTES_PER_PARAM)}")
        return value

    @property
    def params(self) -> int:
        """Parameters computed from the architecture (the card's figure is rounded)."""
        return self.architecture.param_count

    @property
    def weights_gib(self) -> float:
        """Weights on disk and in GPU memory. Unquantized rows: the published parameter count
        x bytes per parameter of the checkpoint dtype; quantized rows: see weight_bytes()."""
        if self.quantization is None:
            return self.params_billion * 1e9 * BYTES_PER_PARAM[self.dtype] / 2**30
        return weight_bytes(self.architecture, self.dtype, self.quantization) / 2**30


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


class OllamaMemory(_Data):
    """What an Ollama model takes on the GPU (catalog.yml ollama_memory, sources there)."""

    bits_per_weight: float = Field(gt=0)
    context_tokens: int = Field(gt=0)
    overhead_gib: float = Field(ge=0)


class Catalog(_Data):
    """data/catalog.yml. Rows name an architecture and a quantization format by key; both
    are resolved here, and a row's hf_id / modelscope_id default to its key."""

    schema_version: int
    architectures: dict[str, Architecture]
    quantizations: dict[str, Quantization]
    ollama_memory: OllamaMemory
    models: dict[str, CatalogModel]

    @model_validator(mode="before")
    @classmethod
    def _resolve_references(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            return data
        architectures = data.get("architectures") or {}
        quantizations = data.get("quantizations") or {}
        models: dict[str, Any] = {}
        for name, row in data["models"].items():
            if not isinstance(row, dict):
                models[name] = row
                continue
            row = dict(row)
            row.setdefault("hf_id", name)
            row.setdefault("modelscope_id", name)
            arch = row.get("architecture")
            if isinstance(arch, str):
                if arch not in architectures:
                    raise ValueError(f"model {name}: unknown architecture {arch!r}")
                row["architecture"] = architectures[arch]
            quant = row.get("quantization")
            if isinstance(quant, str):
                if quant not in quantizations:
                    raise ValueError(f"model {name}: unknown quantization {quant!r}")
                row["quantization"] = quantizations[quant]
            models[name] = row
        return {**data, "models": models}


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
