"""The local sandbox fleet: podman containers that boot systemd and sshd and are reached
over SSH on loopback, exactly like real hosts.

Everything here is local container management through plain subprocess calls to podman,
debootstrap, tar and ssh-keygen; remote host work stays in Ansible.

Port scheme, for host N (1-based) of the fleet:

* SSH: ``127.0.0.1:{ssh_base_port + N - 1}`` -> port 22 inside the host.
* Service port P: ``127.0.0.1:{P + 10000 + N - 1}`` -> port P inside the host
  (vLLM on 8000 is 18000 on sandbox-1, 18001 on sandbox-2, ...).

Service ports closer together than the fleet size would collide under this scheme
(8000 on sandbox-2 and 8001 on sandbox-1 are both 18001); such a plan is refused.
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.knowledge.roles import ROOT

# Bump RECIPE whenever the image's build steps below change: the tag and the cached
# tarball carry it, so a changed recipe never reuses an image built by the old one.
RECIPE = 1
IMAGE = f"localhost/orchestrate-debian-systemd:bookworm-r{RECIPE}"

LABEL = "orchestrate.sandbox"
# Holds the ports and mounts a container was created with, so a later up() can tell
# whether an existing container still matches what is asked.
SPEC_LABEL = "orchestrate.sandbox.spec"
CONTAINER_PREFIX = "orchestrate-"
SERVICE_PORT_OFFSET = 10000
# slirp4netns with allow_host_loopback: this address inside a host is the control machine's
# 127.0.0.1 (where `up` serves the sandbox's mirror), and nothing beyond it.
HOST_LOOPBACK = "10.0.2.2"
NETWORK = "slirp4netns:port_handler=slirp4netns,allow_host_loopback=true"

HOST_PACKAGES = "podman runc slirp4netns debootstrap openssh-client"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
IMAGE_PACKAGES = (
    "python3",
    "python3-venv",
    "python3-packaging",
    "python3-apt",
    "systemd",
    "systemd-sysv",
    "openssh-server",
    "sudo",
    "dbus",
    "iproute2",
    "ca-certificates",
    "curl",
    "procps",
)
TARBALL_NAME = f"debian-systemd-bookworm-r{RECIPE}.tar.gz"

# sshd's stock unit runs `sshd -t` before anything else, which fails without host keys.
# The image ships none, so every container makes its own at first boot instead of all
# of them sharing the keys debootstrap generated.
SSH_HOSTKEYS_DROPIN = """\
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
"""

# Installs the fleet's public key (read from stdin) as root's only authorized key,
# rewriting the file only when it differs so that a repeated up() changes nothing.
INSTALL_KEY_SCRIPT = """\
set -e
umask 077
mkdir -p /root/.ssh
key=$(cat)
[ "$(cat /root/.ssh/authorized_keys 2>/dev/null)" = "$key" ] \
  || printf '%s\\n' "$key" > /root/.ssh/authorized_keys
"""

BOOT_TIMEOUT_S = 120
SSH_TIMEOUT_S = 30

Log = Callable[[str], None]


class SandboxError(Exception):
    """Clear one-line operator message, e.g. 'podman is not installed: run make setup'."""


@dataclass(frozen=True)
class SandboxHost:
    name: str
    ssh_port: int
    port_map: dict[int, int]

    @property
    def container(self) -> str:
        return CONTAINER_PREFIX + self.name


@dataclass(frozen=True)
class _Container:
    name: str
    state: str
    spec: str


def cache_dir() -> Path:
    # Outside the checkout so that every clone reuses the one debootstrap tarball.
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "orchestrate"


def containers_conf() -> Path:
    return ROOT / "sandbox" / "containers.conf"


def podman_env() -> dict[str, str]:
    conf = containers_conf()
    if not conf.is_file():
        raise SandboxError(f"{conf} is missing: reinstall the project (pip install <checkout>)")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def ensure_image(log: Log) -> None:
    """Make IMAGE available to podman, building and caching its root filesystem if needed."""
    if _image_exists():
        return
    tarball = cache_dir() / TARBALL_NAME
    if tarball.is_file():
        log(f"reusing the cached root filesystem {tarball}")
    else:
        _build_tarball(tarball, log)
    log(f"importing {tarball.name} as {IMAGE}")
    try:
        _podman("import", "--change", 'CMD ["/sbin/init"]', str(tarball), IMAGE, timeout=900)
    except SandboxError as exc:
        raise SandboxError(f"{exc} (delete {tarball} to rebuild it)") from exc


def ensure_ssh_key(state_dir: Path) -> Path:
    """The fleet's ed25519 key (state_dir/id_ed25519), generated on first use."""
    key = state_dir / "id_ed25519"
    pub = _public_key(key)
    if key.is_file() and pub.is_file():
        return key
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A half-present pair would make ssh-keygen ask whether to overwrite.
    key.unlink(missing_ok=True)
    pub.unlink(missing_ok=True)
    _run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "orchestrate-sandbox", "-f", str(key)]
    )
    return key


def up(
    state_dir: Path,
    count: int,
    ssh_base_port: int,
    service_ports: list[int],
    mounts: dict[Path, str],
    log: Log,
) -> list[SandboxHost]:
    """Bring hosts sandbox-1..count up and reachable over SSH; running ones are reused as-is."""
    hosts = _plan_hosts(count, ssh_base_port, service_ports)
    binds = {str(src.resolve()): dst for src, dst in mounts.items()}
    for src in binds:
        if not Path(src).exists():
            raise SandboxError(f"mount source {src} does not exist")
    ensure_image(log)
    key = ensure_ssh_key(state_dir)
    existing = {c.name: c for c in _containers()}

    # Check the whole fleet before changing anything, so a refusal leaves nothing half made.
    for host in hosts:
        current = existing.get(host.container)
        if current is not None and current.spec != _spec(host, binds):
            raise SandboxError(
                f"{host.container} exists with other ports, mounts or network than asked: "
                "take the sandbox down first"
            )
        if current is None or current.state != "running":
            _check_ports_free(host)

    # Start every container first so that they boot in parallel, then wait for each.
    for host in hosts:
        current = existing.get(host.container)
        if current is None:
            _create(host, _spec(host, binds), binds)
            log(f"{host.name}: created {host.container}")
        elif current.state != "running":
            _podman("start", host.container)
            log(f"{host.name}: started {host.container} (was {current.state})")
        else:
            log(f"{host.name}: {host.container} is already running")

    pubkey = _public_key(key).read_text()
    for host in hosts:
        _wait_for_systemd(host, log)
        _podman("exec", "-i", host.container, "sh", "-c", INSTALL_KEY_SCRIPT, input_text=pubkey)
        _wait_for_ssh(host, key)

    extra = sorted(set(existing) - {host.container for host in hosts})
    if extra:
        log(f"not part of this fleet but still present (down removes them): {', '.join(extra)}")
    return hosts


def down(state_dir: Path, log: Log) -> list[str]:
    """Remove every sandbox container and the fleet's state; returns the removed names."""
    names = [c.name for c in _containers()]
    if names:
        _podman("rm", "--force", "--time", "5", *names, timeout=300)
        log(f"removed {', '.join(names)}")
    if state_dir.exists():
        shutil.rmtree(state_dir)
    return names


def status() -> list[tuple[str, str]]:
    """(container name, podman state) of every sandbox container."""
    return [(c.name, c.state) for c in _containers()]


def _public_key(key: Path) -> Path:
    return key.with_name(key.name + ".pub")


def _plan_hosts(count: int, ssh_base_port: int, service_ports: list[int]) -> list[SandboxHost]:
    if count < 1:
        raise SandboxError(f"the sandbox needs at least one host, not {count}")
    hosts = [
        SandboxHost(
            name=f"sandbox-{n}",
            ssh_port=ssh_base_port + n - 1,
            port_map={port: port + SERVICE_PORT_OFFSET + n - 1 for port in service_ports},
        )
        for n in range(1, count + 1)
    ]
    used: dict[int, str] = {}
    for host in hosts:
        for port, use in _published(host):
            if not 1 <= port <= 65535:
                raise SandboxError(f"{use} would be published on {port}, outside 1-65535")
            if port in used:
                raise SandboxError(
                    f"port {port} would be published twice ({used[port]} and {use}): "
                    "choose ports further apart"
                )
            used[port] = use
    return hosts


def _published(host: SandboxHost) -> list[tuple[int, str]]:
    """(published port on 127.0.0.1, what it is for) for every port of the host."""
    return [(host.ssh_port, f"{host.name} ssh")] + [
        (outer, f"{host.name} service port {inner}") for inner, outer in host.port_map.items()
    ]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Leftover TIME_WAIT connections (from our own SSH probes) do not make a port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _check_ports_free(host: SandboxHost) -> None:
    for port, use in _published(host):
        if not _port_free(port):
            raise SandboxError(f"port {port} on 127.0.0.1 ({use}) is already in use")


def _spec(host: SandboxHost, binds: dict[str, str]) -> str:
    return json.dumps(
        {"ssh_port": host.ssh_port, "port_map": host.port_map, "mounts": binds,
         "network": NETWORK},
        sort_keys=True,
        separators=(",", ":"),
    )


def _create(host: SandboxHost, spec: str, binds: dict[str, str]) -> None:
    # Ulimits and the runtime come from sandbox/containers.conf through CONTAINERS_CONF.
    args = [
        "run", "--detach",
        "--name", host.container,
        "--hostname", host.name,
        "--label", f"{LABEL}=1",
        "--label", f"{SPEC_LABEL}={spec}",
        "--systemd=always",
        # Without CAP_SYS_ADMIN systemd inside the container silently skips
        # ProtectSystem, ProtectHome and PrivateTmp; with it they are enforced, so a
        # unit that would break under its hardening on a real host breaks here too.
        "--cap-add", "SYS_ADMIN",
        # podman's default 64 MiB /dev/shm is too small for vLLM's shared-memory
        # message queue (it needs about 160 MiB); real hosts have RAM-sized /dev/shm.
        "--shm-size", "1g",
        # slirp4netns keeps the host out of the machine's own network namespace, and its
        # port handler publishes on loopback only.
        "--network", NETWORK,
    ]  # fmt: skip
    args += ["--publish", f"127.0.0.1:{host.ssh_port}:22"]
    for inner, outer in host.port_map.items():
        args += ["--publish", f"127.0.0.1:{outer}:{inner}"]
    for src, dst in binds.items():
        args += ["--volume", f"{src}:{dst}:ro"]
    _podman(*args, IMAGE, "/sbin/init")


def _wait_for_systemd(host: SandboxHost, log: Log) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while True:
        # Right after start the exec can race systemd's own bus setup ("offline"): retry.
        proc = _podman(
            "exec", host.container, "systemctl", "is-system-running", "--wait",
            check=False, timeout=BOOT_TIMEOUT_S,
        )  # fmt: skip
        if proc.returncode >= 125:  # podman itself failed, e.g. the container stopped
            raise _failure(["podman", "exec", host.container, "systemctl"], proc)
        state = proc.stdout.strip()
        if state == "running":
            return
        if state == "degraded":
            failed = _podman(
                "exec", host.container, "systemctl", "list-units", "--failed", "--plain",
                "--no-legend",
            ).stdout  # fmt: skip
            units = [line.split()[0] for line in failed.splitlines() if line.strip()]
            log(f"{host.name}: systemd is degraded, failed units: {', '.join(units) or 'none'}")
            return
        if time.monotonic() > deadline:
            raise SandboxError(
                f"{host.name}: systemd did not finish booting in {BOOT_TIMEOUT_S} s "
                f"(state: {state or proc.stderr.strip() or 'unknown'})"
            )
        time.sleep(0.5)


def _ssh_command(host: SandboxHost, key: Path) -> list[str]:
    return [
        "ssh", "-i", str(key), "-p", str(host.ssh_port),
        # Every container makes fresh host keys, so there is nothing stable to pin.
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5",
        "-o", "LogLevel=ERROR",
        "root@127.0.0.1",
    ]  # fmt: skip


def _wait_for_ssh(host: SandboxHost, key: Path) -> None:
    deadline = time.monotonic() + SSH_TIMEOUT_S
    while True:
        proc = _run([*_ssh_command(host, key), "true"], check=False, timeout=15)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise SandboxError(
                f"{host.name}: SSH on 127.0.0.1:{host.ssh_port} did not answer in "
                f"{SSH_TIMEOUT_S} s: {_tail(proc)}"
            )
        time.sleep(1)


def _containers() -> list[_Container]:
    out = _podman("ps", "--all", "--filter", f"label={LABEL}=1", "--format", "json").stdout
    found = [
        _Container(
            name=entry["Names"][0],
            state=entry["State"],
            spec=(entry.get("Labels") or {}).get(SPEC_LABEL, ""),
        )
        for entry in json.loads(out or "[]") or []
    ]
    # Names differ only in the trailing host number: shorter first orders 2 before 10.
    return sorted(found, key=lambda c: (len(c.name), c.name))


def _image_exists() -> bool:
    proc = _podman("image", "exists", IMAGE, check=False)
    if proc.returncode not in (0, 1):
        raise _failure(["podman", "image", "exists", IMAGE], proc)
    return proc.returncode == 0


def _build_tarball(tarball: Path, log: Log) -> None:
    if os.geteuid() != 0:
        raise SandboxError("building the sandbox image runs debootstrap, which needs root")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    # Both live beside the tarball: the rename into place must not cross filesystems.
    rootfs = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=tarball.parent))
    partial = tarball.with_name(f".{tarball.name}.{os.getpid()}.partial")
    try:
        log(f"building the sandbox root filesystem with debootstrap from {MIRROR} (minutes)")
        started = time.monotonic()
        _run(
            [
                "debootstrap", "--variant=minbase", f"--include={','.join(IMAGE_PACKAGES)}",
                SUITE, str(rootfs), MIRROR,
            ],
            timeout=1800,
        )  # fmt: skip
        _customize_rootfs(rootfs)
        _run(["tar", "--numeric-owner", "-C", str(rootfs), "-czf", str(partial), "."], timeout=900)
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        # Only a complete tarball ever carries the final name.
        os.replace(partial, tarball)
        log(f"built {tarball} in {time.monotonic() - started:.0f} s")
    finally:
        partial.unlink(missing_ok=True)
        _remove_tree(rootfs)


def _customize_rootfs(rootfs: Path) -> None:
    # Empty, so systemd gives each container its own machine ID at boot. D-Bus's copy must
    # point at it: systemd would otherwise adopt that one ID in every container.
    (rootfs / "etc" / "machine-id").write_text("")
    dbus_id = rootfs / "var" / "lib" / "dbus" / "machine-id"
    dbus_id.unlink(missing_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    # debootstrap leaves the downloaded packages behind: about 100 MB of the tarball.
    for deb in (rootfs / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()
    for hostkey in (rootfs / "etc" / "ssh").glob("ssh_host_*"):
        hostkey.unlink()
    dropin = rootfs / "etc" / "systemd" / "system" / "ssh.service.d" / "orchestrate-hostkeys.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(SSH_HOSTKEYS_DROPIN)


def _remove_tree(root: Path) -> None:
    # debootstrap mounts /proc and /sys inside its target; after an interrupted run they
    # can still be mounted there, and rmtree would descend into the machine's own.
    mountpoints = [
        Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]))
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    ]
    inside = [m for m in mountpoints if m.is_relative_to(root)]
    for mountpoint in sorted(inside, key=lambda m: len(m.parts), reverse=True):
        _run(["umount", "--lazy", str(mountpoint)])
    shutil.rmtree(root)


def _podman(
    *args: str, check: bool = True, timeout: float = 300, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    return _run(
        ["podman", *args], env=podman_env(), check=check, timeout=timeout, input_text=input_text
    )


def _run(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 300,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    if shutil.which(cmd[0], path=path) is None:
        raise SandboxError(f"{cmd[0]} is not installed: apt-get install {HOST_PACKAGES}")
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            input=input_text,
            # Without input, keep ssh and podman away from the operator's terminal.
            stdin=subprocess.DEVNULL if input_text is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"`{_show(cmd)}` did not finish in {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        raise _failure(cmd, proc)
    return proc


def _failure(cmd: list[str], proc: subprocess.CompletedProcess[str]) -> SandboxError:
    return SandboxError(f"`{_show(cmd)}` failed with exit code {proc.returncode}: {_tail(proc)}")


def _tail(proc: subprocess.CompletedProcess[str], lines: int = 5) -> str:
    text = proc.stderr if proc.stderr.strip() else proc.stdout
    last = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(last) or "no output"


def _show(cmd: list[str], limit: int = 200) -> str:
    shown = shlex.join(cmd)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
