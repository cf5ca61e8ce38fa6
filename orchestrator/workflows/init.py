"""`orchestrate init`: a commented example fleet.yml to start from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from orchestrator.errors import ConfigError
from orchestrator.knowledge.roles import NoCheckout
from orchestrator.run.render import ROOT
from orchestrator.workflows.common import DEFAULT_FLEET, Result

EXAMPLE = ROOT / "templates" / "fleet.yml"


@dataclass(frozen=True)
class InitOptions:
    path: Path = DEFAULT_FLEET
    # Overwrite an existing file.
    force: bool = False


class InitResult(Result):
    """`orchestrate init --json`."""

    path: str = Field(description="the fleet file written")
    overwrote: bool = Field(description="a file was there and --force replaced it")
    next: str = Field(description="what to run next")


def init(options: InitOptions) -> InitResult:
    path = options.path
    existed = path.exists()
    if existed and not options.force:
        raise ConfigError("already exists; pass --force to overwrite it", file=str(path))
    if not EXAMPLE.is_file():
        raise NoCheckout(f"{EXAMPLE} does not exist: orchestrate takes the example "
                         "fleet from the checkout it runs from, or the copy its wheel "
                         "carries; reinstall with `pip install <checkout>`")
    path.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    return InitResult(path=str(path), overwrote=existed,
                      next="create the API key's Vault-encrypted secrets file next to it "
                           "(`ansible-vault create secrets.vault.yml`, one line "
                           "`vault_qwen7b_api_key: <openssl rand -hex 32>`), edit the hosts "
                           "and deployments, then `orchestrate plan --hosts gpu-cluster`")
