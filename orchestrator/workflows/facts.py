"""`orchestrate facts parse`: what a host's saved nvidia-smi output tells the planner."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from orchestrator.errors import ConfigError
from orchestrator.facts.nvidia_smi import (
    GpuInfo,
    MigDevice,
    SmiError,
    parse_nvidia_smi,
    summarize,
)
from orchestrator.workflows.common import Result


@dataclass(frozen=True)
class FactsOptions:
    # Saved nvidia-smi output (any format); "-": standard input.
    file: Path
    # For CSV without a header: its --query-gpu fields.
    columns: tuple[str, ...] | None = None


class FactsResult(Result):
    """`orchestrate facts parse --json`: the GPU facts (the Ansible fact's shape too)."""

    driver_version: str | None = Field(description="e.g. 550.127.05")
    cuda_version: str | None = Field(description="the newest CUDA the driver supports")
    gpus: list[GpuInfo] = Field(description="each GPU found")
    mig_devices: list[MigDevice] = Field(description="MIG devices, where the output lists "
                                                     "them")
    error: SmiError | None = Field(description="a broken driver or tool, with the next "
                                               "step (exit 1); null when healthy")
    summary: str = Field(description="one line, as the table shows it")


def facts_parse(options: FactsOptions) -> FactsResult:
    name = str(options.file)
    try:
        text = sys.stdin.read() if name == "-" else options.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=name) from None
    facts = parse_nvidia_smi(text, columns=list(options.columns) if options.columns else None)
    return FactsResult.model_validate({**facts.to_dict(), "summary": summarize(facts)})
