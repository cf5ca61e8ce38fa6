"""What the plan works from on each host: its facts where they were gathered, else the fleet's
declarations; and where each value came from, for the plan's reasons.

A host's `gpu:` in fleet.yml is an expectation once its facts exist: a host that differs
is refused (naming both sides) rather than planned for GPUs or a driver it does not have.
Pure like the planner: the facts are passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from orchestrator.config.fleet import GpuSettings, LoadedFleet, ResolvedHost
from orchestrator.config.yamlsource import dotted
from orchestrator.errors import PlanError
from orchestrator.facts.hostfacts import DiskFree, HostFacts, NvidiaFacts, same_gpu

GIB_MIB = 1024


@dataclass(frozen=True)
class Source:
    """Where a host's planned GPU values come from, and what the facts add to the reasons."""

    facts: HostFacts | None
    # The GPUs (name, count, memory) and the driver were read on the host.
    found: bool
    gpu_where: str
    driver_where: str
    capability: str | None = None
    memory_mib: int | None = None
    notes: tuple[str, ...] = ()


def declared_in(loaded: LoadedFleet, loc: tuple[str | int, ...]) -> str:
    """'declared in <file>:<line> (<key>)': how a reason cites a value of the fleet."""
    return f"declared in {_file_line(loaded, loc)} ({dotted(loc)})"


def _file_line(loaded: LoadedFleet, loc: tuple[str | int, ...]) -> str:
    parts = tuple(str(part) for part in loc)
    for doc in loaded.documents:
        if parts in doc.lines:
            return f"{doc.path}:{doc.lines[parts]}"
    return loaded.source


def _gpu_key(loaded: LoadedFleet, host: ResolvedHost, field: str) -> tuple[str, ...] | None:
    """The fleet key that sets gpu.<field> for `host`: the most specific layer's."""
    group = loaded.fleet.groups.get(host.group)
    layers: list[tuple[tuple[str, ...], GpuSettings | None]] = [
        (("defaults",), loaded.fleet.defaults.gpu)]
    if group is not None:
        layers.append((("groups", host.group), group.gpu))
        entry = group.hosts.get(host.name)
        if entry is not None:
            layers.append((("groups", host.group, "hosts", host.name), entry.gpu))
    for prefix, gpu in reversed(layers):
        if gpu is not None and getattr(gpu, field) is not None:
            return (*prefix, "gpu", field)
    return None


def _declared(loaded: LoadedFleet, host: ResolvedHost, field: str, default: str) -> str:
    key = _gpu_key(loaded, host, field)
    return declared_in(loaded, key) if key else default


def _from_declarations(loaded: LoadedFleet, host: ResolvedHost, why: str) -> Source:
    # A cpu-profile host plans no GPU, so it misses nothing without facts.
    notes = ((f"GPUs and driver as the fleet declares them: no facts of the host ({why})",)
             if host.profile == "gpu" else ())
    return Source(facts=None, found=False,
                  gpu_where=_declared(loaded, host, "name", "not declared (gpu.name)"),
                  driver_where=_declared(loaded, host, "driver", "not declared (gpu.driver)"),
                  notes=notes)


def _found_text(nvidia: NvidiaFacts) -> str:
    gpus = nvidia.gpus
    return f"{len(gpus)}x {gpus[0].name}, driver {nvidia.driver_version}"


def _differences(loaded: LoadedFleet, host: ResolvedHost, name: str | None, count: int | None,
                 driver: str | None, found: str, where: str) -> str | None:
    """One line naming what the fleet declares and the host has, or None when they agree."""
    declared = host.gpu
    differ = []
    if declared.name and (name is None or not same_gpu(declared.name, name)):
        differ.append(("name", declared.name))
    if declared.count and declared.count != count:
        differ.append(("count", f"{declared.count} GPU{'s' if declared.count > 1 else ''}"))
    if declared.driver and declared.driver != driver:
        differ.append(("driver", f"driver {declared.driver}"))
    if not differ:
        return None
    keys = [_gpu_key(loaded, host, field) for field, _ in differ]
    places = ", ".join(f"{_file_line(loaded, key)} ({dotted(key)})" for key in keys if key)
    files = sorted({_file_line(loaded, key).rsplit(":", 1)[0] for key in keys if key})
    return (f"host '{host.name}': {places} declares {', '.join(text for _, text in differ)}; "
            f"{where} {found}: correct or remove gpu: in {', '.join(files)}")


def _fabric_manager(loaded: LoadedFleet, host: ResolvedHost, facts: HostFacts,
                    problems: list[str], notes: list[str]) -> ResolvedHost:
    """NVSwitch systems need Fabric Manager at the driver's version: on from the facts where
    the toolkit installs the driver and the fleet leaves it unset."""
    nvidia = facts.nvidia
    if nvidia is None or not nvidia.fabric_manager_needed:
        return host
    switches = f"{nvidia.nvswitches} NVSwitches on the PCI bus, {facts.where('host')}"
    setting = host.driver.fabric_manager
    if setting is False:
        key = host.driver_keys.get("fabric_manager", ("driver", "fabric_manager"))
        problems.append(f"host '{host.name}': {_file_line(loaded, key)} ({dotted(key)}) "
                        f"turns Fabric Manager off, but {switches}: an NVSwitch system's GPUs "
                        "do not start CUDA work without it; remove driver.fabric_manager: false")
        return host
    if not host.driver.manage:
        notes.append(f"{switches}: Fabric Manager must run at the driver's version (the "
                     "host's owners install it with their driver)")
        return host
    if setting is None:
        notes.append(f"Fabric Manager installed with the driver: {switches}")
        return replace(host, driver=host.driver.model_copy(update={"fabric_manager": True}))
    return host


def _from_facts(loaded: LoadedFleet, host: ResolvedHost, facts: HostFacts,
                problems: list[str]) -> tuple[ResolvedHost, Source]:
    where = facts.where()
    nvidia = facts.nvidia
    if host.profile != "gpu":
        unused = ((f"{_found_text(nvidia)} {where}: not used, profile {host.profile}",)
                  if nvidia is not None and nvidia.gpus else ())
        return host, Source(facts=facts, found=False, gpu_where="profile cpu",
                            driver_where="profile cpu", notes=unused)
    if nvidia is None:
        source = _from_declarations(loaded, host, f"the facts {where} hold no NVIDIA part")
        return host, replace(source, facts=facts)
    state = nvidia.driver_state
    notes: list[str] = []
    if state == "no_gpu":
        problems.append(f"host '{host.name}': profile gpu, but no NVIDIA GPU {where}: set "
                        "profile: cpu for it, or check that its GPUs are passed through")
    elif state == "broken":
        assert nvidia.error is not None  # broken: an error, or no GPU listed
        problems.append(f"host '{host.name}': the NVIDIA driver does not answer ({where}): "
                        f"{' '.join(nvidia.error.message.split())}: {nvidia.error.next_step}")
    elif state == "not_installed":
        pci = (f", {nvidia.pci_gpus} NVIDIA GPU{'s' if nvidia.pci_gpus > 1 else ''} on its "
               "PCI bus" if nvidia.pci_gpus else "")
        missing = f"no NVIDIA driver {where}{pci}"
        if not host.driver.manage:
            problems.append(f"host '{host.name}': {missing}: set driver: {{manage: true}} in "
                            f"{loaded.source} (its group's or the host's driver key) to have "
                            "the drivers stage install one, or profile: cpu")
        else:
            differ = _differences(loaded, host, host.gpu.name, nvidia.pci_gpus or host.gpu.count,
                                  None, "no NVIDIA driver" + pci, where)
            if differ:
                problems.append(differ)
            notes.append(f"{missing}: the drivers stage installs one")
            count = nvidia.pci_gpus or host.gpu.count
            gpu_where = (f"{_declared(loaded, host, 'name', 'not declared (gpu.name)')}; "
                         f"count {where}" if nvidia.pci_gpus else
                         _declared(loaded, host, "name", "not declared (gpu.name)"))
            host = replace(host, gpu=GpuSettings(name=host.gpu.name, count=count))
            host = _fabric_manager(loaded, host, facts, problems, notes)
            return host, Source(facts=facts, found=False, gpu_where=gpu_where,
                                driver_where=where, notes=tuple(notes))
    else:
        gpus = nvidia.gpus
        names = sorted({g.name for g in gpus})
        if len(names) > 1:
            problems.append(f"host '{host.name}': GPUs of different models {where} "
                            f"({', '.join(names)}); vLLM splits a model evenly over identical "
                            "GPUs: plan it as profile cpu or give it identical GPUs")
        differ = _differences(loaded, host, gpus[0].name, len(gpus), nvidia.driver_version,
                              _found_text(nvidia), where)
        if differ:
            problems.append(differ)
        mig = [g.index for g in gpus if (g.mig_mode or "").lower() == "enabled"]
        if mig:
            notes.append(f"MIG enabled on GPU {', '.join(map(str, mig))} {where}: vLLM sees "
                         f"its {len(nvidia.mig_devices)} MIG devices, not the whole GPUs")
        host = replace(host, gpu=GpuSettings(name=gpus[0].name, count=len(gpus),
                                             driver=nvidia.driver_version))
        host = _fabric_manager(loaded, host, facts, problems, notes)
        return host, Source(facts=facts, found=True, gpu_where=where, driver_where=where,
                            capability=gpus[0].compute_capability,
                            memory_mib=gpus[0].memory_total_mib, notes=tuple(notes))
    return host, Source(facts=facts, found=False, gpu_where=where, driver_where=where)


def effective_hosts(loaded: LoadedFleet, hosts: list[ResolvedHost],
                    facts: Mapping[str, HostFacts] | None
                    ) -> dict[str, tuple[ResolvedHost, Source]]:
    """Each host as the plan takes it: its GPU settings replaced by what its facts show, with
    the source of each value. PlanError listing every host whose facts refuse it (declared
    GPUs that differ, no GPU, a driver that does not answer), one line each."""
    problems: list[str] = []
    chosen: dict[str, tuple[ResolvedHost, Source]] = {}
    for host in hosts:
        found = facts.get(host.name) if facts is not None else None
        if found is None:
            why = ("the plan was made without facts" if facts is None else
                   "none gathered or given for it")
            chosen[host.name] = host, _from_declarations(loaded, host, why)
        elif not found.reachable:
            why = f"unreachable: {found.unreachable or 'no reason recorded'}"
            chosen[host.name] = host, replace(_from_declarations(loaded, host, why), facts=found)
        else:
            chosen[host.name] = _from_facts(loaded, host, found, problems)
    if problems:
        raise PlanError("the hosts' facts refuse the plan:\n  " + "\n  ".join(problems))
    return chosen


def check_disk(host: ResolvedHost, source: Source, needs: list[tuple[str, float, str]]
               ) -> list[str]:
    """The free space found against what the plan puts on each path (path, GiB, what),
    summed per mount; reasons, or PlanError naming host, path, mount, free and needed."""
    facts = source.facts
    if facts is None or not facts.reachable:
        return []
    measured = {disk.path: disk for disk in facts.disk}
    per_mount: dict[str, tuple[DiskFree, float, list[str]]] = {}
    unmeasured = []
    for path, gib, what in needs:
        disk = measured.get(path)
        if disk is None:
            unmeasured.append(path)
            continue
        _, total, whats = per_mount.get(disk.mount, (disk, 0.0, []))
        per_mount[disk.mount] = disk, total + gib, [*whats, f"{what} in {path}"]
    reasons = []
    for mount, (disk, total, whats) in per_mount.items():
        free = disk.free_mib / GIB_MIB
        if free < total:
            raise PlanError(f"host '{host.name}': the filesystem mounted at {mount} has "
                            f"{free:.1f} GiB free, {facts.where('host')}; the plan needs "
                            f"{total:.1f} GiB there ({', '.join(whats)}): free space there, or "
                            "put the Python environment elsewhere (python.path)")
        reasons.append(f"disk: {free:.1f} GiB free on {mount} {facts.where('host')}, "
                       f"{total:.1f} GiB needed ({', '.join(whats)})")
    if unmeasured:
        reasons.append(f"disk: free space not measured at {', '.join(unmeasured)}; the "
                       "preflight stage checks it")
    return reasons
