"""Does a model fit on a host's GPUs under vLLM, and how: tensor parallel size, dtype, the
largest context; or why not, and what would fit instead.

Pure functions of (model, GPU, count, settings, tables): nothing here reads files. Callers
pass the catalog (knowledge.load_knowledge().catalog) and the GPU table
(compat.load_gpu_table()) when they name a model or a GPU.

The memory model is vLLM's own (vllm/v1/worker/gpu_worker.py, determine_available_memory):
the KV cache gets `total GPU memory x gpu_memory_utilization` minus what the worker holds
after its profiling run, i.e. the weights (its "Loading model weights took X GB" is bytes /
2**30), the peak activation of a dummy forward pass, memory allocated outside torch (NCCL,
CUDA graphs) and, since vLLM 0.21, CUDA-graph memory. Weights and KV cache are computed
here from the architecture; the rest is the reserve below.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict

from orchestrator.errors import PlanError
from orchestrator.facts.nvidia_smi import GpuFacts
from orchestrator.knowledge.catalog import (
    BYTES_PER_PARAM,
    Architecture,
    Catalog,
    CatalogModel,
    Quantization,
    weight_bytes,
)
from orchestrator.knowledge.compat import (
    CompatError,
    GpuModel,
    GpuTable,
    parse_compute_capability,
)

GIB = 2**30
MIB = 2**20
# Where the GPU table's memory comes from, as the reasons name it.
TABLE_MEMORY = "nvidia-smi memory.total, data/gpus.yml"

# Per-GPU memory vLLM needs besides weights and KV cache, taken out of the
# gpu_memory_utilization budget. vLLM logs it at start-up ("model weights take ...;
# non_torch_memory takes ...; PyTorch activation peak memory takes ..."): logs quoted in
# issue threads for 0.5B-32B dense models on one GPU at default scheduler settings show
# activation peaks of 0.22-2.02 GiB (e.g. 1.42 GiB for a Qwen2.5-7B, vllm-project/vllm#13882)
# and non-torch memory of 0.01-0.26 GiB. CUDA-graph capture adds about 0.5 GiB ("Graph
# capturing finished in 5 secs, took 0.47 GiB") and is profiled into the budget since vLLM
# 0.21 (eugr/spark-vllm-docker#396). vLLM also takes the budget from CUDA's total
# (torch.cuda.mem_get_info), 0.3-0.9 GiB below nvidia-smi's memory.total (T4 15.0 ->
# 14.56/14.74, A10 22.49 -> 22.07, A100-40GB 40.0 -> 39.39, A100-80GB 80.0 -> 79.15 GiB in
# those logs). 2.5 GiB covers the largest sum of these.
RESERVE_GIB = 2.5
# With tensor parallelism NCCL and vLLM's custom all-reduce buffers add to the non-torch
# memory: 1.39 and 2.10 GiB logged on multi-GPU runs against <= 0.26 GiB on one GPU.
# Pipeline parallelism across hosts has NCCL's send/receive buffers but no custom
# all-reduce; the same reserve is kept for it, as a margin, rather than a guess below it.
TENSOR_PARALLEL_RESERVE_GIB = 2.0
# vLLM allocates the KV cache in blocks of 16 tokens (the CUDA default block_size).
BLOCK_TOKENS = 16
# The shortest context a fit may offer when the caller asks for none: Qwen2.5-Math's whole
# context, and the smallest max_model_len in Qwen's own vLLM benchmark settings.
MIN_MODEL_LEN = 4096
# vLLM refuses bfloat16 below this ("Bfloat16 is only supported on GPUs with compute
# capability of at least 8.0 ... You can use float16 instead", vllm/v1/worker/gpu_worker.py).
BF16_MIN_CC = (8, 0)


class FitError(PlanError):
    """The question cannot be asked: unknown model or GPU, or settings out of range."""


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Out):
    """What the fit needs of a model, from a catalog row or a config.json."""

    name: str
    architecture: Architecture
    dtype: str
    quantization: Quantization | None = None
    max_position_embeddings: int
    max_context: int
    yarn_factor: float | None = None
    tensor_parallel_max: int | None = None
    known_issues: list[str] = []

    @property
    def params(self) -> int:
        return self.architecture.param_count


class FitResult(_Out):
    model: str
    gpu: str
    # GPUs per host, and hosts: one vLLM instance across `nodes` hosts runs tensor parallel
    # inside each host and one pipeline stage per host (pipeline_parallel == nodes).
    count: int
    fits: bool
    tensor_parallel: int
    dtype: str
    quantization: str | None
    # All weights, and the share of one GPU (KV heads replicated when TP > KV heads).
    weights_gib: float
    weights_per_gpu_gib: float
    # KV-cache memory per GPU and the tokens it holds.
    kv_cache_gib: float
    kv_cache_tokens: int
    kv_bytes_per_token: int
    max_model_len: int
    # memory.total per GPU as nvidia-smi reports it (the table's or the measured one).
    gpu_memory_mib: int
    gpu_memory_utilization: float
    reserve_gib: float
    reasons: list[str]
    suggestions: list[str] = []
    nodes: int = 1
    pipeline_parallel: int = 1

    @property
    def vllm_args(self) -> list[str]:
        """The `vllm serve` flags this fit decides (empty when it does not fit)."""
        if not self.fits:
            return []
        pipeline = (["--pipeline-parallel-size", str(self.pipeline_parallel)]
                    if self.pipeline_parallel > 1 else [])
        return ["--tensor-parallel-size", str(self.tensor_parallel), *pipeline,
                "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len),
                "--gpu-memory-utilization", str(self.gpu_memory_utilization)]


# --- models -------------------------------------------------------------------------------


def spec_from_catalog(name: str, row: CatalogModel) -> ModelSpec:
    return ModelSpec(name=name, architecture=row.architecture, dtype=row.dtype,
                     quantization=row.quantization,
                     max_position_embeddings=row.max_position_embeddings,
                     max_context=row.max_context, yarn_factor=row.yarn_factor,
                     tensor_parallel_max=row.tensor_parallel_max,
                     known_issues=list(row.known_issues))


def _int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FitError(f"config.json: '{key}' must be a positive integer (got {value!r})")
    return value


def model_from_config(config: dict[str, Any], name: str = "config.json", *,
                      catalog: Catalog | None = None) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (parsed), for a model outside the catalog.

    Reads the same fields the catalog records; parameters are computed from them. q/k/v
    biases default to present for model_type qwen2 (Qwen2 always has them) and to
    `attention_bias` otherwise; a YaRN `rope_scaling` extends the context as vLLM does
    (original_max_position_embeddings x factor). GPTQ/AWQ `quantization_config` is read;
    the method's compute-capability floor comes from the catalog when given.
    """
    if any(key in config for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise FitError(f"{name}: mixture-of-experts models are not modelled by the fit")
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    model_type = config.get("model_type")
    arch = Architecture(
        num_hidden_layers=_int(config, "num_hidden_layers"), hidden_size=hidden,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=_int(config, "intermediate_size"),
        vocab_size=_int(config, "vocab_size"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", model_type == "qwen2")))
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    dtype = dtype.removeprefix("torch.")
    if dtype not in BYTES_PER_PARAM:
        raise FitError(f"{name}: torch_dtype {dtype!r} is not one of {sorted(BYTES_PER_PARAM)}")

    quantization = None
    qconfig = config.get("quantization_config")
    if isinstance(qconfig, dict):
        method = qconfig.get("quant_method")
        if method not in ("awq", "gptq"):
            raise FitError(f"{name}: quantization {method!r} is not modelled (only awq, gptq)")
        floor = None
        if catalog is not None:
            floors = {q.method: q.min_compute_capability for q in catalog.quantizations.values()}
            floor = floors.get(method)
        quantization = Quantization(method=method, bits=int(qconfig.get("bits", 4)),
                                    group_size=int(qconfig.get("group_size", 128)),
                                    min_compute_capability=floor)

    max_pos = _int(config, "max_position_embeddings")
    max_context, yarn = max_pos, None
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict) and (scaling.get("type") or scaling.get("rope_type")) == "yarn":
        yarn = float(scaling.get("factor", 1.0))
        original = int(scaling.get("original_max_position_embeddings", max_pos))
        max_pos = max_context = int(original * yarn)
    return ModelSpec(name=name, architecture=arch, dtype=dtype, quantization=quantization,
                     max_position_embeddings=max_pos, max_context=max_context, yarn_factor=yarn)


# --- the rules ------------------------------------------------------------------------------


def _cc(text: str) -> tuple[int, int]:
    return parse_compute_capability(text)


def serving_dtype(spec: ModelSpec, compute_capability: str) -> tuple[str, str]:
    """The dtype vLLM will run and why. GPTQ/AWQ checkpoints are float16; bfloat16 needs
    compute capability 8.0; vLLM's --dtype auto runs float32 checkpoints in float16."""
    if spec.quantization is not None:
        return "float16", f"{spec.quantization.label} kernels run in float16"
    if spec.dtype == "bfloat16":
        if _cc(compute_capability) < BF16_MIN_CC:
            return "float16", ("bfloat16 needs compute capability >= 8.0 (vLLM refuses it on "
                               f"{compute_capability}): serving in float16 (--dtype float16)")
        return "bfloat16", (f"the checkpoint's dtype (compute capability "
                            f"{compute_capability} >= 8.0)")
    if spec.dtype == "float32":
        return "float16", "float32 checkpoint: vLLM's --dtype auto serves it in float16"
    return "float16", "the checkpoint's dtype"


def tensor_parallel_problem(arch: Architecture, tp: int,
                            quantization: Quantization | None) -> str | None:
    """Why vLLM cannot shard this architecture `tp` ways, or None.

    vLLM: attention heads must divide (ModelConfig.verify_with_parallel_config, "Total number
    of attention heads must be divisible by tensor parallel size"); KV heads are split when
    tp <= KV heads and replicated when tp > KV heads, which needs tp % KV heads == 0
    (QKVParallelLinear: divide(tp_size, total_num_kv_heads)); the MLP is split by tp. GPTQ/AWQ:
    every row-parallel input shard (o_proj, down_proj) must hold whole quantization groups
    ("The input size is not aligned with the quantized weight shape. This can be caused by too
    large tensor parallel size.").
    """
    heads, kv = arch.num_attention_heads, arch.num_key_value_heads
    if heads % tp:
        return f"{heads} attention heads are not divisible by {tp}"
    if tp <= kv and kv % tp:
        return f"{kv} KV heads are not divisible by {tp}"
    if tp > kv and tp % kv:
        return f"{tp} is not a multiple of the {kv} KV heads (vLLM replicates them evenly)"
    if arch.intermediate_size % tp:
        return f"intermediate size {arch.intermediate_size} is not divisible by {tp}"
    if quantization is not None:
        group = quantization.group_size
        for what, size in (("o_proj input", arch.q_size), ("down_proj input",
                                                              arch.intermediate_size)):
            if (size // tp) % group:
                return (f"{what} {size} / {tp} = {size // tp} is not a multiple of the "
                        f"{group}-wide quantization groups")
    return None


def kv_bytes_per_token(arch: Architecture, tp: int, dtype_bytes: int = 2,
                       layers: int | None = None) -> int:
    """KV cache per token on one GPU: K and V, every layer (of its pipeline stage), the
    GPU's KV heads x head_dim."""
    kv_heads_per_gpu = max(1, arch.num_key_value_heads // tp)
    layers = arch.num_hidden_layers if layers is None else layers
    return 2 * layers * kv_heads_per_gpu * arch.head_dim * dtype_bytes


def pipeline_stages(layers: int, pp: int) -> list[int]:
    """Decoder layers per pipeline stage as vLLM splits them (vllm/distributed/utils.py,
    get_pp_indices): an even share each, one more each on the stages before the last for
    the remainder."""
    share, rest = divmod(layers, pp)
    stages = [share] * pp
    for i in range(2, rest + 2):
        stages[-i] += 1
    return stages


def weights_per_gpu(arch: Architecture, total: int, tp: int, kv_weight_bytes: int) -> int:
    """A GPU's share of the weights: 1/tp of everything, plus the copies of K/V projections
    vLLM makes when it replicates KV heads (tp > KV heads)."""
    kv = arch.num_key_value_heads
    replicas = tp // kv if tp > kv else 1
    return (total - kv_weight_bytes) // tp + kv_weight_bytes * replicas // tp


def _kv_weight_bytes(spec: ModelSpec, dtype_bytes: int) -> int:
    arch = spec.architecture
    per_layer = 2 * arch.hidden_size * arch.kv_size
    if spec.quantization is not None:
        return arch.num_hidden_layers * per_layer * spec.quantization.bits // 8
    return arch.num_hidden_layers * per_layer * dtype_bytes


def reserve_gib(tp: int, pp: int = 1) -> float:
    return RESERVE_GIB + (TENSOR_PARALLEL_RESERVE_GIB if tp * pp > 1 else 0.0)


def _stage_weights(spec: ModelSpec, weights: int, pp: int,
                   dtype_bytes: int) -> list[tuple[int, int, int]]:
    """(layers, weight bytes, K/V projection bytes) of each pipeline stage. The first stage
    also holds the token embedding and the last the LM head (vLLM's Qwen2 builds an
    embedding copy on the last stage when the two are tied); embeddings stay float16 in
    GPTQ/AWQ checkpoints."""
    arch = spec.architecture
    kv_weights = _kv_weight_bytes(spec, dtype_bytes)
    if pp == 1:
        return [(arch.num_hidden_layers, weights, kv_weights)]
    embed = arch.vocab_size * arch.hidden_size * (2 if spec.quantization else dtype_bytes)
    copies = 1 if arch.tie_word_embeddings else 2
    per_layer = (weights - copies * embed) // arch.num_hidden_layers
    stages = pipeline_stages(arch.num_hidden_layers, pp)
    return [(n, n * per_layer + embed * ((i == 0) + (i == pp - 1)),
             kv_weights * n // arch.num_hidden_layers) for i, n in enumerate(stages)]


class _Attempt(BaseModel):
    model_config = ConfigDict(frozen=True)

    tp: int
    pp: int = 1
    # Decoder layers of the stage that limits the KV cache (all of them without pipeline
    # parallelism).
    layers: int
    # The largest share of the weights a GPU holds, and that of the limiting stage's GPUs.
    weights_per_gpu: int
    stage_weights_per_gpu: int
    budget_bytes: float
    kv_bytes: int
    tokens: int
    max_model_len: int
    fits: bool
    problem: str | None


def _round_len(tokens: int) -> int:
    """A readable context length: down to a multiple of 1024 (256 below 4096)."""
    step = 1024 if tokens >= 4096 else 256
    return tokens // step * step


def _attempt(spec: ModelSpec, tp: int, weights: int, memory_mib: int, utilization: float,
             dtype_bytes: int, cap: int, wanted: int | None, min_len: int,
             pp: int = 1) -> _Attempt:
    """Every GPU of a stage holds 1/tp of it; vLLM sizes the KV cache by the stage that
    holds the fewest tokens (the smallest block count of all workers)."""
    arch = spec.architecture
    stages = []
    for layers, stage_bytes, kv_weights in _stage_weights(spec, weights, pp, dtype_bytes):
        per_gpu = weights_per_gpu(arch, stage_bytes, tp, kv_weights)
        budget = memory_mib * MIB * utilization - per_gpu - reserve_gib(tp, pp) * GIB
        kv = kv_bytes_per_token(arch, tp, dtype_bytes, layers)
        tokens = max(0, int(budget // (kv * BLOCK_TOKENS)) * BLOCK_TOKENS)
        stages.append((tokens, budget, layers, per_gpu, kv))
    tokens, budget, layers, stage_per_gpu, kv = min(stages,
                                                    key=lambda stage: (stage[0], stage[1]))
    per_gpu = max(stage[3] for stage in stages)
    if wanted is not None:
        fits = budget > 0 and tokens >= wanted
        length = wanted if fits else min(cap, _round_len(tokens))
        problem = None if fits else (
            "the weights do not fit" if budget <= 0 else
            f"the KV cache holds {tokens} tokens, fewer than max_model_len {wanted}")
    else:
        length = cap if tokens >= cap else _round_len(tokens)
        fits = budget > 0 and length >= min(min_len, cap)
        problem = None if fits else (
            "the weights do not fit" if budget <= 0 else
            f"the KV cache holds only {tokens} tokens (< {min(min_len, cap)})")
    return _Attempt(tp=tp, pp=pp, layers=layers, weights_per_gpu=per_gpu,
                    stage_weights_per_gpu=stage_per_gpu, budget_bytes=budget, kv_bytes=kv,
                    tokens=tokens, max_model_len=length, fits=fits, problem=problem)


def _resolve_model(model: str | ModelSpec, catalog: Catalog | None) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if catalog is None:
        raise FitError(f"model '{model}': pass catalog= (knowledge.load_knowledge().catalog) "
                       "or a ModelSpec (model_from_config)")
    row = catalog.models.get(model)
    if row is None:
        close = difflib.get_close_matches(model, list(catalog.models), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FitError(f"model '{model}' is not in the catalog (orchestrator/data/catalog.yml)"
                       f"{hint}")
    return spec_from_catalog(model, row)


def _resolve_gpu(gpu: str | GpuModel, gpus: GpuTable | None) -> tuple[str, GpuModel]:
    if isinstance(gpu, GpuModel):
        return gpu.match, gpu
    if gpus is None:
        raise FitError(f"GPU '{gpu}': pass gpus= (compat.load_gpu_table())")
    return gpu, gpus.find(gpu)


def gpus_from_facts(facts: GpuFacts, origin: str) -> tuple[str, int, int | None]:
    """The GPU name, count and memory.total in MiB (None when the output has none, e.g.
    `nvidia-smi -L`) that a host's saved nvidia-smi output shows; `origin` names the file."""
    if facts.error is not None:
        message = " ".join(facts.error.message.split())
        raise FitError(f"{origin}: nvidia-smi reports {facts.error.kind} ({message}): "
                       f"{facts.error.next_step}")
    if not facts.gpus:
        raise FitError(f"{origin}: no GPU found in this nvidia-smi output")
    names = sorted({g.name for g in facts.gpus})
    if len(names) > 1:
        raise FitError(f"{origin}: GPUs of different kinds ({', '.join(names)}); the fit "
                       "sizes identical GPUs")
    # The smallest, should one GPU report less (memory retired after ECC errors).
    sizes = [g.memory_total_mib for g in facts.gpus if g.memory_total_mib is not None]
    return names[0], len(facts.gpus), min(sizes) if sizes else None


def check_same_gpu(given: str, found: str, gpus: GpuTable, origin: str) -> None:
    """Refuse a GPU name that is not the one found in `origin`: the same words, or the same
    row of the GPU table ("Tesla T4" and "T4")."""
    def words(name: str) -> set[str]:
        return set(name.upper().replace("-", " ").split())

    if words(given) == words(found):
        return
    try:
        same = gpus.find(given) == gpus.find(found)
    except CompatError:
        same = False
    if not same:
        raise FitError(f"the GPU given, '{given}', is not the GPU found in {origin}, "
                       f"'{found}'")


def fit(model: str | ModelSpec, gpu: str | GpuModel, count: int = 1,
        max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, *,
        catalog: Catalog | None = None, gpus: GpuTable | None = None,
        memory_mib: int | None = None, memory_source: str = "measured on the host",
        long_context: bool = False, engine_min_compute_capability: str | None = None,
        min_model_len: int = MIN_MODEL_LEN, suggest: bool = True, nodes: int = 1) -> FitResult:
    """Fit `model` on `count` identical GPUs of one host under vLLM; with `nodes` > 1, on
    `count` GPUs in each of `nodes` identical hosts, one instance across them.

    Chooses the smallest tensor parallel size (<= count, valid for the architecture) whose
    weights and a KV cache of max_model_len tokens fit in each GPU's
    `memory x gpu_memory_utilization - reserve`; without max_model_len, the largest context
    that fits, capped at the model's max_position_embeddings (its documented YaRN context
    with long_context=True). `memory_mib`, nvidia-smi's memory.total measured on the host,
    wins over the GPU table's; `memory_source` says where it was read, for the reasons.
    `engine_min_compute_capability` is the pinned vLLM's
    floor (cuda_compat.yml). When it does not fit, `suggestions` name concrete alternatives:
    more GPUs, a quantized variant of the model, a shorter context.

    Across hosts the layout is vLLM's documented multi-node one: tensor parallel inside a
    host (its GPU count, or the largest valid size below it), pipeline parallel across the
    hosts (one stage per host); the weights are split over tp x pp GPUs.
    """
    if count < 1:
        raise FitError(f"GPU count must be at least 1 (got {count})")
    if nodes < 1:
        raise FitError(f"the number of hosts must be at least 1 (got {nodes})")
    if not 0 < gpu_memory_utilization <= 1:
        raise FitError(f"gpu_memory_utilization must be in (0, 1] (got {gpu_memory_utilization})")
    if max_model_len is not None and max_model_len < 1:
        raise FitError(f"max_model_len must be positive (got {max_model_len})")
    if memory_mib is not None and memory_mib < 1:
        raise FitError(f"GPU memory must be a positive number of MiB (got {memory_mib})")
    spec = _resolve_model(model, catalog)
    if nodes > spec.architecture.num_hidden_layers:
        raise FitError(f"{nodes} hosts: {spec.name} has only "
                       f"{spec.architecture.num_hidden_layers} layers to split into pipeline "
                       "stages, one per host")
    gpu_name, gpu_row = _resolve_gpu(gpu, gpus)
    memory = memory_mib if memory_mib is not None else gpu_row.memory_mib
    cc = gpu_row.compute_capability
    arch = spec.architecture
    dtype, dtype_reason = serving_dtype(spec, cc)
    dtype_bytes = BYTES_PER_PARAM[dtype]
    weights = weight_bytes(arch, dtype if spec.quantization is None else spec.dtype,
                           spec.quantization)
    quant = spec.quantization.label if spec.quantization else None
    source = memory_source if memory_mib is not None else TABLE_MEMORY
    where = f"{nodes} hosts x {count}x {gpu_name}" if nodes > 1 else f"{count}x {gpu_name}"
    reasons = [f"{where}: compute capability {cc}, {memory} MiB each ({source})",
               f"dtype {dtype}: {dtype_reason}"]
    weights_text = (f"weights {weights / GIB:.2f} GiB: {arch.param_count:,} parameters"
                    + (f", {quant} ({spec.quantization.bits}-bit linear layers, groups of "
                       f"{spec.quantization.group_size}, float16 embeddings)"
                       if spec.quantization else f" x {dtype_bytes} bytes"))
    reasons.append(weights_text)

    def result(fits: bool, attempt: _Attempt | None, why: list[str],
               suggestions: list[str] | None = None) -> FitResult:
        tp = attempt.tp if attempt else 1
        return FitResult(
            model=spec.name, gpu=gpu_name, count=count, nodes=nodes, fits=fits,
            tensor_parallel=tp, pipeline_parallel=nodes,
            dtype=dtype, quantization=quant, weights_gib=round(weights / GIB, 2),
            weights_per_gpu_gib=round((attempt.weights_per_gpu if attempt else weights) / GIB, 2),
            kv_cache_gib=round(max(0.0, attempt.budget_bytes) / GIB, 2) if attempt else 0.0,
            kv_cache_tokens=attempt.tokens if attempt else 0,
            kv_bytes_per_token=attempt.kv_bytes if attempt else kv_bytes_per_token(arch, 1,
                                                                                   dtype_bytes),
            max_model_len=attempt.max_model_len if attempt and fits else 0,
            gpu_memory_mib=memory, gpu_memory_utilization=gpu_memory_utilization,
            reserve_gib=reserve_gib(tp, nodes), reasons=reasons + why,
            suggestions=suggestions or [])

    def engine_floor_problem() -> str | None:
        if engine_min_compute_capability and _cc(cc) < _cc(engine_min_compute_capability):
            return (f"compute capability {cc} is below the pinned vLLM's minimum "
                    f"{engine_min_compute_capability}")
        q = spec.quantization
        if q is not None and q.min_compute_capability and _cc(cc) < _cc(q.min_compute_capability):
            return (f"vLLM's {q.method.upper()} kernels need compute capability >= "
                    f"{q.min_compute_capability}; {gpu_name} has {cc}")
        return None

    if (problem := engine_floor_problem()) is not None:
        floor_suggestions: list[str] = []
        if suggest:
            floor_suggestions = _siblings(spec, gpu_row, gpu_name, count, max_model_len,
                                          gpu_memory_utilization, catalog, memory_mib,
                                          memory_source, long_context,
                                          engine_min_compute_capability, min_model_len, nodes)
            floor_suggestions.append(f"a GPU that meets the compute capability floor ({problem})")
        return result(False, None, [f"does not fit: {problem}"], floor_suggestions)

    cap = spec.max_context if long_context else spec.max_position_embeddings
    if max_model_len is not None and max_model_len > cap:
        longer = (f"; the model card documents {spec.max_context} with YaRN (factor "
                  f"{spec.yarn_factor:g}): pass long_context=True"
                  if spec.yarn_factor and not long_context and max_model_len <= spec.max_context
                  else "")
        return result(False, None, [f"does not fit: max_model_len {max_model_len} exceeds the "
                                    f"model's context {cap}{longer}"],
                      [f"max_model_len {cap} (the model's context)"] if suggest else [])
    context_reason = (f"context capped at {cap}: " + (
        f"the model card's YaRN context (rope_scaling factor {spec.yarn_factor:g}; add it to "
        "config.json as the card says)" if long_context and spec.yarn_factor
        else "max_position_embeddings in config.json"
        + (f"; YaRN reaches {spec.max_context} (long_context=True)"
           if spec.yarn_factor and not long_context else "")))

    limit = min(count, spec.tensor_parallel_max or count)
    attempts: list[_Attempt] = []
    skipped: list[str] = []
    if nodes > 1:
        # One layout, not a search: every host's GPUs in tensor parallel (the largest valid
        # size), one pipeline stage per host.
        for tp in range(limit, 0, -1):
            if (problem := tensor_parallel_problem(arch, tp, spec.quantization)) is None:
                break
            skipped.append(f"tensor parallel {tp}: {problem}")
        else:
            return result(False, None, [*skipped, f"does not fit: no tensor parallel size "
                                                  f"<= {count} is valid"])
        attempt = _attempt(spec, tp, weights, memory, gpu_memory_utilization, dtype_bytes, cap,
                           max_model_len, min_model_len, pp=nodes)
        budget = _budget_reasons(spec, attempt, memory, gpu_memory_utilization, dtype_bytes,
                                 cap, context_reason, count)
        if attempt.fits:
            return result(True, attempt, [*skipped, *budget])
        return result(False, attempt, [*skipped, *budget,
                                       f"does not fit on {where}: {attempt.problem}"],
                      _suggest(spec, gpu_row, gpu_name, count, max_model_len,
                               gpu_memory_utilization, catalog, memory_mib, memory_source,
                               long_context, engine_min_compute_capability, min_model_len,
                               attempt, cap, nodes) if suggest else [])
    for tp in range(1, limit + 1):
        problem = tensor_parallel_problem(arch, tp, spec.quantization)
        if problem is not None:
            skipped.append(f"tensor parallel {tp}: {problem}")
            continue
        attempt = _attempt(spec, tp, weights, memory, gpu_memory_utilization, dtype_bytes, cap,
                           max_model_len, min_model_len)
        attempts.append(attempt)
        if attempt.fits:
            return result(True, attempt, [*skipped, *_budget_reasons(
                spec, attempt, memory, gpu_memory_utilization, dtype_bytes, cap,
                context_reason, count)])
        skipped.append(f"tensor parallel {tp}: {attempt.problem} "
                       f"({attempt.weights_per_gpu / GIB:.2f} GiB of weights per GPU, "
                       f"{attempt.budget_bytes / GIB:.2f} GiB left for the KV cache)")

    best = attempts[-1] if attempts else None
    # The last attempt is detailed below; drop its one-line summary.
    why = list(skipped)
    if best is not None:
        summary = f"tensor parallel {best.tp}: {best.problem}"
        why = [line for line in skipped if not line.startswith(summary)]
    if spec.tensor_parallel_max and spec.tensor_parallel_max < count:
        why.append(f"tensor parallel limited to {spec.tensor_parallel_max}: "
                   + "; ".join(spec.known_issues))
    if best is not None:
        why += _budget_reasons(spec, best, memory, gpu_memory_utilization, dtype_bytes, cap,
                               context_reason, count)
        why.append(f"does not fit on {count}x {gpu_name}: {best.problem}")
    else:
        why.append(f"does not fit: no tensor parallel size <= {count} is valid")
    suggestions: list[str] = []
    if suggest:
        suggestions = _suggest(spec, gpu_row, gpu_name, count, max_model_len,
                               gpu_memory_utilization, catalog, memory_mib, memory_source,
                               long_context, engine_min_compute_capability, min_model_len,
                               best, cap)
    return result(False, best, why, suggestions)


def _budget_reasons(spec: ModelSpec, attempt: _Attempt, memory: int, utilization: float,
                    dtype_bytes: int, cap: int, context_reason: str, count: int) -> list[str]:
    arch = spec.architecture
    tp, pp = attempt.tp, attempt.pp
    kv_heads = max(1, arch.num_key_value_heads // tp)
    if pp > 1:
        stages = pipeline_stages(arch.num_hidden_layers, pp)
        layout = (f"tensor parallel {tp} in each host x pipeline parallel {pp} across the "
                  f"hosts (vLLM's multi-node layout): {arch.num_attention_heads} attention "
                  f"heads, {arch.num_key_value_heads} KV heads ({kv_heads} per GPU); layers per "
                  f"stage {', '.join(map(str, stages))}, the first stage with the embedding, "
                  f"the last with the LM head; {attempt.weights_per_gpu / GIB:.2f} GiB of "
                  "weights per GPU (the largest stage)")
        weights_text = "weights (the stage with the fewest KV cache tokens)"
    else:
        layout = (f"tensor parallel {tp}" + (
            " (the smallest size that fits)" if attempt.fits and tp > 1 else "")
            + f": {arch.num_attention_heads} attention heads, {arch.num_key_value_heads} KV "
            "heads" + (f" ({kv_heads} per GPU)" if tp > 1 else "")
            + f"; {attempt.weights_per_gpu / GIB:.2f} GiB of weights per GPU")
        weights_text = "weights"
    lines = [layout,
        f"vLLM budget per GPU: {memory} MiB ({memory / 1024:.2f} GiB) x {utilization:g} - "
        f"{attempt.stage_weights_per_gpu / GIB:.2f} GiB {weights_text} - "
        f"{reserve_gib(tp, pp):g} GiB reserve (activations, CUDA graphs, "
        f"non-torch{', NCCL' if tp * pp > 1 else ''}) = "
        f"{attempt.budget_bytes / GIB:.2f} GiB for the KV cache",
        f"KV cache: 2 x {attempt.layers} layers x {kv_heads} KV heads x "
        f"{arch.head_dim} x {dtype_bytes} bytes = {attempt.kv_bytes:,} bytes per token -> "
        f"{attempt.tokens:,} tokens"]
    if attempt.fits:
        lines.append(f"max_model_len {attempt.max_model_len}: " + (
            context_reason if attempt.max_model_len >= cap else
            f"the largest (rounded) length the KV cache holds; {context_reason}"))
        if count > tp:
            lines.append(f"{count - tp} of {count} GPUs " + ("of each host " if pp > 1 else "")
                         + "left unused by this deployment")
    return lines


def _quantized_siblings(spec: ModelSpec, catalog: Catalog | None) -> list[str]:
    """Catalog rows quantized from the same model (AWQ first, rows with known issues last)."""
    if catalog is None:
        return []
    row = catalog.models.get(spec.name)
    source = row.quantized_from if row is not None and row.quantized_from else spec.name
    names = [name for name, other in catalog.models.items()
             if other.quantized_from == source and name != spec.name]
    def rank(name: str) -> tuple[bool, int, int]:
        q = catalog.models[name].quantization
        return (bool(_open_issues(catalog, name)), 0 if q is None or q.method == "awq" else 1,
                q.bits if q else 0)

    return sorted(names, key=rank)


def _siblings(spec: ModelSpec, gpu_row: GpuModel, gpu_name: str, count: int,
              max_model_len: int | None, utilization: float, catalog: Catalog | None,
              memory_mib: int | None, memory_source: str, long_context: bool,
              engine_floor: str | None, min_model_len: int, nodes: int = 1) -> list[str]:
    out = []
    for name in _quantized_siblings(spec, catalog):
        other = fit(name, gpu_row, count, max_model_len, utilization, catalog=catalog,
                    memory_mib=memory_mib, memory_source=memory_source,
                    long_context=long_context,
                    engine_min_compute_capability=engine_floor, min_model_len=min_model_len,
                    suggest=False, nodes=nodes)
        if other.fits:
            out.append(_describe(other, gpu_name, catalog))
    return out


def _open_issues(catalog: Catalog | None, name: str) -> list[str]:
    """Known issues the fit does not already work around (tensor_parallel_max does)."""
    row = catalog.models.get(name) if catalog is not None else None
    if row is None or row.tensor_parallel_max is not None:
        return []
    return list(row.known_issues)


def _describe(other: FitResult, gpu_name: str, catalog: Catalog | None) -> str:
    issues = _open_issues(catalog, other.model)
    where = (f"{other.nodes} hosts x {other.tensor_parallel}x {gpu_name}" if other.nodes > 1
             else f"{other.tensor_parallel}x {gpu_name}")
    return (f"{other.model} ({other.quantization}, {other.weights_gib:.1f} GiB): fits on "
            f"{where} with max_model_len {other.max_model_len}"
            + (f" [known issue: {issues[0]}]" if issues else ""))


def _suggest(spec: ModelSpec, gpu_row: GpuModel, gpu_name: str, count: int,
             max_model_len: int | None, utilization: float, catalog: Catalog | None,
             memory_mib: int | None, memory_source: str, long_context: bool,
             engine_floor: str | None, min_model_len: int, best: _Attempt | None, cap: int,
             nodes: int = 1) -> list[str]:
    suggestions: list[str] = []
    # 1. More GPUs of the same kind: the smallest valid tensor parallel size that fits;
    # across hosts, the fewest more hosts.
    limit = spec.tensor_parallel_max or spec.architecture.num_attention_heads
    for more in range(nodes + 1, min(spec.architecture.num_hidden_layers, 16) + 1
                      if nodes > 1 else 0):
        wider = fit(spec, gpu_row, count, max_model_len, utilization, memory_mib=memory_mib,
                    memory_source=memory_source, long_context=long_context,
                    engine_min_compute_capability=engine_floor, min_model_len=min_model_len,
                    suggest=False, nodes=more)
        if wider.fits:
            suggestions.append(f"{more} hosts x {count}x {gpu_name} (nodes: {more}): "
                               f"max_model_len {wider.max_model_len}")
            break
    for tp in range(count + 1, min(limit, 16) + 1 if nodes == 1 else 0):
        if tensor_parallel_problem(spec.architecture, tp, spec.quantization) is not None:
            continue
        bigger = fit(spec, gpu_row, tp, max_model_len, utilization, memory_mib=memory_mib,
                     memory_source=memory_source, long_context=long_context,
                     engine_min_compute_capability=engine_floor, min_model_len=min_model_len,
                     suggest=False)
        if bigger.fits and bigger.tensor_parallel == tp:
            suggestions.append(f"{tp}x {gpu_name} (tensor_parallel_size {tp}): max_model_len "
                               f"{bigger.max_model_len}")
            break
    # 2. A quantized variant on the GPUs at hand.
    suggestions += _siblings(spec, gpu_row, gpu_name, count, max_model_len, utilization,
                             catalog, memory_mib, memory_source, long_context, engine_floor,
                             min_model_len, nodes)
    # 3. A shorter context, where the weights fit but the KV cache is short.
    if best is not None and best.budget_bytes > 0 and best.tokens >= BLOCK_TOKENS:
        shorter = min(cap, _round_len(best.tokens)) or best.tokens
        on = f"{nodes} hosts x {best.tp}x" if nodes > 1 else f"{best.tp}x"
        suggestions.append(f"max_model_len {shorter} on {on} {gpu_name} (the KV cache "
                           f"holds {best.tokens:,} tokens)")
    if not suggestions:
        on = f"{nodes} hosts x {count}x" if nodes > 1 else f"{count}x"
        suggestions.append(f"nothing in the catalog fits {on} {gpu_name}: a GPU with more "
                           "memory")
    return suggestions
