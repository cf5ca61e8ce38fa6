"""`orchestrate compat`: the torch CUDA build and vLLM release a driver (and GPU) gets."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from orchestrator.errors import OrchestrateError
from orchestrator.knowledge.compat import (
    TorchChoice,
    VllmChoice,
    decide,
    load_cuda_compat,
    load_gpu_table,
)
from orchestrator.workflows.common import Result


@dataclass(frozen=True)
class CompatOptions:
    driver: str
    gpu: str | None = None
    # Instead of gpu: e.g. "8.6".
    compute_capability: str | None = None


class CompatResult(Result):
    """`orchestrate compat --json`: the same keys whether it answers or refuses."""

    driver: str = Field(description="the driver version asked about")
    gpu: str | None = Field(description="the GPU name asked about (--gpu)")
    compute_capability: str | None = Field(description="given, or the GPU's from "
                                                       "data/gpus.yml")
    max_cuda: str | None = Field(description="the newest CUDA the driver runs")
    torch: TorchChoice | None = Field(description="the torch release and CUDA build, and "
                                                  "its package index; null when refused")
    vllm: VllmChoice | None = Field(description="the vLLM release; null when refused")
    reasons: list[str] = Field(description="why, one line each: releases skipped, builds "
                                           "chosen")
    refused: str | None = Field(description="why no combination serves this host (exit 2); "
                                            "null when torch and vllm are given")


def compat(options: CompatOptions) -> CompatResult:
    """The decision, or a refusal naming why (no supported combination, a GPU or driver
    the tables do not know)."""
    capability = options.compute_capability
    asked: dict[str, str | None] = {"gpu": options.gpu, "compute_capability": capability}
    try:
        if options.gpu is not None and capability is None:
            capability = load_gpu_table().find(options.gpu).compute_capability
            asked["compute_capability"] = capability
        decision = decide(options.driver, capability, load_cuda_compat())
    except OrchestrateError as exc:
        if exc.exit_code != 2:
            raise
        return CompatResult.model_validate({
            "driver": options.driver.strip(), **asked, "max_cuda": None, "torch": None,
            "vllm": None, "reasons": [], "refused": str(exc)})
    return CompatResult.model_validate({**dict(decision), **asked, "refused": None})
