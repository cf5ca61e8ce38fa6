import json
import re
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.sandbox import hosts as sandbox
from orchestrator.sandbox.hosts import SandboxError, SandboxHost


def test_port_scheme_offsets_each_host_by_its_number() -> None:
    hosts = sandbox._plan_hosts(3, 2221, [8000, 11434])

    assert hosts == [
        SandboxHost("sandbox-1", 2221, {8000: 18000, 11434: 21434}),
        SandboxHost("sandbox-2", 2222, {8000: 18001, 11434: 21435}),
        SandboxHost("sandbox-3", 2223, {8000: 18002, 11434: 21436}),
    ]
    assert [host.container for host in hosts] == [
        "orchestrate-sandbox-1",
        "orchestrate-sandbox-2",
        "orchestrate-sandbox-3",
    ]


def test_port_scheme_refuses_service_ports_that_collide_across_hosts() -> None:
    # 8000 on sandbox-2 and 8001 on sandbox-1 would both be 18001.
    with pytest.raises(SandboxError, match="port 18001 would be published twice"):
        sandbox._plan_hosts(2, 2221, [8000, 8001])


def test_port_scheme_refuses_ssh_ports_that_collide_with_service_ports() -> None:
    with pytest.raises(SandboxError, match="port 18000"):
        sandbox._plan_hosts(1, 18000, [8000])


@pytest.mark.parametrize(
    ("count", "ssh_base_port", "service_ports", "message"),
    [
        (1, 2221, [60000], "sandbox-1 service port 60000 would be published on 70000"),
        (2, 65535, [], "sandbox-2 ssh would be published on 65536"),
        (0, 2221, [], "at least one host"),
    ],
)
def test_port_scheme_refuses_impossible_plans(
    count: int, ssh_base_port: int, service_ports: list[int], message: str
) -> None:
    with pytest.raises(SandboxError, match=message):
        sandbox._plan_hosts(count, ssh_base_port, service_ports)


def test_port_in_use_on_loopback_is_reported_by_number() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        host = SandboxHost("sandbox-1", port, {})

        assert not sandbox._port_free(port)
        with pytest.raises(SandboxError, match=f"port {port} on 127.0.0.1 \\(sandbox-1 ssh\\)"):
            sandbox._check_ports_free(host)

    assert sandbox._port_free(port)
    sandbox._check_ports_free(host)


def test_ssh_key_is_generated_once_and_private(tmp_path: Path) -> None:
    state = tmp_path / "state"

    key = sandbox.ensure_ssh_key(state)
    first = key.read_bytes()

    assert key == state / "id_ed25519"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (state / "id_ed25519.pub").read_text().startswith("ssh-ed25519 ")
    assert sandbox.ensure_ssh_key(state).read_bytes() == first


def test_ssh_key_pair_is_remade_when_half_missing(tmp_path: Path) -> None:
    key = sandbox.ensure_ssh_key(tmp_path)
    first = key.read_bytes()
    (tmp_path / "id_ed25519.pub").unlink()

    sandbox.ensure_ssh_key(tmp_path)

    assert key.read_bytes() != first
    assert (tmp_path / "id_ed25519.pub").is_file()


def test_missing_podman_names_the_packages_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(SandboxError, match="podman is not installed") as error:
        sandbox.status()

    assert "podman runc slirp4netns debootstrap openssh-client" in str(error.value)


def test_failed_command_reports_command_exit_code_and_last_stderr_lines() -> None:
    script = "for i in 1 2 3 4 5 6 7; do echo line$i >&2; done; exit 3"

    with pytest.raises(SandboxError) as error:
        sandbox._run(["sh", "-c", script])

    message = str(error.value)
    assert message.startswith("`sh -c ")
    assert "exit code 3" in message
    assert message.endswith("line3 | line4 | line5 | line6 | line7")
    assert "\n" not in message


def test_cache_dir_follows_xdg_and_ignores_a_relative_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sandbox.cache_dir() == tmp_path / "orchestrate"

    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sandbox.cache_dir() == tmp_path / ".cache" / "orchestrate"


def test_podman_env_points_at_the_project_containers_conf() -> None:
    conf = sandbox.containers_conf()
    text = conf.read_text()

    assert sandbox.podman_env()["CONTAINERS_CONF"] == str(conf)
    assert conf == Path(__file__).resolve().parents[2] / "sandbox" / "containers.conf"
    assert '"nofile=20000:20000", "nproc=32768:32768"' in text
    assert 'netns = "none"' in text
    assert 'runtime = "runc"' in text


def test_spec_changes_with_ports_and_mounts_only() -> None:
    host = SandboxHost("sandbox-1", 2221, {8000: 18000})
    mounts = {"/srv/a": "/srv/wheelhouse"}

    assert sandbox._spec(host, mounts) == sandbox._spec(host, dict(mounts))
    assert sandbox._spec(host, mounts) != sandbox._spec(host, {})
    assert sandbox._spec(host, mounts) != sandbox._spec(
        SandboxHost("sandbox-1", 2221, {8000: 18001}), mounts
    )


def test_hosts_reach_the_control_machines_loopback_and_the_spec_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `up` serves the sandbox's mirror on 127.0.0.1; a container made before that (without
    # allow_host_loopback) cannot reach it, so its spec differs and it is refused, not reused.
    host = SandboxHost("sandbox-1", 2221, {8000: 18000})
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(sandbox, "_podman", lambda *args, **_: calls.append(args))
    sandbox._create(host, sandbox._spec(host, {}), {})

    [args] = calls
    assert args[args.index("--network") + 1] == (
        "slirp4netns:port_handler=slirp4netns,allow_host_loopback=true")
    assert json.loads(sandbox._spec(host, {}))["network"] == sandbox.NETWORK
    assert sandbox.HOST_LOOPBACK == "10.0.2.2"  # slirp4netns's address for the host


def test_up_refuses_a_missing_mount_source_before_touching_podman(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # any podman call would fail differently

    message = f"mount source {tmp_path / 'absent'} does not exist"
    with pytest.raises(SandboxError, match=re.escape(message)):
        sandbox.up(tmp_path / "state", 1, 2221, [], {tmp_path / "absent": "/srv/x"}, print)


def test_remove_tree_removes_a_plain_tree(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc" / "ssh").mkdir(parents=True)
    (root / "etc" / "ssh" / "ssh_host_ed25519_key").write_text("x")

    sandbox._remove_tree(root)

    assert not root.exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_with_retries(url: str) -> str:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
    for _ in range(20):
        try:
            with direct.open(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer")


@pytest.mark.e2e
def test_fleet_up_is_idempotent_and_reachable_over_ssh(tmp_path: Path) -> None:
    assert not sandbox.status(), (
        "a sandbox fleet is running and this test would remove it: "
        "`orchestrate down --hosts sandbox` first")
    state = tmp_path / "state"
    mount = tmp_path / "wheelhouse"
    mount.mkdir()
    (mount / "marker.whl").write_text("")
    published = _free_port()
    service = published - sandbox.SERVICE_PORT_OFFSET
    args = (state, 1, _free_port(), [service], {mount: "/srv/wheelhouse"}, print)
    try:
        (host,) = sandbox.up(*args)
        assert sandbox.up(*args) == [host]
        assert sandbox.status() == [("orchestrate-sandbox-1", "running")]

        assert host.port_map == {service: published}

        ssh = sandbox._ssh_command(host, state / "id_ed25519")
        remote = (
            "hostname; ls /srv/wheelhouse; touch /srv/wheelhouse/x 2>&1 || true; "
            f"systemd-run --unit=web python3 -m http.server {service} --directory /srv/wheelhouse"
        )
        out = subprocess.run(
            [*ssh, remote], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        assert out.splitlines()[:2] == ["sandbox-1", "marker.whl"]
        assert "Read-only file system" in out
        assert "marker.whl" in _get_with_retries(f"http://127.0.0.1:{published}/")
    finally:
        removed = sandbox.down(state, print)
    assert removed == ["orchestrate-sandbox-1"]
    assert sandbox.status() == []
    assert not state.exists()


def test_molecule_scenarios_use_the_sandbox_image() -> None:
    repo = Path(__file__).resolve().parents[2]
    for scenario in (repo / "molecule").glob("*/molecule.yml"):
        assert f"image: {sandbox.IMAGE}\n" in scenario.read_text(), scenario


def test_the_cli_runs_without_the_sandbox_extra_and_the_sandbox_says_what_is_missing() -> None:
    # `pip install .` without [sandbox] has no numpy: every command but the sandbox's runs,
    # and the sandbox ends in one line naming the extra (numpy blocked in a child process).
    program = (
        "import sys; sys.modules['numpy'] = None\n"
        "from typer.testing import CliRunner\n"
        "from orchestrator import cli\n"
        "from orchestrator.sandbox import fleet as sandbox_fleet\n"
        "from orchestrator.errors import OrchestrateError\n"
        "result = CliRunner().invoke(cli.app, ['compat', '--driver', '535.104.05'])\n"
        "assert result.exit_code == 0, result.output\n"
        "try:\n"
        "    sandbox_fleet.sandbox_model()\n"
        "except OrchestrateError as exc:\n"
        "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "'sandbox' extra (numpy is missing)" in proc.stdout


def test_the_cli_names_the_sandbox_group_as_the_sandbox_does() -> None:
    # cli.py spells the group itself so that `--help` and real fleets never import the sandbox.
    from orchestrator import cli
    from orchestrator.sandbox import fleet as sandbox_fleet

    assert cli.SANDBOX == sandbox_fleet.GROUP
