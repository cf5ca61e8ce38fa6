"""`orchestrate mirror`, and what `up` stages into the mirror before its playbooks."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from orchestrator.config.fleet import LoadedFleet
from orchestrator.errors import ConfigError
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.knowledge.roles import load_role_defaults
from orchestrator.mirror import packages, pins
from orchestrator.mirror import weights as weights_mirror
from orchestrator.mirror.packages import OllamaArchive, WheelStack
from orchestrator.mirror.weights import Staged
from orchestrator.plan.planner import Plan, make_plan, weights_origins
from orchestrator.workflows.common import (
    Events,
    Result,
    Target,
    load,
    mirror_path,
    open_secrets,
)


def _token() -> str | None:
    return os.environ.get("MODELSCOPE_API_TOKEN") or None


def pin_for_up(loaded: LoadedFleet, target: Target, *, update: bool, resolve: bool,
               log: Callable[[str], None]) -> pins.Pinned:
    """The fleet `up` plans from: each moving revision of the group's hub models pinned to
    the hub's commit (resolved and recorded when it has no pin, or with `update`); without
    `resolve` (--check, a run without the models stage) the pins are read, none recorded."""
    if not resolve:
        return pins.apply(loaded, target.hosts, pins.read_pins(target.state_dir))
    endpoint = weights_mirror.modelscope_endpoint(loaded.fleet.mirror)
    return pins.pin_revisions(
        loaded, target.hosts, target.state_dir, endpoint=endpoint, update=update, log=log,
        resolve=lambda model, revision: weights_mirror.resolve_revision(
            endpoint, model, revision, token=_token()))


def stage_for_up(loaded: LoadedFleet, hosts: str, plan: Plan, *, check: bool,
                 state_dir: Path, log: Callable[[str], None]) -> list[Staged]:
    """What `up` stages before the playbooks: the plan's weights, when the fleet keeps its
    mirror here and the run has a models stage that changes hosts."""
    settings = loaded.fleet.mirror
    if settings is None or not settings.stage or check or "models" not in plan.stages:
        return []
    return weights_mirror.stage_weights(
        weights_origins(loaded, hosts), mirror_path(settings, state_dir),
        endpoint=weights_mirror.modelscope_endpoint(settings), token=_token(), log=log)


@dataclass(frozen=True)
class MirrorOptions:
    target: Target
    # Default: the fleet's mirror.dir, else <state>/mirror.
    directory: Path | None = None
    verify: bool = False
    # None: the hosts that take them from the mirror; True: every host; False: none.
    wheels: bool | None = None
    ollama: bool | None = None
    # Serve the mirror afterwards (serve_mirror), on `listen` or mirror.listen/mirror.url.
    serve: bool = False
    listen: str | None = None


class Listen(Result):
    host: str = Field(description="address served on (0.0.0.0: every IPv4 address)")
    port: int


class WheelsStaged(Result):
    dir: str = Field(description="<mirror>/wheels: the hosts' pip find-links")
    stacks: list[WheelStack] = Field(description="each set of wheels (Python, torch, vLLM) "
                                                 "and the hosts that install it")


class OllamaStaged(Result):
    dir: str = Field(description="<mirror>/ollama, laid out as the release downloads")
    archives: list[OllamaArchive] = Field(description="each Ollama release archive staged")


class MirrorResult(Result):
    """`orchestrate mirror --json`."""

    dir: str = Field(description="the mirror directory on this machine")
    url: str | None = Field(description="mirror.url: where hosts fetch from; null: the "
                                        "fleet sets none, hosts still use the origin")
    models: list[Staged] = Field(description="each model of the group's hosts, in the mirror")
    origin_bytes: int = Field(description="bytes this run took from the origins")
    wheels: WheelsStaged = Field(description="torch and vLLM wheels for the hosts")
    ollama: OllamaStaged = Field(description="Ollama release archives for the hosts")
    serve: Listen | None = Field(description="where --serve serves the mirror; null "
                                             "without --serve")


def mirror(options: MirrorOptions, events: Events) -> MirrorResult:
    """Stage the weights, wheels and Ollama archives the group's hosts need, checked."""
    target = options.target
    # The commits `up` pinned (moving revisions not pinned yet are staged as declared).
    loaded = pins.apply(load(target), target.hosts, pins.read_pins(target.state_dir)).loaded
    knowledge, gpu_table = load_knowledge(), load_cuda_compat()
    # Refuses what `orchestrate plan` refuses, before anything is downloaded.
    plan = make_plan(loaded, target.hosts, knowledge, gpu_table, roles=load_role_defaults())
    settings = loaded.fleet.mirror
    url = settings.url if settings else None
    where = (options.directory.resolve() if options.directory
             else mirror_path(settings, target.state_dir))
    address = (weights_mirror.parse_listen(
        options.listen or (settings.listen if settings else None), settings)
        if options.serve else None)
    # Both before any download: a missing Ollama checksum stops the run here.
    stacks = ([] if options.wheels is False else packages.wheel_stacks(
        plan, knowledge, gpu_table, mirror_url=url, every_host=bool(options.wheels)))
    archives = ([] if options.ollama is False else packages.ollama_archives(
        plan, where, origin=packages.ollama_origin(settings), mirror_url=url,
        every_host=bool(options.ollama)))
    staged = weights_mirror.stage_weights(
        weights_origins(loaded, target.hosts), where,
        endpoint=weights_mirror.modelscope_endpoint(settings), token=_token(),
        log=events.log, verify=options.verify)
    stacks = packages.stage_wheels(stacks, where, events.log)
    archives = packages.stage_ollama(archives, events.log)
    return MirrorResult(
        dir=str(where), url=url, models=staged,
        origin_bytes=sum(s.origin_bytes for s in staged),
        wheels=WheelsStaged(dir=str(where / packages.WHEELS), stacks=stacks),
        ollama=OllamaStaged(dir=str(where / packages.OLLAMA), archives=archives),
        serve=Listen(host=address[0], port=address[1]) if address else None)


def mirror_token(loaded: LoadedFleet, secrets: Mapping[str, str]) -> str | None:
    """The mirror's token (mirror.token_var) from the fleet's opened secrets; None when the
    fleet sets none. Errors name the file and key, never a value."""
    settings = loaded.fleet.mirror
    if settings is None or settings.token_var is None:
        return None
    token = secrets.get(settings.token_var)
    if not token:
        raise ConfigError(
            f"no secret '{settings.token_var}' in the fleet's secrets file (add it with "
            "`ansible-vault edit`; `openssl rand -hex 32` makes one)" if loaded.fleet.secrets
            else "needs the fleet's Vault-encrypted secrets file (`secrets:`) holding "
                 f"'{settings.token_var}'",
            file=loaded.fleet.secrets or loaded.source, key="mirror.token_var")
    return str(token)


def serve_token(target: Target) -> str | None:
    """The token `mirror --serve` asks of the hosts: opened before anything is staged, so a
    wrong vault password fails first."""
    loaded = load(target)
    if loaded.fleet.mirror is None or loaded.fleet.mirror.token_var is None:
        return None
    return mirror_token(loaded, open_secrets(loaded.fleet.secrets, target.vault_password_file))


def serve_mirror(directory: Path, listen: Listen, log: Callable[[str], None], *,
                 token: str | None = None) -> None:
    """Serve the mirror to the hosts until interrupted (Ctrl-C), one log line per request;
    with a token, requests without it are answered 401."""
    server = weights_mirror.MirrorServer(
        directory, listen.host, listen.port, token=token,
        on_request=lambda r: log(f"{r.client} {r.status} {r.bytes} B {r.path}"))
    log(f"serving {directory} on {listen.host}:{server.address[1]} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
