"""`orchestrate`: glue between the layers; no logic of its own beyond choosing what to call."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from orchestrator.config.fleet import LoadedFleet, MirrorSettings, load_fleet
from orchestrator.config.vault import load_secrets
from orchestrator.errors import ConfigError, OrchestrateError
from orchestrator.facts.nvidia_smi import parse_nvidia_smi, summarize
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import decide, load_cuda_compat, load_gpu_table
from orchestrator.mirror import packages
from orchestrator.mirror import weights as weights_mirror
from orchestrator.plan.fit import check_same_gpu, fit, gpus_from_facts
from orchestrator.plan.planner import (
    STAGES,
    Plan,
    make_plan,
    select_stages,
    weights_origins,
)
from orchestrator.report import console as report
from orchestrator.report import htmlreport
from orchestrator.run.render import ROOT, new_run_id, render
from orchestrator.run.runner import run_playbook
from orchestrator.sandbox import fleet as sandbox_fleet
from orchestrator.sandbox import hosts as sandbox
from orchestrator.verify import bench as benchmark
from orchestrator.verify import deepprobe
from orchestrator.verify.hostprobe import probe_all
from orchestrator.verify.httpprobe import probe_plan

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Provision GPU hosts to serve Qwen2.5 with vLLM, and prove they work.")
facts_app = typer.Typer(no_args_is_help=True, help="GPU facts as the planner sees them.")
app.add_typer(facts_app, name="facts")
console = Console()
err = Console(stderr=True)

STATE_DIR = Path(".orchestrate")
DEFAULT_FLEET = Path("fleet.yml")

FleetOpt = Annotated[Path | None, typer.Option("-f", "--fleet", help="Fleet file "
                                               "(default: ./fleet.yml).")]
InventoryOpt = Annotated[Path | None, typer.Option("-i", "--inventory",
                                                   help="An Ansible YAML inventory of hosts.")]
HostsOpt = Annotated[str, typer.Option("--hosts", help="Host group ('all' for every host; "
                                       "'sandbox' for the built-in local fleet).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
OnlyOpt = Annotated[list[str] | None, typer.Option("--only", help=f"Run only this stage "
                                                   f"({', '.join(STAGES)}); repeatable.")]
SkipOpt = Annotated[list[str] | None, typer.Option("--skip", help="Skip this stage; "
                                                   "repeatable.")]
VaultOpt = Annotated[Path | None, typer.Option(
    "--vault-password-file", envvar="ANSIBLE_VAULT_PASSWORD_FILE",
    help="Opens the fleet's Vault-encrypted secrets file (API keys).")]


@contextmanager
def _errors() -> Iterator[None]:
    """Every known failure ends as one line and its exit code, never a traceback."""
    try:
        yield
    except (OrchestrateError, sandbox.SandboxError, OSError) as exc:
        # OSError: a run directory that cannot be written (disk full, permissions).
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(getattr(exc, "exit_code", 1)) from None


def _log(message: str) -> None:
    err.print(f"[dim]{message}[/dim]", highlight=False)


def _uses_sandbox(hosts: str, fleet: Path | None, inventory: Path | None) -> bool:
    return (hosts == sandbox_fleet.GROUP and fleet is None and inventory is None
            and not DEFAULT_FLEET.exists())


def _load(hosts: str, fleet: Path | None, inventory: Path | None) -> LoadedFleet:
    if _uses_sandbox(hosts, fleet, inventory):
        # Absolute: ansible-playbook runs from the project directory, not from here.
        state = (STATE_DIR / "sandbox").resolve()
        secrets_file, _ = sandbox_fleet.sandbox_secrets(state)
        _log(f"note: {sandbox_fleet.STANDIN_NOTE}")
        return sandbox_fleet.sandbox_fleet(sandbox.ensure_ssh_key(state),
                                           sandbox_fleet.sandbox_model(), secrets_file,
                                           sandbox_fleet.sandbox_ollama_release(),
                                           mirror_dir=state / "mirror")
    path = fleet or (DEFAULT_FLEET if DEFAULT_FLEET.exists() or inventory is None else None)
    if path is not None and not path.exists() and fleet is None:
        raise ConfigError("no fleet file here: run `orchestrate init` to write one, pass "
                          "-f FILE or -i INVENTORY, or use --hosts sandbox", file=str(path))
    return load_fleet(path, inventory)


def _plan(hosts: str, fleet: Path | None, inventory: Path | None,
          only: list[str] | None = None, skip: list[str] | None = None) -> Plan:
    return _loaded_plan(hosts, fleet, inventory, only, skip)[1]


def _loaded_plan(hosts: str, fleet: Path | None, inventory: Path | None,
                 only: list[str] | None = None, skip: list[str] | None = None
                 ) -> tuple[LoadedFleet, Plan]:
    loaded = _load(hosts, fleet, inventory)
    return loaded, make_plan(loaded, hosts, load_knowledge(), load_cuda_compat(),
                             select_stages(only, skip))


def _stage_mirror(loaded: LoadedFleet, hosts: str, the_plan: Plan, check: bool
                  ) -> list[weights_mirror.Staged]:
    """What `up` stages before the playbooks: the plan's weights, when the fleet keeps its
    mirror here and the run has a models stage that changes hosts."""
    settings = loaded.fleet.mirror
    if settings is None or not settings.stage or check or "models" not in the_plan.stages:
        return []
    return weights_mirror.stage_weights(
        weights_origins(loaded, hosts), _mirror_path(settings),
        endpoint=weights_mirror.modelscope_endpoint(settings),
        token=os.environ.get("MODELSCOPE_API_TOKEN") or None, log=_log)


def _mirror_path(settings: MirrorSettings | None) -> Path:
    return weights_mirror.mirror_dir(settings, STATE_DIR / "mirror").resolve()


def _secrets(hosts: str, fleet: Path | None, inventory: Path | None, the_plan: Plan,
             password_file: Path | None) -> tuple[dict[str, str], Path | None]:
    """The API keys of the plan's secrets file, opened before anything runs so that a
    wrong password fails first; and the password file Ansible gets (the sandbox's own)."""
    if _uses_sandbox(hosts, fleet, inventory):
        password_file = sandbox_fleet.sandbox_secrets((STATE_DIR / "sandbox").resolve())[1]
    if the_plan.secrets_file is None:
        return {}, password_file
    return load_secrets(Path(the_plan.secrets_file), password_file), password_file


def _report_dir(command: str, the_plan: Plan) -> Path:
    """A fresh run directory for a command that runs no playbook (probe, bench)."""
    path = (STATE_DIR / "runs" / new_run_id(dt.datetime.now(), command)).resolve()
    path.mkdir(parents=True)
    (path / "plan.json").write_text(the_plan.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def _start_sandbox(plan: Plan) -> None:
    wheelhouse = sandbox_fleet.sandbox_wheelhouse(load_knowledge(), _log)
    sandbox.up(STATE_DIR / "sandbox", count=len(plan.hosts),
               ssh_base_port=sandbox_fleet.SSH_BASE_PORT,
               service_ports=[sandbox_fleet.VLLM_PORT, sandbox_fleet.OLLAMA_PORT],
               mounts={wheelhouse: sandbox_fleet.WHEELHOUSE_MOUNT}, log=_log)


@app.command()
def init(
    fleet: FleetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented example fleet.yml to start from."""
    path = fleet or DEFAULT_FLEET
    with _errors():
        if path.exists() and not force:
            raise ConfigError("already exists; pass --force to overwrite it", file=str(path))
        path.write_text((ROOT / "templates" / "fleet.yml").read_text(encoding="utf-8"),
                        encoding="utf-8")
    console.print(f"wrote {path}: edit the hosts and deployments, then "
                  f"`orchestrate plan --hosts gpu-cluster`")


@app.command()
def plan(hosts: HostsOpt, fleet: FleetOpt = None, inventory: InventoryOpt = None,
         only: OnlyOpt = None, skip: SkipOpt = None, as_json: JsonOpt = False) -> None:
    """Show what would be installed where, and why; changes nothing."""
    with _errors():
        the_plan = _plan(hosts, fleet, inventory, only, skip)
    if as_json:
        print(the_plan.model_dump_json(indent=2))
    else:
        report.plan_table(the_plan, console)


@app.command()
def up(hosts: HostsOpt, fleet: FleetOpt = None, inventory: InventoryOpt = None,
       check: Annotated[bool, typer.Option("--check", help="Ansible check mode with diff: "
                                           "show changes, make none.")] = False,
       only: OnlyOpt = None, skip: SkipOpt = None, as_json: JsonOpt = False,
       vault_password_file: VaultOpt = None) -> None:
    """Provision the hosts (stage by stage), then probe every deployment. With `mirror:` in
    the fleet, the weights are staged there first (fetched once, for every host) and, with
    mirror.listen, served from this machine while the playbooks run."""
    with _errors():
        loaded, the_plan = _loaded_plan(hosts, fleet, inventory, only, skip)
        secrets, vault_password_file = _secrets(hosts, fleet, inventory, the_plan,
                                                vault_password_file)
        settings = loaded.fleet.mirror
        listen = (weights_mirror.parse_listen(settings.listen, settings, key="mirror.listen")
                  if settings is not None and settings.listen else None)
        # Before any host is changed: a bad file from the origin stops the run here.
        staged = _stage_mirror(loaded, hosts, the_plan, check)
        if _uses_sandbox(hosts, fleet, inventory):
            _start_sandbox(the_plan)
        run_dir = render(the_plan, STATE_DIR / "runs", new_run_id(dt.datetime.now(), "up"),
                         check=check, operator_inventory=inventory,
                         vault_password_file=vault_password_file)
    out = err if as_json else console
    if staged:
        report.mirror_table(staged, str(_mirror_path(settings)), out)
    out.print(f"run {run_dir.run_id}: stages {', '.join(the_plan.stages)} on "
              f"{len(the_plan.hosts)} host(s) of '{hosts}'")
    traffic = None
    with _errors():
        with ExitStack() as serving:
            if listen is not None:
                traffic = serving.enter_context(
                    weights_mirror.serving(_mirror_path(settings), listen, _log))
            with report.LiveProgress(out, [h.name for h in the_plan.hosts]) as progress:
                result = run_playbook(run_dir, progress)
        report.run_summary(result, out, str(run_dir.path))
        if traffic is not None:
            report.mirror_traffic(traffic, out)

        probes = None
        if not check and "verify" in the_plan.stages:
            probes = probe_all(the_plan, secrets=secrets)
            report.probe_table(probes, out)
            (run_dir.path / "probes.json").write_text(probes.model_dump_json(indent=2) + "\n")
        html = htmlreport.write_report(run_dir.path, command="up", plan=the_plan, probes=probes)
        out.print(f"report: {html}", highlight=False)
    if as_json:
        mirrored = None if settings is None else {
            "dir": str(_mirror_path(settings)), "url": settings.url,
            "models": [s.to_dict() for s in staged],
            "origin_bytes": sum(s.origin_bytes for s in staged),
            "served": traffic.to_dict() if traffic is not None else None}
        print(json.dumps({"run_id": run_dir.run_id, "run_dir": str(run_dir.path),
                          "ansible": report.run_json(result),
                          "mirror": mirrored,
                          "probes": probes.model_dump() if probes else None}, indent=2))
    if not result.ok or (probes is not None and not probes.passed):
        raise typer.Exit(1)


@app.command()
def probe(hosts: HostsOpt, fleet: FleetOpt = None, inventory: InventoryOpt = None,
          as_json: JsonOpt = False, vault_password_file: VaultOpt = None,
          ssh: Annotated[bool, typer.Option("--ssh/--no-ssh", help="Also probe the hosts "
                                            "over SSH.")] = True,
          deep: Annotated[bool, typer.Option("--deep", help="Also run the GPU smoke test "
                                             "(playbooks/gpu_smoke.yml) on every GPU host; "
                                             "minutes per host.")] = False) -> None:
    """Probe the hosts over SSH (GPUs, torch, weights, services) and every deployment over
    HTTP; exit 1 if any probe fails."""
    with _errors():
        the_plan = _plan(hosts, fleet, inventory)
        secrets, password_file = _secrets(hosts, fleet, inventory, the_plan,
                                          vault_password_file)
    result = (probe_all(the_plan, secrets=secrets) if ssh
              else probe_plan(the_plan, secrets=secrets))
    if deep:
        _log("GPU smoke test (playbooks/gpu_smoke.yml) on the GPU hosts")
        with _errors():
            smoke = deepprobe.run_smoke(the_plan, STATE_DIR / "runs",
                                        new_run_id(dt.datetime.now(), "smoke"),
                                        operator_inventory=inventory,
                                        vault_password_file=password_file)
        result = deepprobe.merged(result, smoke, the_plan)
    if as_json:
        print(json.dumps({**result.model_dump(), "passed": result.passed}, indent=2))
    else:
        report.probe_table(result, console)
    with _errors():
        run_path = _report_dir("probe", the_plan)
        (run_path / "probes.json").write_text(result.model_dump_json(indent=2) + "\n")
        html = htmlreport.write_report(run_path, command="probe", plan=the_plan, probes=result)
    (err if as_json else console).print(f"report: {html}", highlight=False)
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def bench(
    hosts: HostsOpt, fleet: FleetOpt = None, inventory: InventoryOpt = None,
    deployment: Annotated[list[str] | None, typer.Option(
        "--deployment", help="Only this deployment; repeatable (default: all).")] = None,
    concurrency: Annotated[str, typer.Option(
        help="Requests in flight, one level after another: comma-separated.")] = "1,4,16",
    requests: Annotated[int, typer.Option(help="Measured requests per level, after one "
                                          "warm-up request per worker.")] = 64,
    input_tokens: Annotated[int, typer.Option(help="Words of synthetic text per prompt "
                                              "(about one token each).")] = 128,
    output_tokens: Annotated[int, typer.Option(help="Tokens each answer is asked for.")] = 128,
    as_json: JsonOpt = False,
    vault_password_file: VaultOpt = None,
) -> None:
    """Probe, then load-test each deployment (streamed chat completions at each concurrency);
    exit 1 if a probe or a request failed. Report and JSON in the run directory."""
    with _errors():
        workload = benchmark.make_workload(concurrency, requests, input_tokens, output_tokens)
        the_plan = benchmark.only_deployments(_plan(hosts, fleet, inventory), deployment)
        secrets, _ = _secrets(hosts, fleet, inventory, the_plan, vault_password_file)
        run_path = _report_dir("bench", the_plan)
    out = err if as_json else console
    probes = probe_plan(the_plan, secrets=secrets)
    report.probe_table(probes, out)
    result = benchmark.bench_plan(the_plan, workload, probes, _log, secrets=secrets)
    report.bench_table(result, out)
    with _errors():
        (run_path / "probes.json").write_text(probes.model_dump_json(indent=2) + "\n")
        (run_path / "bench.json").write_text(result.model_dump_json(indent=2) + "\n")
        html = htmlreport.write_report(run_path, command="bench", plan=the_plan, probes=probes,
                                       bench=result)
    out.print(f"report: {html}", highlight=False)
    passed = probes.passed and result.passed
    if as_json:
        print(json.dumps({"run_id": run_path.name, "run_dir": str(run_path),
                          "report": str(html), "passed": passed,
                          "probes": {**probes.model_dump(), "passed": probes.passed},
                          "bench": {**result.model_dump(), "passed": result.passed}},
                         indent=2))
    if not passed:
        raise typer.Exit(1)


@facts_app.command("parse")
def facts_parse(
    file: Annotated[Path, typer.Argument(help="Saved nvidia-smi output (any format), or - "
                                               "for standard input.")],
    columns: Annotated[str | None, typer.Option(help="For CSV without a header: the "
                                                "--query-gpu fields, comma-separated.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Parse a host's saved nvidia-smi output; exit 1 when it shows a broken driver."""
    with _errors():
        try:
            text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read: {exc}", file=str(file)) from None
    parsed = parse_nvidia_smi(text, columns=columns.split(",") if columns else None)
    if as_json:
        print(json.dumps(parsed.to_dict(), indent=2))
    else:
        console.print(summarize(parsed), highlight=False)
        if parsed.error:
            console.print(f"[red]{parsed.error.kind}[/red]: {escape(parsed.error.message)}\n"
                          f"next: {escape(parsed.error.next_step)}")
    if parsed.error:
        raise typer.Exit(1)


@app.command()
def compat(
    driver: Annotated[str, typer.Option("--driver", help="NVIDIA driver version, e.g. "
                                        "580.65.06.")],
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU name as nvidia-smi prints "
                                            "it, e.g. 'NVIDIA A10'.")] = None,
    compute_capability: Annotated[str | None, typer.Option(
        "--compute-capability", help="Instead of --gpu: e.g. 8.6.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Which torch CUDA build and vLLM a host with this driver (and GPU) gets, and why."""
    with _errors():
        capability = compute_capability
        if gpu is not None and capability is None:
            capability = load_gpu_table().find(gpu).compute_capability
        decision = decide(driver, capability, load_cuda_compat())
    if as_json:
        print(json.dumps({"driver": decision.driver, "max_cuda": decision.max_cuda,
                          "torch": {"version": decision.torch.version,
                                    "cuda_build": decision.torch.cuda_build,
                                    "index_url": decision.torch.index_url,
                                    "min_driver": decision.torch.min_driver},
                          "vllm": {"version": decision.vllm.version},
                          "reasons": decision.reasons}, indent=2))
    else:
        console.print(f"{decision.torch.requirement} from {decision.torch.index_url} with "
                      f"vllm {decision.vllm.version}", highlight=False)
        for reason in decision.reasons:
            console.print(f"  - {escape(reason)}", highlight=False)


@app.command("fit")
def fit_command(
    model: Annotated[str, typer.Option("--model", help="Catalog id, e.g. "
                                       "Qwen/Qwen2.5-7B-Instruct.")],
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU name, e.g. 'NVIDIA A10' "
                                            "(optional with --facts).")] = None,
    count: Annotated[int, typer.Option("--count", min=1, help="GPUs on the host.")] = 1,
    max_model_len: Annotated[int | None, typer.Option("--max-model-len")] = None,
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Hosts of --count GPUs each, "
                                       "one instance across them (Ray).")] = 1,
    memory_mib: Annotated[int | None, typer.Option(
        "--memory-mib", min=1, help="memory.total of one GPU in MiB as nvidia-smi reports it "
                                    "on the host; wins over data/gpus.yml.")] = None,
    facts_file: Annotated[Path | None, typer.Option(
        "--facts", help="The host's saved nvidia-smi output (any format): the GPU name, count "
                        "and memory.total found in it win over --gpu and --count.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Does the model fit these GPUs under vLLM, how, and if not, what would; exit 2 if not."""
    found = ""
    with _errors():
        if memory_mib is not None and facts_file is not None:
            raise ConfigError("give --memory-mib or --facts, not both")
        gpus = load_gpu_table()
        source = "measured on the host"
        if facts_file is not None:
            try:
                text = facts_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read: {exc}", file=str(facts_file)) from None
            name, count, memory_mib = gpus_from_facts(parse_nvidia_smi(text), str(facts_file))
            if gpu is not None:
                check_same_gpu(gpu, name, gpus, str(facts_file))
            gpu, source, found = name, f"found in {facts_file}", f" (found in {facts_file})"
        if gpu is None:
            raise ConfigError("give --gpu, or --facts with the host's saved nvidia-smi output")
        knowledge = load_knowledge()
        gpu_table = load_cuda_compat()
        floor = gpu_table.cuda.vllm.releases[gpu_table.gpu_stack.vllm_version]
        result = fit(model, gpu, count, max_model_len, catalog=knowledge.catalog, gpus=gpus,
                     memory_mib=memory_mib, memory_source=source,
                     engine_min_compute_capability=floor.min_compute_capability, nodes=nodes)
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        verdict = "[green]fits[/green]" if result.fits else "[red]does not fit[/red]"
        hosts = f"{nodes} hosts x " if nodes > 1 else ""
        console.print(f"{escape(model)} on {hosts}{count}x {escape(result.gpu)}"
                      f"{escape(found)}: {verdict}")
        for line in result.reasons:
            console.print(f"  - {escape(line)}", highlight=False)
        for line in result.suggestions:
            console.print(f"  instead: {escape(line)}", highlight=False)
    if not result.fits:
        raise typer.Exit(2)


@app.command()
def mirror(
    hosts: HostsOpt, fleet: FleetOpt = None, inventory: InventoryOpt = None,
    directory: Annotated[Path | None, typer.Option(
        "--dir", help="Mirror directory (default: the fleet's mirror.dir, else "
                      ".orchestrate/mirror).")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="Then serve the mirror to the hosts "
                                        "over HTTP until interrupted.")] = False,
    listen: Annotated[str | None, typer.Option(
        "--listen", help="[HOST:]PORT to serve on (default: mirror.listen, else every "
                         "address on the port of the fleet's mirror.url).")] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Re-hash every staged file against its manifest and fetch a "
                         "damaged one again from the origin (staged models are otherwise "
                         "trusted by their manifest).")] = False,
    wheels: Annotated[bool | None, typer.Option(
        "--wheels/--no-wheels", help="Stage (or not) the torch and vLLM wheels of every "
                                     "host of the group into <dir>/wheels (default: of the "
                                     "hosts whose pip find_links is under mirror.url).")] = None,
    ollama: Annotated[bool | None, typer.Option(
        "--ollama/--no-ollama", help="Stage (or not) the Ollama release archive of every "
                                     "Ollama host into <dir>/ollama (default: of the hosts "
                                     "whose ollama_archive_base_url is under mirror.url).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch the weights the group's hosts need once onto this machine (ModelScope with the
    real client, token from MODELSCOPE_API_TOKEN, or model_dir), checked by size and sha256,
    and the wheels and Ollama archive of the hosts that take them from the mirror; with
    mirror.url in the fleet, hosts take them from here."""
    with _errors():
        loaded = _load(hosts, fleet, inventory)
        knowledge, gpu_table = load_knowledge(), load_cuda_compat()
        # Refuses what `orchestrate plan` refuses, before anything is downloaded.
        the_plan = make_plan(loaded, hosts, knowledge, gpu_table)
        settings = loaded.fleet.mirror
        url = settings.url if settings else None
        where = directory.resolve() if directory else _mirror_path(settings)
        address = (weights_mirror.parse_listen(
            listen or (settings.listen if settings else None), settings) if serve else None)
        # Both before any download: a missing Ollama checksum stops the run here.
        stacks = ([] if wheels is False else packages.wheel_stacks(
            the_plan, knowledge, gpu_table, mirror_url=url, every_host=bool(wheels)))
        archives = ([] if ollama is False else packages.ollama_archives(
            the_plan, where, origin=packages.ollama_origin(settings), mirror_url=url,
            every_host=bool(ollama)))
        staged = weights_mirror.stage_weights(
            weights_origins(loaded, hosts), where,
            endpoint=weights_mirror.modelscope_endpoint(settings),
            token=os.environ.get("MODELSCOPE_API_TOKEN") or None, log=_log, verify=verify)
        stacks = packages.stage_wheels(stacks, where, _log)
        archives = packages.stage_ollama(archives, _log)
    out = err if as_json else console
    if as_json:
        print(json.dumps({"dir": str(where), "models": [s.to_dict() for s in staged],
                          "origin_bytes": sum(s.origin_bytes for s in staged),
                          "wheels": {"dir": str(where / packages.WHEELS),
                                     "stacks": [s.to_dict() for s in stacks]},
                          "ollama": {"dir": str(where / packages.OLLAMA),
                                     "archives": [a.to_dict() for a in archives]}}, indent=2))
    else:
        report.mirror_table(staged, str(where), console)
        report.mirror_packages(stacks, archives, str(where), console)
    if settings is None:
        out.print("the fleet sets no mirror.url: hosts still fetch from the origin; add "
                  f"`mirror: {{url: http://THIS-MACHINE:{weights_mirror.DEFAULT_PORT}}}` to use "
                  "this mirror (docs/airgapped.md)", highlight=False)
    if address is None:
        return
    with _errors():
        server = weights_mirror.MirrorServer(
            where, *address, on_request=lambda r: _log(f"{r.client} {r.status} {r.bytes} B "
                                                        f"{r.path}"))
    out.print(f"serving {where} on {address[0]}:{server.address[1]} (Ctrl-C stops)",
              highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


@app.command()
def down(hosts: HostsOpt) -> None:
    """Remove the sandbox fleet: its hosts and their state."""
    with _errors():
        if hosts != sandbox_fleet.GROUP:
            raise ConfigError(f"`down` removes the built-in sandbox only, not '{hosts}': "
                              "real hosts are never deleted by this tool", key="--hosts")
        removed = sandbox.down(STATE_DIR / "sandbox", _log)
    console.print(f"removed {', '.join(removed)}" if removed else "no sandbox hosts were running")

