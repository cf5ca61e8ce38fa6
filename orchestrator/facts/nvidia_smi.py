"""Parse what `nvidia-smi` prints on a host into typed GPU facts.

nvidia-smi's human-readable output is not a stable interface: drivers 610+ renamed
"Driver Version"/"CUDA Version" to "KMD Version"/"CUDA UMD Version", column widths
change between releases and names get truncated. So every parser here reads values
by their labels (banner keys, table header cells, XML tags, CSV header names), never
by character offsets, and answers with an "unrecognized" error instead of guessing
when the labels it needs are not there.

Pure functions: the caller runs nvidia-smi (stdout and stderr together) and passes
the text in. Standard library only, and Python 3.9 compatible: the same file is the
module_utils of the `nvidia_gpu_facts` Ansible module (roles/gpu_check), which runs it
on the hosts (RHEL 9 ships Python 3.9), so hosts and planner read nvidia-smi alike.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from typing import Any, Literal

ErrorKind = Literal[
    "driver_not_loaded",
    "version_mismatch",
    "no_devices",
    "device_handle",
    "not_installed",
    "unrecognized",
]


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str | None = None
    memory_total_mib: int | None = None
    compute_capability: str | None = None
    mig_mode: str | None = None
    # "Enabled" / "Disabled" as nvidia-smi's -q and CSV print them; None: not reported
    # (Windows WDDM, a GPU without ECC, or a format that lacks the field).
    persistence_mode: str | None = None
    ecc_mode: str | None = None


@dataclasses.dataclass(frozen=True)
class MigDevice:
    gpu_index: int
    profile: str | None
    uuid: str


@dataclasses.dataclass(frozen=True)
class SmiError:
    kind: ErrorKind
    message: str
    next_step: str


@dataclasses.dataclass(frozen=True)
class GpuFacts:
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: list[GpuInfo] = dataclasses.field(default_factory=list)
    mig_devices: list[MigDevice] = dataclasses.field(default_factory=list)
    error: SmiError | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of `orchestrate facts parse --json` and of the Ansible fact."""
        return dataclasses.asdict(self)


NEXT_STEPS: dict[ErrorKind, str] = {
    "driver_not_loaded": (
        "the nvidia kernel module is not loaded: check `lsmod | grep nvidia` and "
        "`dkms status` (module built for the running kernel?), whether Secure Boot "
        "rejects the unsigned module (`mokutil --sb-state`), and whether nouveau is "
        "loaded instead (`lsmod | grep nouveau`); then rerun the drivers stage"
    ),
    "version_mismatch": (
        "the loaded kernel module and the user-space libraries differ, usually after a "
        "driver upgrade without reboot: reboot the host, or reload the nvidia modules"
    ),
    "no_devices": (
        "the driver runs but sees no GPU: check `lspci | grep -i nvidia` on the host, "
        "the VM's PCI passthrough or the container's device mapping, and that this "
        "driver supports the GPU (new architectures may need the open kernel modules)"
    ),
    "device_handle": (
        "a GPU is on the PCI bus but the driver cannot open it: read "
        "`dmesg | grep -e NVRM -e Xid` (fallen off the bus, PCI resources), then "
        "power-cycle the host; if it persists, check the card, its slot and power"
    ),
    "not_installed": (
        "nvidia-smi is not installed on this host: install the NVIDIA driver "
        "(the drivers stage), then rerun"
    ),
    "unrecognized": (
        "nvidia-smi printed something this parser does not know (a new driver format, "
        "or a failure not listed): read the message, run nvidia-smi on the host by hand, "
        "and extend orchestrator/facts/nvidia_smi.py with that output as a fixture"
    ),
}

# Whole-output failures: nvidia-smi prints one of these instead of any report.
_FATAL: list[tuple[ErrorKind, re.Pattern[str]]] = [
    ("not_installed", re.compile(
        r"nvidia-smi(?:\.exe)?'?:?\s+(?:command\s+)?not found"
        r"|No such file or directory.*nvidia-smi|nvidia-smi.*No such file or directory"
        r"|'nvidia-smi' is not recognized as an internal or external command"
        r"|couldn't find libnvidia-ml\.so", re.IGNORECASE)),
    ("driver_not_loaded", re.compile(
        r"couldn't communicate with the NVIDIA driver|NVML: Driver Not Loaded", re.IGNORECASE)),
    ("version_mismatch", re.compile(r"Driver/library version mismatch", re.IGNORECASE)),
    ("no_devices", re.compile(r"No devices were found", re.IGNORECASE)),
]
# Printed per broken GPU; the other GPUs may still be reported after it.
_DEVICE_HANDLE = re.compile(r"Unable to determine the device handle for", re.IGNORECASE)

_VERSION = re.compile(r"\d+(?:\.\d+)*")
# Label pairs in precedence order: drivers 610+ print the KMD/UMD labels and mark the
# old ones "Deprecated" (see `nvidia-smi --version` on 610.57.04).
_DRIVER_LABELS = ("kmd version", "driver version")
_CUDA_LABELS = ("cuda umd version", "cuda version")


def _error(kind: ErrorKind, message: str) -> SmiError:
    return SmiError(kind=kind, message=message, next_step=NEXT_STEPS[kind])


def _unrecognized(message: str) -> GpuFacts:
    return GpuFacts(error=_error("unrecognized", message))


def _first_line(text: str, limit: int = 120) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit] + "..."


def _text(value: str | None) -> str | None:
    # nvidia-smi's ways of printing "no value", in its various formats.
    text = (value or "").strip()
    return None if text in ("", "N/A", "[N/A]", "[Not Supported]") else text


def _mib(value: str | None) -> int | None:
    # "81559 MiB" (csv, -q, XML) or "81559" (nounits); anything else is not a size.
    match = re.fullmatch(r"\s*(\d+)(?:\s*MiB)?\s*", value or "")
    return int(match.group(1)) if match else None


def _versions(labels: dict[str, str]) -> tuple[str | None, str | None]:
    """Driver and CUDA versions from lower-cased label -> value pairs."""
    def pick(keys: tuple[str, ...]) -> str | None:
        for key in keys:
            value = labels.get(key, "").strip()
            if _VERSION.fullmatch(value):  # skips "N/A" and "Deprecated, see ..."
                return value
        return None
    return pick(_DRIVER_LABELS), pick(_CUDA_LABELS)


# ---------------------------------------------------------------- the plain table

_RULE = re.compile(r"[+|][-=+|]*")
_BANNER = re.compile(r"\s*\|\s*NVIDIA-SMI\s")
_BANNER_PAIR = re.compile(r"([A-Za-z][A-Za-z ]*?)\s*:\s*(\S+)")
_NAME_HEADER = re.compile(r"\s*GPU\s+Name\b")
_MEMORY_USAGE = re.compile(r"(\d+)\s*MiB\s*/\s*(\d+)\s*MiB")
# The table's Persistence-M column prints On/Off; the other formats Enabled/Disabled.
_ON_OFF = {"On": "Enabled", "Off": "Disabled"}


def _cells(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") else inner
    return inner.split("|")


def _is_name_header(line: str) -> bool:
    return line.lstrip().startswith("|") and bool(_NAME_HEADER.match(_cells(line)[0]))


def parse_table(text: str) -> GpuFacts:
    """The default `nvidia-smi` report (Linux, Windows WDDM/TCC, MIG, 610+ banner)."""
    lines = text.splitlines()
    banner = next((ln for ln in lines if _BANNER.match(ln)), "")
    labels = {k.strip().lower(): v for k, v in _BANNER_PAIR.findall(banner)}
    driver, cuda = _versions(labels)

    start = next((i for i, ln in enumerate(lines) if _is_name_header(ln)), None)
    if start is None:
        return _unrecognized("nvidia-smi table without a 'GPU  Name' header: "
                            + _first_line(text))
    end = next((i for i in range(start, len(lines)) if lines[i].lstrip().startswith("|=")),
               None)
    if end is None:
        return _unrecognized("nvidia-smi table header is not closed by a '|===' rule")
    header = [_cells(ln) for ln in lines[start:end]]
    width = len(header[0])

    def where(test: re.Pattern[str]) -> tuple[int, int] | None:
        # Header cells stack several labels on up to three lines; a GPU's values sit in
        # the same line and cell of its block, whatever the column widths are.
        for i, row in enumerate(header):
            for j, cell in enumerate(row):
                if test.search(cell):
                    return i, j
        return None

    name_at = (0, 0)
    # A label after "Name" (Persistence-M, TCC/WDDM, Driver-Model) is one value token.
    trailing_label = _NAME_HEADER.sub("", header[0][0]).strip()
    trailing = bool(trailing_label)
    memory_at = where(re.compile(r"\bMemory-Usage\b"))
    mig_at = where(re.compile(r"^\s*MIG M\.\s*$"))

    blocks: list[list[list[str]]] = []
    block: list[list[str]] = []
    for line in lines[end + 1:]:
        stripped = line.strip()
        if _RULE.fullmatch(stripped):
            if block:
                blocks.append(block)
            block = []
            continue
        row = _cells(stripped)
        # A blank line or a row of another shape ("| Processes: |") ends the GPU section.
        if not stripped.startswith("|") or len(row) != width:
            break
        block.append(row)
    if block:
        blocks.append(block)

    def value(rows: list[list[str]], at: tuple[int, int] | None) -> str | None:
        if at is None or at[0] >= len(rows) or at[1] >= len(rows[at[0]]):
            return None
        return rows[at[0]][at[1]]

    gpus: list[GpuInfo] = []
    for rows in blocks:
        match = re.fullmatch(r"\s*(\d+)\s+(\S.*?)\s*", value(rows, name_at) or "")
        if not match:
            return _unrecognized("nvidia-smi table: no GPU index and name in "
                                + repr(value(rows, name_at)))
        name, mode = match.group(2), ""
        if trailing:
            parts = name.rsplit(None, 1)
            if len(parts) != 2:
                return _unrecognized(f"nvidia-smi table: cannot split name from mode in {name!r}")
            name, mode = parts
        memory = _MEMORY_USAGE.search(value(rows, memory_at) or "")
        persistence = (_ON_OFF.get(mode) if trailing_label == "Persistence-M" else None)
        gpus.append(GpuInfo(index=int(match.group(1)), name=name,
                            memory_total_mib=int(memory.group(2)) if memory else None,
                            mig_mode=_text(value(rows, mig_at)),
                            persistence_mode=persistence))
    if not gpus:
        return _unrecognized("nvidia-smi table without GPU rows")
    # The table's "MIG devices" section has no UUIDs or profile names; use -L for those.
    return GpuFacts(driver_version=driver, cuda_version=cuda, gpus=gpus)


# ---------------------------------------------------------------- -q -x (XML)

def parse_xml(text: str) -> GpuFacts:
    """`nvidia-smi -q -x`, with or without the DOCTYPE line."""
    try:
        root = ET.fromstring(text.strip())
    except ET.ParseError as exc:
        return _unrecognized(f"nvidia-smi XML does not parse: {exc}")
    if root.tag != "nvidia_smi_log":
        return _unrecognized(f"XML root is <{root.tag}>, not <nvidia_smi_log>")
    labels = {child.tag.replace("_", " "): (child.text or "") for child in root}
    driver, cuda = _versions(labels)
    gpus: list[GpuInfo] = []
    # The XML has no index element (minor_number is not the index); nvidia-smi lists
    # GPUs in index order, so the position is the index.
    for position, gpu in enumerate(root.findall("gpu")):
        name = _text(gpu.findtext("product_name"))
        if name is None:
            return _unrecognized(f"nvidia-smi XML: <gpu> {position} has no product_name")
        gpus.append(GpuInfo(index=position, name=name, uuid=_text(gpu.findtext("uuid")),
                            memory_total_mib=_mib(gpu.findtext("fb_memory_usage/total")),
                            mig_mode=_text(gpu.findtext("mig_mode/current_mig")),
                            persistence_mode=_text(gpu.findtext("persistence_mode")),
                            ecc_mode=_text(gpu.findtext("ecc_mode/current_ecc"))))
    # <mig_devices> entries carry no UUIDs or profile names; use -L for those.
    return GpuFacts(driver_version=driver, cuda_version=cuda, gpus=gpus)


# ---------------------------------------------------------------- health (-q -x)

# Clock event reasons that say the GPU is held back by heat or by its power delivery,
# not by load or settings (nvml.h nvmlClocksEventReason*; the XML's tag suffixes).
HARDWARE_SLOWDOWNS = ("hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown",
                      "sw_thermal_slowdown")


@dataclasses.dataclass(frozen=True)
class GpuHealth:
    index: int
    name: str
    ecc_mode: str | None = None
    # Uncorrectable ECC errors since the driver loaded (volatile); None: not reported,
    # e.g. ECC off or a GPU without ECC.
    ecc_volatile_uncorrected: int | None = None
    # Active clock event (throttle) reasons by their XML names: gpu_idle, sw_power_cap, ...
    clock_event_reasons: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class HealthReport:
    gpus: list[GpuHealth] = dataclasses.field(default_factory=list)
    error: SmiError | None = None


def _count(value: str | None) -> int | None:
    text = _text(value)
    return int(text) if text is not None and text.isdigit() else None


def _volatile_uncorrected(volatile: ET.Element | None) -> int | None:
    """Drivers before 515 list single_bit/double_bit counts with a total; later ones
    sram_/dram_ counts, the uncorrectable ones named so (570+ split SRAM into parity and
    SEC-DED)."""
    if volatile is None:
        return None
    double = volatile.find("double_bit")
    if double is not None:
        total = _count(double.findtext("total"))
        if total is not None:
            return total
        counts = [_count(child.text) for child in double]
    else:
        counts = [_count(child.text) for child in volatile if "uncorrectable" in child.tag]
    known = [c for c in counts if c is not None]
    return sum(known) if known else None


def parse_xml_health(text: str) -> HealthReport:
    """ECC and clock event (throttle) reasons per GPU from `nvidia-smi -q -x`: the
    <clocks_event_reasons> of drivers 535+ or the <clocks_throttle_reasons> before them."""
    fatal = _fatal(text)
    if fatal is not None:
        return HealthReport(error=fatal.error)
    body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("WARNING:"))
    try:
        root = ET.fromstring(body.strip())
    except ET.ParseError as exc:
        return HealthReport(error=_error("unrecognized", f"nvidia-smi XML does not parse: {exc}"))
    if root.tag != "nvidia_smi_log":
        return HealthReport(error=_error("unrecognized",
                                         f"XML root is <{root.tag}>, not <nvidia_smi_log>"))
    gpus: list[GpuHealth] = []
    for position, gpu in enumerate(root.findall("gpu")):
        reasons = gpu.find("clocks_event_reasons")
        if reasons is None:
            reasons = gpu.find("clocks_throttle_reasons")
        active = [child.tag.split("_reason_", 1)[-1] for child in
                  (reasons if reasons is not None else [])
                  if (child.text or "").strip() == "Active"]
        gpus.append(GpuHealth(
            index=position, name=_text(gpu.findtext("product_name")) or "?",
            ecc_mode=_text(gpu.findtext("ecc_mode/current_ecc")),
            ecc_volatile_uncorrected=_volatile_uncorrected(gpu.find("ecc_errors/volatile")),
            clock_event_reasons=active))
    if not gpus:
        return HealthReport(error=_error("unrecognized", "nvidia-smi XML without <gpu> entries"))
    return HealthReport(gpus=gpus)


# ---------------------------------------------------------------- -q (text)

_Q_PAIR = re.compile(r"\s*(?P<key>\S.*?)\s+:(?:\s(?P<value>.*))?")
_Q_GPU = re.compile(r"GPU [0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]")


def parse_query_text(text: str) -> GpuFacts:
    """`nvidia-smi -q`: indented "Key : value" lines, one section per GPU bus id."""
    top: dict[str, str] = {}
    sections: list[dict[str, str]] = []
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if _Q_GPU.fullmatch(line.rstrip()):
            sections.append({})
            stack = []
            continue
        pair = _Q_PAIR.fullmatch(line.rstrip())
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if pair is None:
            stack.append((indent, line.strip()))  # a sub-section title, e.g. "MIG Mode"
            continue
        if not sections or indent == 0:
            top.setdefault(pair["key"].lower(), pair["value"] or "")
            continue
        path = "/".join([title for _, title in stack] + [pair["key"]])
        sections[-1].setdefault(path, pair["value"] or "")
    driver, cuda = _versions(top)
    gpus: list[GpuInfo] = []
    # Sections come in index order; -q prints no index (Minor Number is not it).
    for position, fields in enumerate(sections):
        name = _text(fields.get("Product Name"))
        if name is None:
            return _unrecognized(f"nvidia-smi -q: GPU section {position} has no Product Name")
        gpus.append(GpuInfo(index=position, name=name, uuid=_text(fields.get("GPU UUID")),
                            memory_total_mib=_mib(fields.get("FB Memory Usage/Total")),
                            mig_mode=_text(fields.get("MIG Mode/Current")),
                            persistence_mode=_text(fields.get("Persistence Mode")),
                            ecc_mode=_text(fields.get("ECC Mode/Current"))))
    if not gpus:
        return _unrecognized("nvidia-smi -q output without GPU sections")
    return GpuFacts(driver_version=driver, cuda_version=cuda, gpus=gpus)


# ---------------------------------------------------------------- -L

_L_GPU = re.compile(r"GPU (\d+): (.+?) \(UUID: ([^)\s]+)\)")
# Current form "MIG 3g.40gb Device 0: (UUID: MIG-<uuid>)"; drivers before 470 print
# "MIG-GPU-<gpu uuid>/<gi>/<ci>"; both are kept as printed.
_L_MIG = re.compile(r"\s+MIG (\S+)\s+Device\s+\d+: \(UUID: ([^)\s]+)\)")


def parse_list(text: str) -> GpuFacts:
    """`nvidia-smi -L`: GPU names and UUIDs, MIG devices under their GPU."""
    gpus: list[GpuInfo] = []
    migs: list[MigDevice] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if gpu := _L_GPU.fullmatch(line.rstrip()):
            gpus.append(GpuInfo(index=int(gpu[1]), name=gpu[2], uuid=gpu[3]))
        elif (mig := _L_MIG.fullmatch(line.rstrip())) and gpus:
            migs.append(MigDevice(gpu_index=gpus[-1].index, profile=mig[1], uuid=mig[2]))
        else:
            return _unrecognized(f"nvidia-smi -L: unexpected line {line.strip()!r}")
    if not gpus:
        return _unrecognized("nvidia-smi -L output without GPU lines")
    return GpuFacts(gpus=gpus, mig_devices=migs)


# ---------------------------------------------------------------- --version

def parse_version(text: str) -> GpuFacts:
    """`nvidia-smi --version`: versions only, no GPUs."""
    labels: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            labels[key.strip().lower()] = value.strip()
    if "nvidia-smi version" not in labels:
        return _unrecognized("nvidia-smi --version without an 'NVIDIA-SMI version' line")
    driver, cuda = _versions(labels)
    return GpuFacts(driver_version=driver, cuda_version=cuda)


# ---------------------------------------------------------------- --query-gpu CSV

_CSV_HEADER_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)(?: \[[^\]]*\])?")
# --help-query-gpu aliases a caller may have asked for; the header always echoes the
# canonical name.
_ALIASES = {"gpu_name": "name", "gpu_uuid": "uuid"}


def _csv_row(line: str) -> list[str]:
    # nvidia-smi neither quotes nor escapes; GPU names carry no commas.
    return [field.strip() for field in line.split(",")]


def _csv_header(line: str) -> list[str] | None:
    names = [_CSV_HEADER_FIELD.fullmatch(field) for field in _csv_row(line)]
    return [m.group(1) for m in names if m] if all(names) else None


def parse_query_csv(text: str, *, columns: list[str] | None = None) -> GpuFacts:
    """`nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]`.

    With a header, columns are found by their names. Without one, `columns` must list
    the fields as they were passed to --query-gpu.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return _unrecognized("empty CSV")
    # A header, when printed, wins over `columns`: it names what nvidia-smi answered.
    # (A data row never reads as one: GPU names contain spaces or dashes.)
    header = _csv_header(lines[0])
    if header is not None:
        names, rows = header, lines[1:]
    elif columns:
        names, rows = [_ALIASES.get(c.strip(), c.strip()) for c in columns], lines
    else:
        return _unrecognized("CSV without a header: pass the --query-gpu fields as columns")
    if "name" not in names:
        return _unrecognized(f"--query-gpu CSV without a name column (columns: {','.join(names)})")
    records: list[dict[str, str]] = []
    for line in rows:
        row = _csv_row(line)
        if len(row) != len(names):
            return _unrecognized(f"CSV row has {len(row)} fields, header has {len(names)}")
        # Lengths checked above; zip(strict=) is Python 3.10+, hosts may run 3.9.
        records.append(dict(zip(names, row)))  # noqa: B905
    gpus: dict[int, GpuInfo] = {}
    for position, record in enumerate(records):
        index_text = record.get("index", str(position))
        if not index_text.isdigit():
            return _unrecognized(f"--query-gpu CSV: index {index_text!r} is not a number")
        # With -l/--loop the same GPU repeats; its first sample stands.
        gpus.setdefault(int(index_text), GpuInfo(
            index=int(index_text), name=record["name"], uuid=_text(record.get("uuid")),
            memory_total_mib=_mib(record.get("memory.total")),
            compute_capability=_text(record.get("compute_cap")),
            mig_mode=_text(record.get("mig.mode.current")),
            persistence_mode=_text(record.get("persistence_mode")),
            ecc_mode=_text(record.get("ecc.mode.current"))))
    if not gpus:
        return _unrecognized("--query-gpu CSV without data rows")
    first = records[0]
    driver, _ = _versions({"kmd version": first.get("kmd_version", ""),
                           "driver version": first.get("driver_version", "")})
    # --query-gpu has no CUDA version field.
    return GpuFacts(driver_version=driver, gpus=list(gpus.values()))


# ---------------------------------------------------------------- entry point

def _fatal(text: str) -> GpuFacts | None:
    for kind, pattern in _FATAL:
        if pattern.search(text):
            message = "\n".join(ln.strip() for ln in text.strip().splitlines() if ln.strip())
            return GpuFacts(error=_error(kind, message[:500]))
    return None


def _parse_report(text: str, columns: list[str] | None) -> GpuFacts:
    stripped = text.strip()
    lines = stripped.splitlines()
    if stripped.startswith(("<?xml", "<nvidia_smi_log")):
        return parse_xml(stripped)
    if any(_BANNER.match(ln) or _is_name_header(ln) for ln in lines):
        return parse_table(stripped)
    if "==NVSMI LOG==" in stripped:
        return parse_query_text(stripped)
    if lines[0].lower().startswith("nvidia-smi version"):
        return parse_version(stripped)
    if _L_GPU.fullmatch(lines[0].rstrip()):
        return parse_list(stripped)
    if columns is not None or _csv_header(lines[0]) is not None:
        return parse_query_csv(stripped, columns=columns)
    if "," in lines[0]:
        return _unrecognized("looks like --format=csv,noheader: pass the --query-gpu fields "
                            "as columns; first line: " + _first_line(stripped))
    return _unrecognized("not a known nvidia-smi output: " + _first_line(stripped))


def parse_nvidia_smi(text: str, *, columns: list[str] | None = None) -> GpuFacts:
    """Facts from any nvidia-smi output; the format is detected from the text.

    `columns`: the --query-gpu fields, for CSV printed with `noheader`.
    """
    if not text.strip():
        return _unrecognized("empty output: nvidia-smi printed nothing")
    fatal = _fatal(text)
    if fatal is not None:
        return fatal
    # nvidia-smi's own notices (e.g. "WARNING: infoROM is corrupted at gpu ...") precede
    # the report; they carry no facts.
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("WARNING:")]
    broken = [ln.strip() for ln in lines if _DEVICE_HANDLE.search(ln)]
    rest = "\n".join(ln for ln in lines if not _DEVICE_HANDLE.search(ln))
    facts = (_parse_report(rest, columns) if rest.strip()
             else _unrecognized("no report, only: " + _first_line(text)))
    if not broken:
        return facts
    # One GPU that cannot be opened does not hide the others: report both.
    error = _error("device_handle", "\n".join(broken))
    if facts.error is not None:
        return GpuFacts(error=error)
    return dataclasses.replace(facts, error=error)


def summarize(facts: GpuFacts) -> str:
    """One line for logs."""
    parts: list[str] = []
    if facts.driver_version or facts.cuda_version or facts.gpus:
        parts.append(f"driver {facts.driver_version or '?'}, CUDA {facts.cuda_version or '?'}")
    if facts.gpus:
        gpus = "; ".join(
            f"{g.index}: {g.name}"
            + (f" {g.memory_total_mib} MiB" if g.memory_total_mib is not None else "")
            + (f" MIG {g.mig_mode}" if g.mig_mode else "")
            for g in facts.gpus)
        parts.append(f"{len(facts.gpus)} GPU(s) [{gpus}]")
    if facts.mig_devices:
        parts.append(f"{len(facts.mig_devices)} MIG device(s)")
    if facts.error:
        parts.append(f"error {facts.error.kind}: {' '.join(facts.error.message.split())}")
    return ", ".join(parts)
