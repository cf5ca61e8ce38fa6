"""The model catalog (knowledge/data/catalog.yml) against its sources, and the VRAM fit
(orchestrator/plan/fit.py).

Literal values below are copied from these sources:
- [card] Qwen's model cards (https://huggingface.co/Qwen/<id>; read from the copies in
  ZHUI/paddlenlp_model_readme, Qwen/<id>/index.md): "Number of Parameters", "Number of
  Paramaters (Non-Embedding)", "Number of Layers", "Number of Attention Heads (GQA)",
  "Context Length", "tied word embeddings", the YaRN paragraph ("The current config.json is
  set for context length up to 32,768 tokens", factor 4.0), the LICENSE file size, and the
  "Model Files" list with each safetensors shard's size (GiB, printed as "GB").
- [cfg] config.json: hidden_size, intermediate_size, vocab_size; Qwen2.5-72B-Instruct's as
  printed in the log of vllm-project/vllm issue #8691; the 72B AWQ/GPTQ checkpoints'
  intermediate size 29696 from Qwen's GPTQ docs (Troubleshooting).
- [bench] Qwen docs, "Qwen2.5 Speed Benchmark" (QwenLM/Qwen2.5,
  docs/source/benchmark/speed_benchmark.rst): the transformers tables' "GPU Memory(GB)" at
  input length 1, A100 80GB, per quantization and GPU count.
- [vllm] vLLM logs "Loading model weights took 14.24 GB" for Qwen2.5-7B-Instruct in bf16
  (shared/seeds/README.md); vllm/worker/model_runner.py prints
  `self.model_memory_usage / float(2**30)` there, i.e. GiB. vllm/v1/worker/gpu_worker.py
  refuses bfloat16 below compute capability 8.0; QKVParallelLinear replicates KV heads when
  tp > KV heads; quantized linear layers need whole groups per shard.
- [quant] Qwen docs, Quantization (GPTQ page): the 72B padding (29568 / 128 = 231) and the
  Known Issues of 32B-GPTQ-Int4 (multi-GPU) and 72B-GPTQ-Int4 (does not stop).
- [vllm-q] vLLM docs, Quantization > Supported Hardware: AWQ from SM 7.5, GPTQ from SM 7.0.
- [hub] the ms-swift model registry (modelscope/ms-swift, swift/llm/model/model/qwen.py):
  the quantized Qwen2.5 and Qwen2.5-Coder Instruct ids on both hubs; Math has none.
- GPU memory as nvidia-smi reports it (memory.total): the real outputs in tests/data/nvidia-smi
  (copies of shared/fixtures/nvidia-smi, see its SOURCES.md) and the threads data/gpus.yml cites.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from orchestrator.facts.nvidia_smi import parse_nvidia_smi
from orchestrator.knowledge.catalog import Catalog, load_knowledge, weight_bytes
from orchestrator.knowledge.compat import CompatError, GpuModel, load_gpu_table
from orchestrator.plan.fit import (
    BLOCK_TOKENS,
    RESERVE_GIB,
    TENSOR_PARALLEL_RESERVE_GIB,
    FitError,
    FitResult,
    check_same_gpu,
    fit,
    gpus_from_facts,
    kv_bytes_per_token,
    model_from_config,
    pipeline_stages,
    spec_from_catalog,
    tensor_parallel_problem,
)

REPO = Path(__file__).resolve().parents[2]
SMI = REPO / "tests" / "data" / "nvidia-smi"
GIB = 2**30
MIB = 2**20
SIZES = ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_knowledge().catalog


@pytest.fixture(scope="module")
def run(catalog: Catalog):
    gpus = load_gpu_table()

    def _run(model: Any, gpu: Any, count: int = 1, **kwargs: Any) -> FitResult:
        return fit(model, gpu, count, catalog=catalog, gpus=gpus, **kwargs)
    return _run


def smi_memory_mib(fixture: str) -> int:
    facts = parse_nvidia_smi((SMI / fixture).read_text(encoding="utf-8"))
    total = facts.gpus[0].memory_total_mib
    assert total is not None
    return total


# --- the catalog against its sources ----------------------------------------------------------

# [card]: params (B), non-embedding (B), layers, Q heads, KV heads, card context, license
# (LICENSE 11.1 KB Apache-2.0, 7.2 KB Qwen Research, 6.8 KB Qwen), tied embeddings.
CARDS = {
    "Qwen/Qwen2.5-0.5B-Instruct": (0.49, 0.36, 24, 14, 2, 32768, "apache-2.0", True),
    "Qwen/Qwen2.5-1.5B-Instruct": (1.54, 1.31, 28, 12, 2, 32768, "apache-2.0", True),
    "Qwen/Qwen2.5-3B-Instruct": (3.09, 2.77, 36, 16, 2, 32768, "qwen-research", True),
    "Qwen/Qwen2.5-3B": (3.09, 2.77, 36, 16, 2, 32768, "qwen-research", True),
    "Qwen/Qwen2.5-7B-Instruct": (7.61, 6.53, 28, 28, 4, 131072, "apache-2.0", False),
    "Qwen/Qwen2.5-7B": (7.61, 6.53, 28, 28, 4, 131072, "apache-2.0", False),
    "Qwen/Qwen2.5-14B-Instruct": (14.7, 13.1, 48, 40, 8, 131072, "apache-2.0", False),
    "Qwen/Qwen2.5-32B-Instruct": (32.5, 31.0, 64, 40, 8, 131072, "apache-2.0", False),
    "Qwen/Qwen2.5-72B-Instruct": (72.7, 70.0, 80, 64, 8, 131072, "qwen", False),
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": (0.49, 0.36, 24, 14, 2, 32768, "apache-2.0", True),
    "Qwen/Qwen2.5-Coder-3B-Instruct": (3.09, 2.77, 36, 16, 2, 32768, "qwen-research", True),
    "Qwen/Qwen2.5-Coder-7B-Instruct": (7.61, 6.53, 28, 28, 4, 131072, "apache-2.0", False),
    "Qwen/Qwen2.5-Coder-32B-Instruct": (32.5, 31.0, 64, 40, 8, 131072, "apache-2.0", False),
}


@pytest.mark.parametrize("name", CARDS)
def test_rows_match_their_model_cards(catalog: Catalog, name: str) -> None:
    params, non_embedding, layers, heads, kv_heads, context, license_, tied = CARDS[name]
    row = catalog.models[name]
    assert row.params_billion == params
    assert row.non_embedding_params_billion == non_embedding
    assert row.architecture.num_hidden_layers == layers
    assert row.architecture.num_attention_heads == heads
    assert row.architecture.num_key_value_heads == kv_heads
    assert row.max_context == context
    assert row.license == license_
    assert row.architecture.tie_word_embeddings is tied
    assert row.architecture.attention_bias  # "Attention QKV bias"


# [cfg]: hidden_size, intermediate_size, vocab_size, head_dim (hidden / heads).
CONFIGS = {
    "0.5B": (896, 4864, 151936, 64),
    "1.5B": (1536, 8960, 151936, 128),
    "3B": (2048, 11008, 151936, 128),
    "7B": (3584, 18944, 152064, 128),
    "14B": (5120, 13824, 152064, 128),
    "32B": (5120, 27648, 152064, 128),
    "72B": (8192, 29568, 152064, 128),
}


@pytest.mark.parametrize("size", SIZES)
def test_architecture_matches_config_json(catalog: Catalog, size: str) -> None:
    hidden, intermediate, vocab, head_dim = CONFIGS[size]
    arch = catalog.models[f"Qwen/Qwen2.5-{size}-Instruct"].architecture
    assert (arch.hidden_size, arch.intermediate_size, arch.vocab_size, arch.head_dim) == (
        hidden, intermediate, vocab, head_dim)
    assert arch.head_dim * arch.num_attention_heads == arch.hidden_size


@pytest.mark.parametrize("size", SIZES)
def test_parameters_computed_from_the_architecture_match_the_card(catalog: Catalog,
                                                                  size: str) -> None:
    row = catalog.models[f"Qwen/Qwen2.5-{size}-Instruct"]
    arch = row.architecture
    assert arch.param_count / 1e9 == pytest.approx(row.params_billion, rel=0.02)
    assert arch.non_embedding_params / 1e9 == pytest.approx(row.non_embedding_params_billion,
                                                            rel=0.02)


def test_exact_parameter_counts() -> None:
    """Qwen2.5-7B from its architecture, term by term (28 layers of q/k/v with bias, o, SwiGLU
    MLP, two norms; final norm; untied embedding and LM head): 7,615,616,512, which the card
    rounds to 7.61B (non-embedding 6,525,621,760 -> 6.53B)."""
    arch = load_knowledge().catalog.models["Qwen/Qwen2.5-7B-Instruct"].architecture
    layer = (3584 * 3584 + 3584) + 2 * (3584 * 512 + 512) + 3584 * 3584 \
        + 3 * 3584 * 18944 + 2 * 3584
    assert arch.layer_params == layer
    assert arch.non_embedding_params == 28 * layer + 3584 == 6_525_621_760
    assert arch.param_count == 7_615_616_512


# [card] "Model Files": shard sizes in GiB (printed "GB", 0.1 precision; the 0.5B's single
# file "942.3 MB" is MiB). Unquantized bf16 rows must agree within the printing's rounding.
SHARDS = {
    "Qwen/Qwen2.5-0.5B-Instruct": [942.3 / 1024],
    "Qwen/Qwen2.5-3B-Instruct": [3.7, 2.1],
    "Qwen/Qwen2.5-7B-Instruct": [3.7, 3.6, 3.6, 3.3],
    "Qwen/Qwen2.5-7B": [3.7, 3.6, 3.6, 3.3],
    "Qwen/Qwen2.5-32B-Instruct": [3.6] * 16 + [2.9],
    "Qwen/Qwen2.5-72B-Instruct": [3.5, 3.7, 3.6, 3.7, 3.7, 3.7, 3.6, 3.7, 3.7, 3.7, 3.6, 3.7,
                                  3.7, 3.7, 3.6, 3.7, 3.7, 3.7, 3.6, 3.7, 3.7, 3.7, 3.6, 3.7,
                                  3.7, 3.7, 3.6, 3.7, 3.7, 3.7, 3.6, 3.7, 3.7, 3.7, 3.6, 3.7,
                                  3.2],
    "Qwen/Qwen2.5-Coder-7B-Instruct": [4.5, 4.6, 4.0, 1.0],
    "Qwen/Qwen2.5-Coder-32B-Instruct": [4.6] + [4.5] * 12 + [2.0],
    "Qwen/Qwen2.5-Math-1.5B-Instruct": [2.9],
    "Qwen/Qwen2.5-Math-7B-Instruct": [3.7, 3.6, 3.6, 3.3],
    "Qwen/Qwen2.5-Math-72B-Instruct": [3.5, 3.7, 3.6, 3.7, 3.7, 3.7, 3.6, 3.7, 3.7, 3.7, 3.6,
                                       3.7, 3.7, 3.7, 3.6, 3.7, 3.7, 3.7, 3.6, 3.7, 3.7, 3.7,
                                       3.6, 3.7, 3.7, 3.7, 3.6, 3.7, 3.7, 3.7, 3.6, 3.7, 3.7,
                                       3.7, 3.6, 3.7, 3.2],
}


@pytest.mark.parametrize("name", SHARDS)
def test_bf16_weights_match_the_published_checkpoint(catalog: Catalog, name: str) -> None:
    row = catalog.models[name]
    computed = weight_bytes(row.architecture, row.dtype, None) / GIB
    shards = SHARDS[name]
    assert computed == pytest.approx(sum(shards), abs=0.05 * len(shards) + 0.01)
    # The row's own figure (card count x 2 bytes) stays within 1% of it.
    assert row.weights_gib == pytest.approx(computed, rel=0.01)


# [bench] transformers "GPU Memory(GB)" at input length 1: (GPUs, GiB) for BF16 and each
# quantized variant. The BF16 row's excess over its weights (CUDA context, buffers) is
# taken as the same per-GPU overhead for the quantized rows. AWQ on the tied 0.5B-3B
# models is left out: transformers reports it 0.2-0.45 GiB above GPTQ-Int4 there.
BENCH: dict[str, dict[str, tuple[int, float]]] = {
    "0.5B": {"BF16": (1, 0.97), "GPTQ-Int8": (1, 0.64), "GPTQ-Int4": (1, 0.48)},
    "1.5B": {"BF16": (1, 2.95), "GPTQ-Int8": (1, 1.82), "GPTQ-Int4": (1, 1.18)},
    "3B": {"BF16": (1, 5.95), "GPTQ-Int8": (1, 3.38), "GPTQ-Int4": (1, 2.06)},
    "7B": {"BF16": (1, 14.38), "GPTQ-Int8": (1, 8.42), "GPTQ-Int4": (1, 5.52), "AWQ": (1, 5.39)},
    "14B": {"BF16": (1, 28.08), "GPTQ-Int8": (1, 16.11), "GPTQ-Int4": (1, 9.94),
            "AWQ": (1, 9.79)},
    "32B": {"BF16": (1, 61.58), "GPTQ-Int8": (1, 33.56), "GPTQ-Int4": (1, 18.94),
            "AWQ": (1, 18.67)},
    "72B": {"BF16": (2, 136.20), "GPTQ-Int8": (2, 72.61), "GPTQ-Int4": (1, 39.91),
            "AWQ": (1, 39.44)},
}


@pytest.mark.parametrize("size", SIZES)
def test_quantized_weights_match_qwens_memory_benchmark(catalog: Catalog, size: str) -> None:
    base = catalog.models[f"Qwen/Qwen2.5-{size}-Instruct"]
    bf16_gpus, bf16_memory = BENCH[size]["BF16"]
    overhead = (bf16_memory - weight_bytes(base.architecture, "bfloat16", None) / GIB) / bf16_gpus
    assert 0 < overhead < 0.6
    for label, (gpus, measured) in BENCH[size].items():
        if label == "BF16":
            continue
        row = catalog.models[f"Qwen/Qwen2.5-{size}-Instruct-{label}"]
        assert row.quantization is not None and row.quantization.label == label
        assert row.weights_gib + overhead * gpus == pytest.approx(measured, rel=0.04), label


def test_seven_b_weights_agree_with_vllms_log(catalog: Catalog, run) -> None:
    """[vllm] "Loading model weights took 14.24 GB" is bytes / 2**30: 7,615,616,512 x 2 bytes
    is 14.19 GiB (within 0.5%), while in decimal GB it would be 15.23."""
    logged = 14.24
    result = run("Qwen/Qwen2.5-7B-Instruct", "A100 80GB")
    assert result.weights_gib == pytest.approx(logged, rel=0.01)
    assert catalog.models["Qwen/Qwen2.5-7B-Instruct"].weights_gib == pytest.approx(logged,
                                                                                   rel=0.01)
    decimal_gb = 7_615_616_512 * 2 / 1e9
    assert decimal_gb == pytest.approx(15.23, abs=0.01)
    assert decimal_gb != pytest.approx(logged, rel=0.05)


def test_the_family_is_complete(catalog: Catalog) -> None:
    models = catalog.models
    for size in SIZES:
        assert f"Qwen/Qwen2.5-{size}" in models
        instruct = f"Qwen/Qwen2.5-{size}-Instruct"
        assert models[instruct].gguf_repo == f"{instruct}-GGUF"
        assert models[instruct].ollama_tag == f"qwen2.5:{size.lower()}"
        for suffix in ("AWQ", "GPTQ-Int4", "GPTQ-Int8"):
            assert models[f"{instruct}-{suffix}"].quantized_from == instruct
    for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B"):
        coder = f"Qwen/Qwen2.5-Coder-{size}-Instruct"
        assert models[coder].ollama_tag == f"qwen2.5-coder:{size.lower()}"
        assert models[coder].architecture == models[f"Qwen/Qwen2.5-{size}-Instruct"].architecture
        for suffix in ("AWQ", "GPTQ-Int4", "GPTQ-Int8"):
            assert models[f"{coder}-{suffix}"].quantized_from == coder
    math = [name for name in models if "-Math-" in name]
    assert sorted(math) == ["Qwen/Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-Math-72B-Instruct",
                            "Qwen/Qwen2.5-Math-7B-Instruct"]
    assert not any("Math" in (row.quantized_from or "") for row in models.values())
    assert all(models[name].max_position_embeddings == 4096 for name in math)
    assert "Qwen/Qwen2.5-4B-Instruct" not in models  # the tutorials' "4B" does not exist


def test_rows_carry_ids_formats_and_context(catalog: Catalog) -> None:
    for name, row in catalog.models.items():
        assert row.hf_id == row.modelscope_id == name
        assert row.max_context >= row.max_position_embeddings
        if row.quantization is None:
            assert row.dtype == "bfloat16"
            continue
        assert row.dtype == "float16"
        assert row.quantization.group_size == 128
        assert (row.quantization.method, row.quantization.bits) in {("awq", 4), ("gptq", 4),
                                                                    ("gptq", 8)}
        assert row.ollama_tag is None
        source = catalog.models[row.quantized_from or ""]
        assert (row.params_billion, row.license) == (source.params_billion, source.license)
    instruct = catalog.models["Qwen/Qwen2.5-7B-Instruct"]
    assert (instruct.max_position_embeddings, instruct.max_context, instruct.yarn_factor) == (
        32768, 131072, 4.0)
    assert catalog.models["Qwen/Qwen2.5-7B"].max_position_embeddings == 131072
    # [cfg] the official 72B quantized checkpoints pad the MLP to 29696 = 232 x 128.
    for suffix in ("AWQ", "GPTQ-Int4", "GPTQ-Int8"):
        arch = catalog.models[f"Qwen/Qwen2.5-72B-Instruct-{suffix}"].architecture
        assert arch.intermediate_size == 29696
    floors = {q.method: q.min_compute_capability for q in catalog.quantizations.values()}
    assert floors == {"awq": "7.5", "gptq": "7.0"}


def test_unknown_references_in_the_catalog_are_refused() -> None:
    data = {"schema_version": 2, "architectures": {}, "quantizations": {},
            "models": {"x/y": {"architecture": "nope"}}}
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        Catalog.model_validate(data)


# --- the fit ---------------------------------------------------------------------------------


def test_seven_b_on_one_a10(run) -> None:
    result = run("Qwen/Qwen2.5-7B-Instruct", "A10")
    assert result.fits and result.tensor_parallel == 1 and result.dtype == "bfloat16"
    assert result.quantization is None
    # 23028 MiB (22.49 GiB, nvidia-smi's memory.total) x 0.9 - 14.19 GiB - 2.5 GiB = 3.55 GiB;
    # 57,344 bytes per token.
    assert result.gpu_memory_mib == 23028
    assert result.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57344
    assert result.kv_cache_gib == pytest.approx(3.55, abs=0.01)
    assert result.kv_cache_tokens == 66544
    assert result.max_model_len == 32768  # config.json's max_position_embeddings
    assert result.vllm_args == ["--tensor-parallel-size", "1", "--dtype", "bfloat16",
                                "--max-model-len", "32768", "--gpu-memory-utilization", "0.9"]
    assert any("YaRN reaches 131072" in reason for reason in result.reasons)
    # The card's YaRN context: the KV cache, not the model, is then the limit.
    longer = run("Qwen/Qwen2.5-7B-Instruct", "A10", long_context=True)
    assert longer.fits and longer.max_model_len == 65536


def test_the_table_holds_memory_as_nvidia_smi_reports_it() -> None:
    """Every row read from an output in tests/data/nvidia-smi holds that output's memory.total
    (the smallest, where GPUs differ), and every GPU in the output resolves to that row."""
    table = load_gpu_table()
    from_files = [row for row in table.gpus if row.source.startswith("tests/data/nvidia-smi/")]
    assert len(from_files) >= 6
    for row in from_files:
        facts = parse_nvidia_smi((REPO / row.source).read_text(encoding="utf-8"))
        assert facts.gpus, row.source
        assert {table.find(gpu.name).match for gpu in facts.gpus} == {row.match}, row.source
        assert row.memory_mib == min(gpu.memory_total_mib or 0 for gpu in facts.gpus), row.match
    # The others cite the thread that pastes the reading, or say that they cannot.
    for row in table.gpus:
        assert row.source.startswith(("tests/data/nvidia-smi/", "https://github.com/",
                                      "uncited:")), row.match


def test_l40s_budget_is_what_nvidia_smi_reports_not_the_datasheet(run) -> None:
    """The L40S is sold as 48 GB; nvidia-smi reports 46068 MiB (44.99 GiB). 3 GiB more than
    the GPU has planned a context vLLM cannot start with."""
    result = run("Qwen/Qwen2.5-32B-Instruct-GPTQ-Int8", "NVIDIA L40S")
    assert result.gpu_memory_mib == 46068
    assert result.reasons[0] == ("1x NVIDIA L40S: compute capability 8.9, 46068 MiB each "
                                 "(nvidia-smi memory.total, data/gpus.yml)")
    assert any(line.startswith("vLLM budget per GPU: 46068 MiB (44.99 GiB) x 0.9 - ")
               for line in result.reasons)
    # 46068 MiB x 0.9 - 31.72 GiB of weights - 2.5 GiB: 21,824 tokens, not 32,768.
    assert result.fits and result.max_model_len == 21504 and result.kv_cache_tokens == 21824
    datasheet = run("Qwen/Qwen2.5-32B-Instruct-GPTQ-Int8", "NVIDIA L40S", memory_mib=48 * 1024)
    assert datasheet.max_model_len == 32768  # what 48 GiB would have planned
    # The 72B AWQ does not fit one L40S at all; 48 GiB said it would, with 6k tokens.
    assert not run("Qwen/Qwen2.5-72B-Instruct-AWQ", "NVIDIA L40S").fits
    assert run("Qwen/Qwen2.5-72B-Instruct-AWQ", "NVIDIA L40S", memory_mib=48 * 1024).fits


def test_measured_memory_wins_over_the_table(run) -> None:
    table = run("Qwen/Qwen2.5-7B-Instruct", "A10")
    assert table.gpu_memory_mib == smi_memory_mib("table__A10__550.127.05.txt") == 23028
    # A host whose driver reports less (e.g. memory retired after ECC errors).
    measured = run("Qwen/Qwen2.5-7B-Instruct", "A10", memory_mib=22000)
    assert measured.gpu_memory_mib == 22000
    assert measured.reasons[0] == ("1x A10: compute capability 8.6, 22000 MiB each "
                                   "(measured on the host)")
    assert measured.kv_cache_tokens < table.kv_cache_tokens
    spent = measured.weights_per_gpu_gib + measured.reserve_gib + measured.kv_cache_gib
    assert spent == pytest.approx(22000 / 1024 * 0.9, abs=0.02)
    found = run("Qwen/Qwen2.5-7B-Instruct", "A10", memory_mib=22000,
                memory_source="found in smi.txt")
    assert found.reasons[0].endswith("22000 MiB each (found in smi.txt)")
    with pytest.raises(FitError, match="positive number of MiB"):
        run("Qwen/Qwen2.5-7B-Instruct", "A10", memory_mib=0)


def test_v100_16gb_is_not_the_32gb_one(run) -> None:
    """The table had one V100 row, 32 GB: a 16 GB V100 got twice its memory."""
    table = load_gpu_table()
    assert table.find("Tesla V100-SXM2-16GB").memory_mib == 16160
    assert table.find("Tesla V100-PCIE-16GB").memory_mib == 16160
    assert table.find("Tesla V100-SXM2-32GB").memory_mib == 32480
    # 15.5 GiB of GPTQ-Int8 weights: one 32 GB V100 holds them, one 16 GB V100 cannot.
    model = "Qwen/Qwen2.5-14B-Instruct-GPTQ-Int8"
    assert run(model, "Tesla V100-SXM2-32GB").fits
    small = run(model, "Tesla V100-SXM2-16GB")
    assert not small.fits and "the weights do not fit" in small.reasons[-1]
    assert small.reasons[0].startswith("1x Tesla V100-SXM2-16GB: compute capability 7.0, "
                                       "16160 MiB each")


def test_gpus_from_a_saved_nvidia_smi_output() -> None:
    def read(name: str):
        return parse_nvidia_smi((SMI / name).read_text(encoding="utf-8"))

    assert gpus_from_facts(read("xml__8x-V100S-PCIE-32GB__460.73.01.txt"), "v100s.xml") == (
        "Tesla V100S-PCIE-32GB", 8, 32510)
    assert gpus_from_facts(read("table__A100-SXM4-40GB__570.124.06.txt"), "a100.txt") == (
        "NVIDIA A100-SXM4-40GB", 1, 40960)
    # `nvidia-smi -L` lists GPUs without their memory: the table's is used then.
    assert gpus_from_facts(read("list_mig__H200__590.48.01.txt"), "h200.txt") == (
        "NVIDIA H200", 1, None)
    broken = parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the "
                              "NVIDIA driver. Make sure that the latest NVIDIA driver is "
                              "installed and running.\n")
    with pytest.raises(FitError, match=r"broken\.txt: nvidia-smi reports driver_not_loaded"):
        gpus_from_facts(broken, "broken.txt")
    table = load_gpu_table()
    check_same_gpu("A100", "NVIDIA A100-SXM4-40GB", table, "a100.txt")  # the same row
    check_same_gpu("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB", table, "a100.txt")
    with pytest.raises(FitError, match=r"'NVIDIA A10', is not the GPU found in a100\.txt, "
                                       "'NVIDIA A100-SXM4-40GB'"):
        check_same_gpu("NVIDIA A10", "NVIDIA A100-SXM4-40GB", table, "a100.txt")


def test_seventy_two_b_on_one_h100_refuses_and_suggests(run) -> None:
    result = run("Qwen/Qwen2.5-72B-Instruct", "H100")
    assert not result.fits and result.max_model_len == 0 and result.vllm_args == []
    assert result.weights_gib == pytest.approx(135.43, abs=0.01)
    assert "the weights do not fit" in result.reasons[-1]
    assert result.suggestions[0] == "4x H100 (tensor_parallel_size 4): max_model_len 32768"
    awq = [s for s in result.suggestions if s.startswith("Qwen/Qwen2.5-72B-Instruct-AWQ ")]
    assert awq == ["Qwen/Qwen2.5-72B-Instruct-AWQ (AWQ, 38.7 GiB): fits on 1x H100 with "
                   "max_model_len 32768"]
    gptq4 = [s for s in result.suggestions if "GPTQ-Int4" in s]
    assert gptq4 and "known issue: cannot stop generation" in gptq4[0]
    assert result.suggestions.index(awq[0]) < result.suggestions.index(gptq4[0])


def test_seventy_two_b_on_four_h100s(run) -> None:
    result = run("Qwen/Qwen2.5-72B-Instruct", "H100", 4)
    assert result.fits and result.tensor_parallel == 4 and result.max_model_len == 32768
    assert result.weights_per_gpu_gib == pytest.approx(135.43 / 4, abs=0.01)
    assert result.reserve_gib == RESERVE_GIB + TENSOR_PARALLEL_RESERVE_GIB
    assert result.kv_bytes_per_token == 2 * 80 * 2 * 128 * 2  # 8 KV heads / 4 = 2 per GPU
    assert any(r.startswith("tensor parallel 2: the weights do not fit") for r in result.reasons)
    assert any(r.startswith("tensor parallel 3: 64 attention heads are not divisible")
               for r in result.reasons)
    assert result.vllm_args[:2] == ["--tensor-parallel-size", "4"]
    # Eight GPUs: still the smallest size that fits, four left for something else.
    eight = run("Qwen/Qwen2.5-72B-Instruct", "H100", 8)
    assert eight.tensor_parallel == 4 and "4 of 8 GPUs left unused" in eight.reasons[-1]
    # Two H200s hold what two H100s cannot.
    assert not run("Qwen/Qwen2.5-72B-Instruct", "H100", 2).fits
    assert run("Qwen/Qwen2.5-72B-Instruct", "H200", 2).tensor_parallel == 2


def test_fourteen_b_on_a_t4_refuses_bf16_and_suggests_4bit(run) -> None:
    result = run("Qwen/Qwen2.5-14B-Instruct", "T4")
    assert not result.fits
    assert result.dtype == "float16"
    assert any("bfloat16 needs compute capability >= 8.0" in r and "float16" in r
               for r in result.reasons)
    text = "\n".join(result.suggestions)
    assert "4x T4 (tensor_parallel_size 4)" in text
    assert "Qwen/Qwen2.5-14B-Instruct-AWQ (AWQ, 9.3 GiB): fits on 1x T4" in text
    assert "Qwen/Qwen2.5-14B-Instruct-GPTQ-Int4 (GPTQ-Int4, 9.3 GiB): fits on 1x T4" in text
    assert "GPTQ-Int8" not in text  # 15.5 GiB does not fit in 15360 MiB
    # The T4's 15360 MiB (xml__Tesla-T4 fixture) leaves the AWQ model a short context.
    awq = run("Qwen/Qwen2.5-14B-Instruct-AWQ", "T4")
    assert awq.gpu_memory_mib == smi_memory_mib("xml__Tesla-T4__515.105.01.txt") == 15360
    assert awq.fits and awq.dtype == "float16" and awq.max_model_len == 9216


GPUS = ("T4", "A10", "A100 40GB", "L40S", "A100 80GB", "H100", "H200")  # by memory


@pytest.mark.parametrize("size", SIZES)
def test_the_family_across_gpus(catalog: Catalog, run, size: str) -> None:
    names = [f"Qwen/Qwen2.5-{size}-Instruct", f"Qwen/Qwen2.5-{size}-Instruct-AWQ",
             f"Qwen/Qwen2.5-{size}-Instruct-GPTQ-Int8"]
    for name in names:
        previous = 0
        for gpu in GPUS:  # in order of memory
            result = run(name, gpu)
            row = catalog.models[name]
            if result.fits:
                assert result.max_model_len <= row.max_position_embeddings
                assert result.kv_cache_tokens >= result.max_model_len
                assert result.kv_cache_tokens % BLOCK_TOKENS == 0
                spent = result.weights_per_gpu_gib + result.reserve_gib + result.kv_cache_gib
                assert spent == pytest.approx(result.gpu_memory_mib / 1024 * 0.9, abs=0.02)
                assert result.dtype == ("float16" if gpu == "T4" or row.quantization
                                        else "bfloat16")
            assert result.max_model_len >= previous, (name, gpu)
            previous = result.max_model_len
    fits_on = {gpu for gpu in GPUS if run(f"Qwen/Qwen2.5-{size}-Instruct", gpu).fits}
    expected = {
        "0.5B": set(GPUS), "1.5B": set(GPUS), "3B": set(GPUS),
        "7B": set(GPUS) - {"T4"}, "14B": {"L40S", "A100 40GB", "A100 80GB", "H100", "H200"},
        "32B": {"A100 80GB", "H100", "H200"}, "72B": set(),
    }
    assert fits_on == expected[size]


def test_explicit_context_lengths(run) -> None:
    beyond = run("Qwen/Qwen2.5-7B-Instruct", "A10", max_model_len=131072)
    assert not beyond.fits
    assert "exceeds the model's context 32768" in beyond.reasons[-1]
    assert "long_context=True" in beyond.reasons[-1]
    long = run("Qwen/Qwen2.5-7B-Instruct", "A10", max_model_len=131072, long_context=True)
    assert not long.fits
    assert "fewer than max_model_len 131072" in long.reasons[-1]
    assert long.suggestions[0] == "2x A10 (tensor_parallel_size 2): max_model_len 131072"
    assert "max_model_len 65536 on 1x A10 (the KV cache holds 66,544 tokens)" in long.suggestions
    short = run("Qwen/Qwen2.5-7B-Instruct", "A10", max_model_len=8192)
    assert short.fits and short.max_model_len == 8192
    math = run("Qwen/Qwen2.5-Math-7B-Instruct", "A10")
    assert math.fits and math.max_model_len == 4096


def test_compute_capability_floors(run) -> None:
    # [vllm-q] AWQ needs Turing (7.5); GPTQ runs on Volta (7.0).
    awq = run("Qwen/Qwen2.5-7B-Instruct-AWQ", "V100")
    assert not awq.fits and "AWQ kernels need compute capability >= 7.5" in awq.reasons[-1]
    assert any(s.startswith("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4 ") for s in awq.suggestions)
    assert run("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", "V100").fits
    # The pinned vLLM's own floor (cuda_compat.yml: 0.32.0 needs 7.5) rules the V100 out.
    pinned = run("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", "V100",
                 engine_min_compute_capability="7.5")
    assert not pinned.fits and "below the pinned vLLM's minimum 7.5" in pinned.reasons[-1]


def test_publishers_tensor_parallel_limit(run) -> None:
    """[quant] Known Issues: 32B-Instruct-GPTQ-Int4 is garbled on several GPUs under vLLM."""
    result = run("Qwen/Qwen2.5-32B-Instruct-GPTQ-Int4", "A10", 2, max_model_len=32768)
    assert not result.fits and result.tensor_parallel == 1
    assert any(r.startswith("tensor parallel limited to 1: garbled output") for r in
               result.reasons)
    assert ("Qwen/Qwen2.5-32B-Instruct-AWQ (AWQ, 18.0 GiB): fits on 2x A10 with max_model_len "
            "32768") in result.suggestions


def test_tensor_parallel_rules(catalog: Catalog) -> None:
    def arch(name: str):
        return catalog.models[name].architecture

    seven = arch("Qwen/Qwen2.5-7B-Instruct")
    assert tensor_parallel_problem(seven, 2, None) is None
    assert tensor_parallel_problem(seven, 4, None) is None
    assert "28 attention heads are not divisible by 3" in str(
        tensor_parallel_problem(seven, 3, None))
    assert "not a multiple of the 4 KV heads" in str(tensor_parallel_problem(seven, 7, None))
    assert "intermediate size 18944 is not divisible by 28" in str(
        tensor_parallel_problem(seven, 28, None))
    # 16 > 8 KV heads and a multiple of them: vLLM replicates each KV head on 2 GPUs.
    assert tensor_parallel_problem(arch("Qwen/Qwen2.5-72B-Instruct"), 16, None) is None
    assert "not divisible by 8" in str(tensor_parallel_problem(seven, 8, None))
    # Quantized shards must hold whole 128-wide groups.
    awq = catalog.quantizations["awq"]
    half = arch("Qwen/Qwen2.5-0.5B-Instruct")
    assert "o_proj input 896 / 2 = 448" in str(tensor_parallel_problem(half, 2, awq))
    assert tensor_parallel_problem(half, 2, None) is None
    fourteen = arch("Qwen/Qwen2.5-14B-Instruct")
    assert tensor_parallel_problem(fourteen, 4, awq) is None
    assert "down_proj input 13824 / 8 = 1728" in str(tensor_parallel_problem(fourteen, 8, awq))
    # Qwen's docs: 29568 / 128 = 231 leaves only tensor_parallel_size 1 for a self-quantized
    # 72B; the official checkpoints' 29696 allow 2, 4, 8.
    unpadded, padded = arch("Qwen/Qwen2.5-72B-Instruct"), arch("Qwen/Qwen2.5-72B-Instruct-AWQ")
    for tp in (2, 4, 8):
        assert tensor_parallel_problem(unpadded, tp, awq) is not None
        assert tensor_parallel_problem(padded, tp, awq) is None


def test_kv_cache_per_token(catalog: Catalog) -> None:
    seventy_two = catalog.models["Qwen/Qwen2.5-72B-Instruct"].architecture
    assert kv_bytes_per_token(seventy_two, 1) == 2 * 80 * 8 * 128 * 2 == 327680
    assert kv_bytes_per_token(seventy_two, 8) == 2 * 80 * 1 * 128 * 2
    assert kv_bytes_per_token(seventy_two, 16) == 2 * 80 * 1 * 128 * 2  # replicated, not split
    assert kv_bytes_per_token(seventy_two, 1, dtype_bytes=1) == 163840


def test_fit_uses_the_smallest_valid_tensor_parallel_size(run) -> None:
    result = run("Qwen/Qwen2.5-32B-Instruct", "L40S", 3)  # 40 heads: 3 is not a valid size
    assert result.fits and result.tensor_parallel == 2
    assert run("Qwen/Qwen2.5-7B-Instruct", "A10", 3).tensor_parallel == 1


def test_settings_are_checked(run) -> None:
    with pytest.raises(FitError, match="at least 1"):
        run("Qwen/Qwen2.5-7B-Instruct", "A10", 0)
    with pytest.raises(FitError, match="gpu_memory_utilization"):
        run("Qwen/Qwen2.5-7B-Instruct", "A10", gpu_memory_utilization=1.5)
    with pytest.raises(FitError, match="not in the catalog"):
        run("Qwen/Qwen2.5-4B-Instruct", "A10")
    with pytest.raises(CompatError, match=r"not in data/gpus\.yml"):
        run("Qwen/Qwen2.5-7B-Instruct", "GTX 480")
    with pytest.raises(FitError, match="pass catalog="):
        fit("Qwen/Qwen2.5-7B-Instruct", "A10", gpus=load_gpu_table())
    lower = run("Qwen/Qwen2.5-7B-Instruct", "A10", gpu_memory_utilization=0.8)
    assert lower.kv_cache_gib == pytest.approx(23028 / 1024 * 0.8 - 14.185 - RESERVE_GIB,
                                               abs=0.01)


# --- a model from its config.json --------------------------------------------------------------

# [cfg] Qwen2.5-72B-Instruct's config.json as vLLM issue #8691's log prints it.
CONFIG_72B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 8192,
    "initializer_range": 0.02, "intermediate_size": 29568, "max_position_embeddings": 32768,
    "max_window_layers": 70, "model_type": "qwen2", "num_attention_heads": 64,
    "num_hidden_layers": 80, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.44.2", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}


def test_model_from_config_matches_the_catalog(catalog: Catalog, run) -> None:
    spec = model_from_config(CONFIG_72B, "Qwen2.5-72B-Instruct config.json")
    row = catalog.models["Qwen/Qwen2.5-72B-Instruct"]
    assert spec.architecture == row.architecture
    assert spec.params == 72_706_203_648
    assert spec.params / 1e9 == pytest.approx(72.7, rel=0.02)
    assert (spec.dtype, spec.max_position_embeddings, spec.quantization) == (
        "bfloat16", 32768, None)
    from_config = run(spec, "H100", 4)
    from_catalog = run(spec_from_catalog("Qwen/Qwen2.5-72B-Instruct", row), "H100", 4)
    assert from_config.fits and from_config.tensor_parallel == 4
    assert (from_config.max_model_len, from_config.kv_cache_tokens, from_config.weights_gib) == (
        from_catalog.max_model_len, from_catalog.kv_cache_tokens, from_catalog.weights_gib)


def test_model_from_config_reads_yarn_and_quantization(catalog: Catalog, run) -> None:
    yarn = copy.deepcopy(CONFIG_72B)  # the card's "Processing Long Texts" addition
    yarn["rope_scaling"] = {"factor": 4.0, "original_max_position_embeddings": 32768,
                            "type": "yarn"}
    spec = model_from_config(yarn)
    assert (spec.max_position_embeddings, spec.max_context, spec.yarn_factor) == (
        131072, 131072, 4.0)
    awq = copy.deepcopy(CONFIG_72B)
    awq.update(intermediate_size=29696, torch_dtype="float16",
               quantization_config={"bits": 4, "group_size": 128, "quant_method": "awq",
                                    "version": "gemm", "zero_point": True})
    spec = model_from_config(awq, "72B-AWQ", catalog=catalog)
    assert spec.quantization is not None and spec.quantization.min_compute_capability == "7.5"
    result = run(spec, "H100")
    assert result.fits and result.quantization == "AWQ"
    assert result.weights_gib == pytest.approx(
        catalog.models["Qwen/Qwen2.5-72B-Instruct-AWQ"].weights_gib, abs=0.01)


def test_model_from_config_refuses_what_it_cannot_model() -> None:
    with pytest.raises(FitError, match="mixture-of-experts"):
        model_from_config({**CONFIG_72B, "num_experts": 64})
    with pytest.raises(FitError, match="'hidden_size' must be a positive integer"):
        model_from_config({k: v for k, v in CONFIG_72B.items() if k != "hidden_size"})
    with pytest.raises(FitError, match="quantization 'fp8' is not modelled"):
        model_from_config({**CONFIG_72B, "quantization_config": {"quant_method": "fp8"}})


def test_a_gpu_can_be_given_directly(run) -> None:
    # A stand-in row (not a reading): the fit takes any GpuModel.
    custom = GpuModel(match="RTX 6000 Ada", compute_capability="8.9", memory_mib=49140,
                      source="stand-in")
    result = run("Qwen/Qwen2.5-32B-Instruct-AWQ", custom)
    assert result.fits and result.gpu == "RTX 6000 Ada" and result.max_model_len == 32768


# --- one instance across hosts (pipeline parallel, vLLM's multi-node layout) ------------------


def test_pipeline_stages_split_layers_as_vllm_does() -> None:
    # vllm/distributed/utils.py get_pp_indices: the remainder goes to the stages before the last.
    assert pipeline_stages(80, 2) == [40, 40]
    assert pipeline_stages(80, 3) == [27, 27, 26]
    assert pipeline_stages(28, 3) == [9, 10, 9]
    assert pipeline_stages(64, 1) == [64]


def test_72b_across_two_hosts_of_two_l40s(run, catalog: Catalog) -> None:
    result = run("Qwen/Qwen2.5-72B-Instruct", "NVIDIA L40S", 2, nodes=2)
    assert result.fits and (result.tensor_parallel, result.pipeline_parallel) == (2, 2)
    arch = catalog.models["Qwen/Qwen2.5-72B-Instruct"].architecture
    # The first stage: 40 of the 80 layers and the embedding, split over 2 GPUs, in bf16.
    by_hand = (40 * arch.layer_params + arch.vocab_size * arch.hidden_size) * 2 / 2
    assert abs(result.weights_per_gpu_gib - by_hand / GIB) < 0.01
    # 40 layers x 4 of the 8 KV heads per GPU.
    assert result.kv_bytes_per_token == 2 * 40 * 4 * 128 * 2 == 81920
    budget = 46068 * MIB * 0.9 - by_hand - (RESERVE_GIB + TENSOR_PARALLEL_RESERVE_GIB) * GIB
    assert abs(result.kv_cache_gib - budget / GIB) < 0.01
    # 2.13 GiB of KV cache at 81,920 bytes per token: 27,952 tokens, not the whole 32k context.
    assert result.kv_cache_tokens == int(budget // (81920 * BLOCK_TOKENS)) * BLOCK_TOKENS
    assert result.max_model_len == 27648
    assert result.vllm_args[:4] == ["--tensor-parallel-size", "2",
                                    "--pipeline-parallel-size", "2"]
    assert any("pipeline parallel 2 across the hosts" in line for line in result.reasons)


def test_72b_across_two_hosts_of_four_a30_fits_a_short_context(run) -> None:
    # One host's 4x A30 (24576 MiB each) cannot hold the weights; two hosts can, with ~4.5k
    # tokens of KV cache.
    assert not run("Qwen/Qwen2.5-72B-Instruct", "NVIDIA A30", 4).fits
    result = run("Qwen/Qwen2.5-72B-Instruct", "NVIDIA A30", 4, nodes=2)
    assert result.fits and (result.tensor_parallel, result.pipeline_parallel) == (4, 2)
    assert result.kv_bytes_per_token == 2 * 40 * 2 * 128 * 2
    assert result.max_model_len == 4096
    assert result.reasons[0].startswith("2 hosts x 4x NVIDIA A30")
    # Two hosts of 4x A10 (23028 MiB each) cannot hold the weights: three can.
    a10 = run("Qwen/Qwen2.5-72B-Instruct", "NVIDIA A10", 4, nodes=2)
    assert not a10.fits and a10.reasons[-1].endswith("the weights do not fit")
    assert a10.suggestions[0] == "3 hosts x 4x NVIDIA A10 (nodes: 3): max_model_len 32768"


def test_across_hosts_too_small_says_what_would_fit(run) -> None:
    result = run("Qwen/Qwen2.5-72B-Instruct", "NVIDIA A10", 2, nodes=2)
    assert not result.fits and result.vllm_args == []
    assert result.reasons[-1] == "does not fit on 2 hosts x 2x NVIDIA A10: the weights do not fit"
    more, awq = result.suggestions[:2]
    assert more.startswith("5 hosts x 2x NVIDIA A10 (nodes: 5)")
    assert run("Qwen/Qwen2.5-72B-Instruct", "NVIDIA A10", 2, nodes=5).fits
    assert not run("Qwen/Qwen2.5-72B-Instruct", "NVIDIA A10", 2, nodes=4).fits
    assert awq.startswith("Qwen/Qwen2.5-72B-Instruct-AWQ (AWQ")
    assert "fits on 2 hosts x 2x NVIDIA A10" in awq


def test_across_hosts_takes_the_largest_valid_tensor_parallel_size(run) -> None:
    # 3 GPUs per host: 64 heads do not divide by 3, so 2 of them serve, 1 stays idle.
    result = run("Qwen/Qwen2.5-72B-Instruct", "NVIDIA L40S", 3, nodes=2)
    assert result.fits and result.tensor_parallel == 2
    assert "tensor parallel 3: 64 attention heads are not divisible by 3" in result.reasons
    assert "1 of 3 GPUs of each host left unused by this deployment" in result.reasons


def test_more_hosts_than_layers_is_refused(run) -> None:
    with pytest.raises(FitError, match="only 24 layers"):
        run("Qwen/Qwen2.5-0.5B-Instruct", "NVIDIA A10", 1, nodes=25)


def test_one_host_fit_is_unchanged_by_nodes_1(run) -> None:
    one = run("Qwen/Qwen2.5-7B-Instruct", "NVIDIA A10", 1)
    assert one == run("Qwen/Qwen2.5-7B-Instruct", "NVIDIA A10", 1, nodes=1)
    assert one.pipeline_parallel == 1 and "--pipeline-parallel-size" not in one.vllm_args
