"""`orchestrate`: parses options, calls a workflow (orchestrator/workflows), prints its result
as tables or, with --json, as JSON. The built-in sandbox is reached from here only, and
imported only when `--hosts sandbox` asks for it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from orchestrator.errors import ConfigError, OrchestrateError
from orchestrator.mirror.weights import DEFAULT_PORT
from orchestrator.plan.planner import STAGES
from orchestrator.report import console as report
from orchestrator.run.runner import Interrupted, Progress
from orchestrator.workflows import bench as bench_flow
from orchestrator.workflows import compat as compat_flow
from orchestrator.workflows import down as down_flow
from orchestrator.workflows import facts as facts_flow
from orchestrator.workflows import fit as fit_flow
from orchestrator.workflows import history as history_flow
from orchestrator.workflows import init as init_flow
from orchestrator.workflows import logs as logs_flow
from orchestrator.workflows import mirror as mirror_flow
from orchestrator.workflows import monitoring as monitoring_flow
from orchestrator.workflows import plan as plan_flow
from orchestrator.workflows import probe as probe_flow
from orchestrator.workflows import schemas
from orchestrator.workflows import status as status_flow
from orchestrator.workflows import up as up_flow
from orchestrator.workflows.common import (
    DEFAULT_FLEET,
    NO_FACTS,
    STATE_DIR,
    Events,
    FactsPolicy,
    Target,
    age_text,
    no_fleet_given,
    parse_duration,
)

if TYPE_CHECKING:
    from orchestrator.config.fleet import LoadedFleet

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Provision GPU hosts to serve Qwen2.5 with vLLM, and prove they work.")
# Its help is the callback's docstring: `orchestrate facts --hosts G` itself gathers.
facts_app = typer.Typer()
app.add_typer(facts_app, name="facts")
history_app = typer.Typer()
app.add_typer(history_app, name="history")
console = Console()
err = Console(stderr=True)

SANDBOX = "sandbox"  # orchestrator.sandbox.fleet.GROUP, without importing the sandbox

FleetOpt = Annotated[Path | None, typer.Option("-f", "--fleet", help="Fleet file "
                                               f"(default: ./{DEFAULT_FLEET}).")]
InventoryOpt = Annotated[Path | None, typer.Option("-i", "--inventory",
                                                   help="An Ansible YAML inventory of hosts.")]
HostsOpt = Annotated[str, typer.Option("--hosts", help="Host group ('all' for every host; "
                                       "'sandbox' for the built-in local fleet).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON (schema: "
                                       "`orchestrate schema COMMAND`).")]
OnlyOpt = Annotated[list[str] | None, typer.Option("--only", help=f"Run only this stage "
                                                   f"({', '.join(STAGES)}); repeatable.")]
SkipOpt = Annotated[list[str] | None, typer.Option("--skip", help="Skip this stage; "
                                                   "repeatable.")]
RefreshOpt = Annotated[bool, typer.Option(
    "--refresh-facts", help="Gather every host's facts again, whatever the cache holds.")]
MaxAgeOpt = Annotated[str, typer.Option(
    "--facts-max-age", help="Reuse a host's cached facts (.orchestrate/facts) younger than "
                            "this: 90s, 30m, 1h, 2d; 0: never.")]
NoGatherOpt = Annotated[bool, typer.Option(
    "--no-gather", help="Reach no host for its facts: plan from fleet.yml's declarations "
                        "alone.")]
VaultOpt = Annotated[Path | None, typer.Option(
    "--vault-password-file", envvar="ANSIBLE_VAULT_PASSWORD_FILE",
    help="Opens the fleet's Vault-encrypted secrets file (API keys).")]


def _known_errors() -> tuple[type[Exception], ...]:
    # OSError: a run directory that cannot be written (disk full, permissions). The
    # sandbox's own errors can only come once `--hosts sandbox` has imported it.
    hosts = sys.modules.get("orchestrator.sandbox.hosts")
    return (OrchestrateError, OSError, *((hosts.SandboxError,) if hosts else ()))


def _fail(exc: Exception) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(getattr(exc, "exit_code", 1)) from None


@contextmanager
def _errors() -> Iterator[None]:
    """Every known failure ends as one line and its exit code, never a traceback."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, _known_errors()):
            raise
        _fail(exc)


def _log(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/dim]", highlight=False)


def _events(out: Console) -> Events:
    def progress(hosts: list[str]) -> AbstractContextManager[Callable[[Progress], None]]:
        return report.LiveProgress(out, hosts)

    return Events(log=_log, progress=progress)


def _emit(result: BaseModel) -> None:
    print(result.model_dump_json(indent=2))


# --- the built-in sandbox: imported here only, and only when asked for ---------------------

def _sandbox_state() -> Path:
    # Absolute: ansible-playbook runs from the project directory, not from here.
    return (STATE_DIR / "sandbox").resolve()


def _sandbox_fleet() -> tuple[LoadedFleet, Path]:
    """The sandbox's fleet and the password file of its secrets."""
    from orchestrator.sandbox import fleet as sandbox_fleet
    from orchestrator.sandbox import hosts as sandbox

    # First: without the `sandbox` extra it stops here, before anything is written.
    model = sandbox_fleet.sandbox_model()
    state = _sandbox_state()
    secrets_file, password_file = sandbox_fleet.sandbox_secrets(state)
    _log(f"note: {sandbox_fleet.STANDIN_NOTE}")
    loaded = sandbox_fleet.sandbox_fleet(sandbox.ensure_ssh_key(state), model, secrets_file,
                                         sandbox_fleet.sandbox_ollama_release(),
                                         mirror_dir=state / "mirror")
    return loaded, password_file


def _start_sandbox(hosts: list[str]) -> None:
    from orchestrator.knowledge.catalog import load_knowledge
    from orchestrator.sandbox import fleet as sandbox_fleet
    from orchestrator.sandbox import hosts as sandbox

    wheelhouse = sandbox_fleet.sandbox_wheelhouse(load_knowledge(), _log)
    sandbox.up(_sandbox_state(), count=len(hosts),
               ssh_base_port=sandbox_fleet.SSH_BASE_PORT,
               service_ports=[sandbox_fleet.VLLM_PORT, sandbox_fleet.OLLAMA_PORT,
                              sandbox_fleet.NODE_EXPORTER_PORT],
               mounts={wheelhouse: sandbox_fleet.WHEELHOUSE_MOUNT}, log=_log)


def _uses_sandbox(hosts: str, fleet: Path | None, inventory: Path | None) -> bool:
    return hosts == SANDBOX and no_fleet_given(fleet, inventory)


def _target(hosts: str, fleet: Path | None, inventory: Path | None,
            vault_password_file: Path | None = None) -> Target:
    """Which hosts, from where: the operator's files, or the built-in sandbox's fleet (with
    its own vault password) for `--hosts sandbox` where no fleet is given."""
    if _uses_sandbox(hosts, fleet, inventory):
        loaded, password_file = _sandbox_fleet()
        return Target(hosts=hosts, builtin=loaded, vault_password_file=password_file)
    return Target(hosts=hosts, fleet=fleet, inventory=inventory,
                  vault_password_file=vault_password_file)


def _facts_policy(no_gather: bool, refresh: bool, max_age: str,
                  directory: Path | None = None) -> FactsPolicy:
    """Where the plan's facts come from, as the options say."""
    age = parse_duration(max_age, key="--facts-max-age")
    given = [name for name, on in (("--no-gather", no_gather), ("--facts", directory),
                                    ("--refresh-facts", refresh)) if on]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} contradict each other: give one",
                          key=given[0])
    if no_gather:
        return NO_FACTS
    if directory is not None:
        return FactsPolicy("dir", directory=directory)
    return FactsPolicy("gather", max_age=age, refresh=refresh)


# --- commands --------------------------------------------------------------------------------

@app.command()
def init(
    fleet: FleetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a commented example fleet.yml to start from."""
    with _errors():
        result = init_flow.init(init_flow.InitOptions(path=fleet or DEFAULT_FLEET, force=force))
    if as_json:
        _emit(result)
    else:
        console.print(f"wrote {escape(result.path)}: {escape(result.next)}", highlight=False)


@app.command()
def plan(hosts: HostsOpt, fleet: FleetOpt = None, inventory: InventoryOpt = None,
         only: OnlyOpt = None, skip: SkipOpt = None, as_json: JsonOpt = False,
         refresh_facts: RefreshOpt = False, facts_max_age: MaxAgeOpt = "1h",
         no_gather: NoGatherOpt = False,
         facts_dir: Annotated[Path | None, typer.Option(
             "--facts", help="Plan offline from one file per host in this directory: "
                             "<host>.json (orchestrate facts --json's facts, or "
                             "playbooks/facts.yml's) or <host>.txt (saved nvidia-smi "
                             "output); no host is reached.")] = None) -> None:
    """Show what would be installed where, and why, from each host's facts (gathered first,
    or cached); changes nothing."""
    out = err if as_json else console
    with _errors():
        policy = _facts_policy(no_gather, refresh_facts, facts_max_age, facts_dir)
        result = plan_flow.plan(plan_flow.PlanOptions(
            _target(hosts, fleet, inventory), tuple(only or ()), tuple(skip or ()),
            facts=policy), _events(out))
    if as_json:
        _emit(result)
    else:
        report.plan_table(result, console, {h: o.line() for h, o in result.facts.items()})


@app.command()
def up(hosts: HostsOpt, fleet: FleetOpt = None, inventory: InventoryOpt = None,
       check: Annotated[bool, typer.Option("--check", help="Ansible check mode with diff: "
                                           "show changes, make none.")] = False,
       only: OnlyOpt = None, skip: SkipOpt = None, as_json: JsonOpt = False,
       vault_password_file: VaultOpt = None, refresh_facts: RefreshOpt = False,
       facts_max_age: MaxAgeOpt = "1h", no_gather: NoGatherOpt = False,
       update_revisions: Annotated[bool, typer.Option(
           "--update-revisions", help="Pin each moving model revision (a branch such as "
           "master) to the hub's current commit again; by default every run keeps the "
           "commit the first one pinned (.orchestrate/pins.json).")] = False,
       retry_failed: Annotated[bool, typer.Option(
           "--retry-failed", help="Only the hosts that failed or were unreachable in the "
           "group's last up (all members of a Ray cluster with one of them).")] = False,
       break_lock: Annotated[bool, typer.Option(
           "--break-lock", help="Take the group's lock (.orchestrate/locks) over even if "
           "another run, of this or another control host, seems to hold it.")] = False,
       rollback: Annotated[bool, typer.Option(
           "--rollback", help="Run the fleet file of the group's last successful up (its "
           "copy in that run's directory) instead of the current one, through the same "
           "rollout: batch after batch behind the health gate.")] = False
       ) -> None:
    """Gather the hosts' facts and plan from them, provision the hosts (stage by stage),
    then probe every deployment. Hosts whose driver the drivers stage installs are gathered
    again after it. With `mirror:` in the fleet, the weights are staged there first
    (fetched once, for every host) and, with mirror.listen, served from this machine while
    the playbooks run."""
    out = err if as_json else console
    with _errors():
        policy = _facts_policy(no_gather, refresh_facts, facts_max_age)
        target = _target(hosts, fleet, inventory, vault_password_file)
        if rollback and retry_failed:
            raise ConfigError("--rollback runs every host of the group; leave out "
                              "--retry-failed", key="--rollback")
        retry = (history_flow.retry_selection(target.runs_root, hosts) if retry_failed
                 else None)
        if retry is not None and not retry.hosts:
            nothing = history_flow.NothingToRetry(
                group=hosts, retry_of=retry.run_id,
                message=f"nothing to retry: every host passed in run {retry.run_id}")
            out.print(escape(nothing.message), highlight=False)
            if as_json:
                _emit(nothing)
            return
        result = up_flow.up(up_flow.UpOptions(
            target, check=check, only=tuple(only or ()), skip=tuple(skip or ()),
            facts=policy, update_revisions=update_revisions, retry=retry,
            break_lock=break_lock, rollback=rollback,
            before_facts=_start_sandbox if target.builtin is not None else None),
            _events(out))
    if result.mirror is not None and result.mirror.models:
        report.mirror_table(result.mirror.models, result.mirror.dir, out)
    report.run_summary(result.ansible.run_result(), out, result.run_dir)
    if result.mirror is not None and result.mirror.served is not None:
        report.mirror_traffic(result.mirror.served.traffic(), out)
    if result.probes is not None:
        report.probe_table(result.probes, out)
    out.print(f"report: {escape(result.report)}", highlight=False)
    if as_json:
        _emit(result)
    if not result.passed:
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
    out = err if as_json else console
    with _errors():
        result = probe_flow.probe(probe_flow.ProbeOptions(
            _target(hosts, fleet, inventory, vault_password_file), ssh=ssh, deep=deep),
            _events(out))
    if as_json:
        _emit(result)
    else:
        report.probe_table(result, console)
    out.print(f"report: {escape(result.report)}", highlight=False)
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
    out = err if as_json else console
    with _errors():
        result = bench_flow.bench(bench_flow.BenchOptions(
            _target(hosts, fleet, inventory, vault_password_file),
            deployments=tuple(deployment or ()), concurrency=concurrency, requests=requests,
            input_tokens=input_tokens, output_tokens=output_tokens), _events(out))
    report.probe_table(result.probes, out)
    report.bench_table(result.bench, out)
    out.print(f"report: {escape(result.report)}", highlight=False)
    if as_json:
        _emit(result)
    if not result.passed:
        raise typer.Exit(1)


@facts_app.callback(invoke_without_command=True)
def facts(ctx: typer.Context,
          hosts: Annotated[str | None, typer.Option(
              "--hosts", help="Host group ('all' for every host).")] = None,
          fleet: FleetOpt = None, inventory: InventoryOpt = None, as_json: JsonOpt = False,
          refresh: Annotated[bool, typer.Option(
              "--refresh", help="Gather every host again, whatever the cache holds.")] = False,
          facts_max_age: MaxAgeOpt = "1h") -> None:
    """Gather what each host of --hosts really has (GPUs, driver and CUDA, MIG, persistence,
    ECC, Fabric Manager need, OS, kernel and headers, Secure Boot, Python, RAM, free disk)
    over Ansible's connection, all hosts in one run, and cache it; exit 1 if a host was not
    reached (the others are still reported). `facts parse FILE` reads saved output."""
    if ctx.invoked_subcommand is not None:
        return
    if hosts is None:
        err.print(ctx.get_help(), highlight=False)
        err.print("error: give --hosts GROUP, or a command (parse)", highlight=False)
        raise typer.Exit(2)
    out = err if as_json else console
    with _errors():
        result = facts_flow.gather(_target(hosts, fleet, inventory), refresh,
                                   parse_duration(facts_max_age, key="--facts-max-age"),
                                   _events(out))
    if as_json:
        _emit(result)
    else:
        report.facts_tables(result.group, [(h.facts, f"{h.source}, {age_text(h.age_s)} old")
                                           for h in result.hosts], console)
    if result.unreachable:
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
        result = facts_flow.facts_parse(facts_flow.FactsOptions(
            file, tuple(columns.split(",")) if columns else None))
    if as_json:
        _emit(result)
    else:
        console.print(escape(result.summary), highlight=False)
        if result.error:
            console.print(f"[red]{escape(result.error.kind)}[/red]: "
                          f"{escape(result.error.message)}\n"
                          f"next: {escape(result.error.next_step)}")
    if result.error:
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
    """Which torch CUDA build and vLLM a host with this driver (and GPU) gets, and why;
    exit 2 if none."""
    with _errors():
        result = compat_flow.compat(compat_flow.CompatOptions(driver, gpu, compute_capability))
    if as_json:
        _emit(result)
    if result.refused is not None:
        err.print(f"[red]error:[/red] {escape(result.refused)}", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(2)
    if not as_json and result.torch is not None and result.vllm is not None:
        console.print(escape(f"{result.torch.requirement} from {result.torch.index_url} "
                             f"with vllm {result.vllm.version}"), highlight=False)
        for reason in result.reasons:
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
    with _errors():
        result = fit_flow.fit_model(fit_flow.FitOptions(
            model, gpu, count, max_model_len, nodes, memory_mib, facts_file))
    if as_json:
        _emit(result)
    if isinstance(result, fit_flow.FitRefusal):
        err.print(f"[red]error:[/red] {escape(result.refused)}", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(2)
    if not as_json:
        verdict = "[green]fits[/green]" if result.fits else "[red]does not fit[/red]"
        hosts = f"{nodes} hosts x " if nodes > 1 else ""
        found = f" (found in {result.found_in})" if result.found_in else ""
        console.print(f"{escape(model)} on {hosts}{result.count}x {escape(result.gpu)}"
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
        "--listen", help="[HOST:]PORT to serve on (default: mirror.listen, else loopback "
                         "on the port of the fleet's mirror.url; name an address for the "
                         "hosts to reach it).")] = None,
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
    as_json: JsonOpt = False, vault_password_file: VaultOpt = None,
) -> None:
    """Fetch the weights the group's hosts need once onto this machine (ModelScope with the
    real client, token from MODELSCOPE_API_TOKEN, or model_dir), checked by size and sha256,
    and the wheels and Ollama archive of the hosts that take them from the mirror; with
    mirror.url in the fleet, hosts take them from here."""
    out = err if as_json else console
    with _errors():
        target = _target(hosts, fleet, inventory, vault_password_file)
        # With mirror.token_var, --serve asks the hosts for it (opened before any download).
        token = mirror_flow.serve_token(target) if serve else None
        result = mirror_flow.mirror(mirror_flow.MirrorOptions(
            target, directory=directory, verify=verify,
            wheels=wheels, ollama=ollama, serve=serve, listen=listen), _events(out))
    if as_json:
        _emit(result)
    else:
        report.mirror_table(result.models, result.dir, console)
        report.mirror_packages(result.wheels.stacks, result.ollama.archives, result.dir,
                               console)
    if result.url is None:
        out.print("the fleet sets no mirror.url: hosts still fetch from the origin; add "
                  f"`mirror: {{url: http://THIS-MACHINE:{DEFAULT_PORT}}}` to use this mirror "
                  "(docs/airgapped.md)", highlight=False)
    if result.serve is not None:
        with _errors():
            mirror_flow.serve_mirror(Path(result.dir), result.serve, _log, token=token)


@app.command()
def status(hosts: HostsOpt, fleet: FleetOpt = None, inventory: InventoryOpt = None,
           as_json: JsonOpt = False, vault_password_file: VaultOpt = None) -> None:
    """A quick, read-only look: per deployment its systemd unit (state, restarts), the
    weights' revision and the vLLM, torch and driver versions (one Ansible run over every
    host), /health and /v1/models over HTTP, and the group's last run; exit 1 if a
    deployment is down or hosts run different versions (skew)."""
    with _errors():
        result = status_flow.status(status_flow.StatusOptions(
            _target(hosts, fleet, inventory, vault_password_file)))
    if as_json:
        _emit(result)
    else:
        report.status_table(result.group, result.deployments, result.unreachable,
                            result.skew, console)
        last = result.last_run
        console.print("last run: none in .orchestrate/runs" if last is None else
                      f"last run: {escape(last.run_id)} ({escape(last.command)}, "
                      f"{last.started:%Y-%m-%d %H:%M:%S}): "
                      + {True: "[green]passed[/green]", False: "[red]failed[/red]",
                         None: "no result"}[last.passed], highlight=False)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def monitoring(hosts: HostsOpt, out: Annotated[Path, typer.Option(
                   "--out", help="Folder to write prometheus.yml, targets/, rules/ and "
                                 "dashboards/ into (made if missing; an existing "
                                 "Prometheus's config folder works).")],
               fleet: FleetOpt = None, inventory: InventoryOpt = None,
               as_json: JsonOpt = False) -> None:
    """Write what a Prometheus needs to watch the group: scrape config with file_sd targets
    (node_exporter per host, each vLLM instance's /metrics), alert rules, and a Grafana
    dashboard; reaches no host (`up` writes the same into its run directory)."""
    with _errors():
        result = monitoring_flow.monitoring(_target(hosts, fleet, inventory), out,
                                            _events(err if as_json else console))
    if as_json:
        _emit(result)
        return
    for t in result.plan.targets:
        console.print(f"{escape(t.job)}  {escape(t.address)}  "
                      + " ".join(f"{escape(k)}={escape(v)}" for k, v in t.labels.items())
                      + ("  [yellow]open[/yellow]" if t.open else ""), highlight=False)
    console.print(f"wrote {len(result.files)} files to {escape(result.out)}: "
                  f"{escape(', '.join(result.files))}", highlight=False)


@app.command()
def logs(hosts: HostsOpt, fleet: FleetOpt = None, inventory: InventoryOpt = None,
         deployment: Annotated[str | None, typer.Option(
             "--deployment", help="Only this deployment's units.")] = None,
         since: Annotated[str | None, typer.Option(
             "--since", help="Only entries of the last 90s, 30m, 1h, 2d.")] = None,
         lines: Annotated[int, typer.Option(
             "--lines", "-n", min=1, help="At most the last N entries per host (the first "
                                          "read; --follow then prints every new one).")] = 200,
         follow: Annotated[bool, typer.Option(
             "--follow", "-F", help="Keep reading every few seconds, until Ctrl-C.")] = False,
         as_json: JsonOpt = False) -> None:
    """The journals of the deployments' units (vllm@, ollama, ray) on each host, through
    the connection the stages use (playbooks/logs.yml), each line prefixed with its host and
    unit; exit 1 if a host's journal could not be read (the others still print)."""
    def emit(records: list[logs_flow.LogRecord], unreached: list[logs_flow.Unreached]) -> None:
        for r in records:
            if as_json:
                print(r.model_dump_json(), flush=True)
            else:
                console.print(report.log_line(r.host, r.unit, r.time, r.message),
                              highlight=False, soft_wrap=True)
        for u in unreached:
            if as_json:
                print(u.model_dump_json(), flush=True)
            else:
                console.print(f"[yellow]{report.shown(u.host, one_line=True)}: its journal "
                              f"was not read[/yellow]: {report.shown(u.reason, one_line=True)}",
                              highlight=False, soft_wrap=True)

    with _errors():
        found = logs_flow.journals(logs_flow.LogsOptions(
            _target(hosts, fleet, inventory, None), deployment,
            parse_duration(since, key="--since") if since else None, lines))
        if follow:
            try:
                logs_flow.follow(found, emit)
            except (KeyboardInterrupt, Interrupted):
                # Ctrl-C is how following ends: no error line, the shell's code for it.
                raise typer.Exit(130) from None
        result = logs_flow.read_once(found)
    if as_json:
        _emit(result)
    else:
        emit(result.records, result.unreachable)
        if not result.records and not result.unreachable:
            console.print("no journal entries", highlight=False)
    if result.unreachable:
        raise typer.Exit(1)


@app.command()
def down(hosts: HostsOpt, fleet: FleetOpt = None, inventory: InventoryOpt = None,
         check: Annotated[bool, typer.Option(
             "--check", help="Show what would be removed on each host; remove nothing.")] = False,
         yes: Annotated[bool, typer.Option(
             "--yes", help="Remove without asking (scripts; required without a terminal).")
         ] = False,
         purge_env: Annotated[bool, typer.Option(
             "--purge-env", help="Also remove the Python environment (vLLM, torch, Ray).")
         ] = False,
         purge_weights: Annotated[bool, typer.Option(
             "--purge-weights", help="Also remove the weights and Ollama's models.")] = False,
         no_gather: NoGatherOpt = False, vault_password_file: VaultOpt = None,
         as_json: JsonOpt = False) -> None:
    """Tear down a group (playbooks/teardown.yml): stop and remove the vLLM instances, Ollama
    and the Ray units `up` installed, their users, state and environment files; the NVIDIA
    driver, the Python environment and the weights stay unless purged. Shows what it will
    remove on each host and asks first. `--hosts sandbox` (no fleet file) removes the
    built-in sandbox's containers."""
    out = err if as_json else console
    if _uses_sandbox(hosts, fleet, inventory):
        def remove() -> list[str]:
            from orchestrator.sandbox import hosts as sandbox

            return sandbox.down(STATE_DIR / "sandbox", _log)

        with _errors():
            given = [name for name, on in (("--check", check), ("--purge-env", purge_env),
                                            ("--purge-weights", purge_weights)) if on]
            if given:
                raise ConfigError(f"the built-in sandbox is removed whole: {given[0]} applies "
                                  "to a fleet's hosts", key=given[0])
            result = down_flow.down(down_flow.DownOptions(hosts, remove_sandbox=remove))
        if as_json:
            _emit(result)
        else:
            console.print(f"removed {escape(', '.join(result.removed))}" if result.removed
                          else "no sandbox hosts were running")
        return

    def confirm(found: dict[str, down_flow.HostTeardown]) -> bool:
        _teardown_lines(found, out, "would remove")
        return yes or typer.confirm(f"Remove these from {len(found)} host(s) of '{hosts}'?",
                                    default=False, err=True)

    with _errors():
        if not (yes or check or sys.stdin.isatty()):
            raise ConfigError("`down` asks before it removes anything, and there is no "
                              "terminal to ask on: pass --yes to remove without asking, or "
                              "--check to only see what would be removed", key="--yes")
        result = down_flow.down(down_flow.DownOptions(
            hosts, target=_target(hosts, fleet, inventory, vault_password_file), check=check,
            purge_env=purge_env, purge_weights=purge_weights, no_gather=no_gather,
            confirm=confirm), _events(out))
    if check:
        _teardown_lines({n: h for n, h in result.hosts.items() if not h.empty}, out,
                        "would remove")
    elif result.removed:
        _teardown_lines({n: result.hosts[n] for n in result.removed}, out, "removed")
    for failure in result.failures:
        out.print(f"[red]{escape(failure.host)}[/red]: {escape(failure.task)}: "
                  f"{escape(failure.message)}", highlight=False, soft_wrap=True)
    if result.passed and not any(not h.empty for h in result.hosts.values()):
        out.print(f"nothing to remove on the hosts of '{escape(hosts)}'", highlight=False)
    out.print(f"run: {escape(result.run_dir or '')}", highlight=False)
    if as_json:
        _emit(result)
    if not result.passed:
        raise typer.Exit(1)


def _teardown_lines(found: dict[str, down_flow.HostTeardown], out: Console, verb: str) -> None:
    """Per host, what the teardown removes (or would)."""
    for name, host in found.items():
        out.print(f"[bold]{escape(name)}[/bold] {verb}:", highlight=False)
        for label, items in (("units", host.units), ("users", host.users),
                             ("files", host.files)):
            if items:
                out.print(f"  {label}: {escape(', '.join(items))}", highlight=False)


@history_app.callback(invoke_without_command=True)
def history(ctx: typer.Context,
            hosts: Annotated[str | None, typer.Option(
                "--hosts", help="Only this group's runs (default: every group).")] = None,
            limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many "
                                               "runs.")] = 20,
            as_json: JsonOpt = False) -> None:
    """Past runs kept in .orchestrate/runs, newest first: command, group, outcome per host,
    changed tasks, duration, who ran it, the fleet file's hash. `history show ID`: one run
    in full."""
    if ctx.invoked_subcommand is not None:
        return
    result = history_flow.history(history_flow.HistoryOptions(
        STATE_DIR / "runs", group=hosts, limit=limit))
    if as_json:
        _emit(result)
    else:
        console.print(history_flow.history_table(result))


@history_app.command("show")
def history_show(run_id: Annotated[str, typer.Argument(
                     metavar="ID", help="A run id, as `orchestrate history` lists them.")],
                 as_json: JsonOpt = False) -> None:
    """One run in full: per host its outcome, failed tasks and probes, and the release."""
    with _errors():
        record = history_flow.show(STATE_DIR / "runs", run_id)
    if as_json:
        _emit(record)
    else:
        console.print(history_flow.record_view(record), highlight=False)


@app.command()
def schema(
    command: Annotated[list[str] | None, typer.Argument(
        help="A command, e.g. up or facts parse; none: list the commands.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the commands.")] = False,
    markdown: Annotated[bool, typer.Option(
        "--markdown", help="Print docs/json.md: every command's fields and schema.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The JSON Schema of a command's --json output (docs/json.md documents them all)."""
    if markdown:
        sys.stdout.write(schemas.markdown())
        return
    if list_ or not command:
        if as_json:
            print(json.dumps(list(schemas.COMMANDS), indent=2))
        else:
            for c in schemas.COMMANDS.values():
                console.print(f"{c.name:12} {escape(c.summary)}", highlight=False)
        return
    with _errors():
        found = schemas.command(" ".join(command))
    print(json.dumps(found.schema(), indent=2))
