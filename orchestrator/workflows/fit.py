"""`orchestrate fit`: does a model fit these GPUs under vLLM, how, and if not, what would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from orchestrator.errors import ConfigError, OrchestrateError
from orchestrator.facts.nvidia_smi import parse_nvidia_smi
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat, load_gpu_table
from orchestrator.plan.fit import FitResult, check_same_gpu, fit, gpus_from_facts
from orchestrator.workflows.common import Result


@dataclass(frozen=True)
class FitOptions:
    model: str
    gpu: str | None = None
    count: int = 1
    max_model_len: int | None = None
    nodes: int = 1
    # nvidia-smi's memory.total of one GPU, measured on the host.
    memory_mib: int | None = None
    # The host's saved nvidia-smi output: its GPU name, count and memory win.
    facts: Path | None = None


class FitAnswer(FitResult):
    """`orchestrate fit --json` when the fit was computed (exit 2 if it does not fit)."""

    found_in: str | None = Field(default=None, description="the --facts file the GPU, count "
                                                           "and memory were read from")
    refused: None = Field(default=None, description="always null here")


class FitRefusal(Result):
    """`orchestrate fit --json` when the question itself was refused (exit 2)."""

    model: str = Field(description="the model asked about (--model)")
    gpu: str | None = Field(description="the GPU asked about, or found in --facts")
    count: int = Field(description="GPUs per host")
    nodes: int = Field(description="hosts")
    fits: Literal[False] = False
    refused: str = Field(description="why (an unknown model or GPU, an unreadable or "
                                     "broken --facts file, conflicting options)")


def fit_model(options: FitOptions) -> FitAnswer | FitRefusal:
    gpu, count, memory_mib = options.gpu, options.count, options.memory_mib
    try:
        if memory_mib is not None and options.facts is not None:
            raise ConfigError("give --memory-mib or --facts, not both")
        gpus = load_gpu_table()
        source, found = "measured on the host", None
        if options.facts is not None:
            origin = str(options.facts)
            try:
                text = options.facts.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read: {exc}", file=origin) from None
            name, count, memory_mib = gpus_from_facts(parse_nvidia_smi(text), origin)
            if gpu is not None:
                check_same_gpu(gpu, name, gpus, origin)
            gpu, source, found = name, f"found in {origin}", origin
        if gpu is None:
            raise ConfigError("give --gpu, or --facts with the host's saved nvidia-smi output")
        table = load_cuda_compat()
        floor = table.cuda.vllm.releases[table.gpu_stack.vllm_version]
        result = fit(options.model, gpu, count, options.max_model_len,
                     catalog=load_knowledge().catalog, gpus=gpus, memory_mib=memory_mib,
                     memory_source=source,
                     engine_min_compute_capability=floor.min_compute_capability,
                     nodes=options.nodes)
    except OrchestrateError as exc:
        if exc.exit_code != 2:
            raise
        return FitRefusal(model=options.model, gpu=gpu, count=count, nodes=options.nodes,
                          refused=str(exc))
    return FitAnswer.model_validate({**dict(result), "found_in": found})
