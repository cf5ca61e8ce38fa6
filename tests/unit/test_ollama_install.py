"""The ollama role's install path (tasks/archive.yml), run for real with ansible-playbook -c local
into a temporary prefix.

The Ollama release cannot be downloaded here: the archive is the Ollama STAND-IN
(orchestrator/sandbox/ollama_standin.py) packed with the release's layout and compression,
served by a local HTTP server on loopback laid out like GitHub's release downloads. The role's
real code fetches it by URL, checks its sha256, unpacks it and links it; a wrong checksum is
refused, and so is a run without one (the checksum is a required input: the role ships none).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MAKE_RELEASE = REPO / "tests" / "data" / "ollama_standin" / "make_release.py"
ROLE_DEFAULT_VERSION = "0.32.7"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="the role unpacks as root (owner root), as on a host")


class Mirror:
    """A loopback HTTP server over a directory, recording the paths asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        mirror = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                mirror.requests.append(self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0),
                                          partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self, version: str) -> str:
        """Pack the stand-in as release `version`; its archive's sha256."""
        out = subprocess.run([sys.executable, str(MAKE_RELEASE), str(self.root), "--version",
                              version, "--arch", ARCH], capture_output=True, text=True,
                             check=True).stdout
        return out.split()[1]


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    served = Mirror(tmp_path / "mirror")
    yield served
    served.server.shutdown()
    served.server.server_close()


def run_archive_tasks(tmp_path: Path, **variables: Any) -> tuple[int, dict[str, Any], str]:
    """Run the role's preflight and install path (tasks/archive.yml) on localhost;
    (rc, the host's stats, output)."""
    playbook = tmp_path / "install.yml"
    (tmp_path / "bin").mkdir(exist_ok=True)  # /usr/local/bin exists on every host
    playbook.write_text(
        "- name: Install the Ollama archive\n"
        "  hosts: all\n"
        "  gather_facts: true\n"
        # platform: the architecture; distribution: the role's OS check.
        "  gather_subset: [\"!all\", \"!min\", platform, distribution]\n"
        "  tasks:\n"
        "    - name: Run the role's checks\n"
        "      ansible.builtin.include_role:\n"
        "        name: ollama\n"
        "        tasks_from: preflight.yml\n"
        "    - name: Run the role's install path\n"
        "      ansible.builtin.include_role:\n"
        "        name: ollama\n"
        "        tasks_from: archive.yml\n")
    extra = {"ansible_python_interpreter": "{{ ansible_playbook_python }}",
             "ollama_install_dir": str(tmp_path / "opt" / "ollama"),
             "ollama_bin_link": str(tmp_path / "bin" / "ollama"),
             "ollama_download_dir": str(tmp_path / "download"), **variables}
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
           "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json", "ANSIBLE_NOCOLOR": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i",
                           "localhost,", "-c", "local", "-e", json.dumps(extra), str(playbook)],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    try:
        stats = json.loads(proc.stdout)["stats"]["localhost"]
    except (ValueError, KeyError):
        stats = {}
    return proc.returncode, stats, proc.stdout + proc.stderr


def sha_of(sha256: str) -> dict[str, str]:
    return {ARCH: sha256}


def installed_version(link: Path) -> str:
    """What the installed stand-in says through the links (no server: its own version)."""
    return subprocess.run([str(link), "--version"], capture_output=True, text=True, check=True,
                          env={**os.environ, "OLLAMA_HOST": "127.0.0.1:9"}).stdout


def test_installs_from_the_url_once_then_upgrades_keeping_the_previous(tmp_path: Path,
                                                                        mirror: Mirror) -> None:
    sha256 = mirror.release(ROLE_DEFAULT_VERSION)
    variables = {"ollama_archive_base_url": mirror.url, "ollama_archive_sha256": sha_of(sha256)}

    rc, stats, output = run_archive_tasks(tmp_path, **variables)
    assert rc == 0, output
    assert stats["changed"] > 0
    assert mirror.requests == [f"/v{ROLE_DEFAULT_VERSION}/ollama-linux-{ARCH}.tar.zst"]
    install = tmp_path / "opt" / "ollama"
    version_dir = install / ROLE_DEFAULT_VERSION
    assert os.readlink(install / "current") == ROLE_DEFAULT_VERSION
    assert (version_dir / "bin" / "ollama").stat().st_mode & 0o111
    assert (version_dir / "bin" / "ollama").stat().st_uid == 0
    assert (version_dir / "lib" / "ollama").is_dir()
    assert (version_dir / ".ollama-archive.sha256").read_text().strip() == sha256
    link = tmp_path / "bin" / "ollama"
    assert Path(os.path.realpath(link)) == version_dir / "bin" / "ollama"
    assert list((tmp_path / "download").iterdir()) == []  # the archive does not stay
    assert f"client version is {ROLE_DEFAULT_VERSION}" in installed_version(link)

    rc, stats, output = run_archive_tasks(tmp_path, **variables)
    assert rc == 0, output
    assert stats["changed"] == 0, output
    assert len(mirror.requests) == 1  # installed already: nothing fetched

    upgrade = mirror.release("0.32.8")
    rc, _, output = run_archive_tasks(tmp_path, ollama_version="0.32.8",
                                      ollama_archive_base_url=mirror.url,
                                      ollama_archive_sha256=sha_of(upgrade))
    assert rc == 0, output
    assert os.readlink(install / "current") == "0.32.8"
    assert (version_dir / "bin" / "ollama").is_file()  # the previous one stays for rollback
    assert "client version is 0.32.8" in installed_version(link)


def test_refuses_an_archive_whose_checksum_does_not_match(tmp_path: Path,
                                                           mirror: Mirror) -> None:
    sha256 = mirror.release(ROLE_DEFAULT_VERSION)
    wrong = hashlib.sha256(b"not the archive").hexdigest()

    rc, stats, output = run_archive_tasks(tmp_path, ollama_archive_base_url=mirror.url,
                                          ollama_archive_sha256=sha_of(wrong))
    assert rc != 0
    assert stats["failures"] == 1
    assert "checksum" in output and wrong in output and sha256 in output
    assert not (tmp_path / "opt" / "ollama" / ROLE_DEFAULT_VERSION).exists()
    assert not (tmp_path / "opt" / "ollama" / "current").is_symlink()
    assert not (tmp_path / "bin" / "ollama").is_symlink()


@pytest.mark.parametrize(("variables", "message"), [
    # The role's default: no checksum at all. It must stop and say where to take one.
    ({}, f"set ollama_archive_sha256 for {ARCH} (ollama_archive_sha256.{ARCH}) to the sha256 of "
         f"ollama-linux-{ARCH}.tar.zst from https://github.com/ollama/ollama/releases/download/"
         f"v{ROLE_DEFAULT_VERSION}/sha256sum.txt"),
    ({"ollama_archive_sha256": {ARCH: "latest"}},
     f"ollama_archive_sha256 for {ARCH} must be the archive's sha256 (64 hex digits"),
])
def test_refuses_to_install_without_a_sha256(tmp_path: Path, mirror: Mirror,
                                             variables: dict[str, Any], message: str) -> None:
    mirror.release(ROLE_DEFAULT_VERSION)
    rc, stats, output = run_archive_tasks(tmp_path, ollama_archive_base_url=mirror.url,
                                          **variables)
    assert rc != 0
    assert stats["failures"] == 1
    assert message in " ".join(output.split()), output
    assert mirror.requests == []  # stopped before fetching anything
    assert not (tmp_path / "opt" / "ollama").exists()


def test_installs_a_file_from_the_control_machine_after_checking_it(tmp_path: Path,
                                                                    mirror: Mirror) -> None:
    # 0.13.5: releases before 0.14.0 are .tgz, which the role unpacks the same way.
    sha256 = mirror.release("0.13.5")
    archive = mirror.root / "v0.13.5" / f"ollama-linux-{ARCH}.tgz"
    wrong = hashlib.sha256(b"another build").hexdigest()

    rc, _, output = run_archive_tasks(tmp_path, ollama_version="0.13.5",
                                      ollama_archive_src=str(archive),
                                      ollama_archive_sha256=sha_of(wrong))
    assert rc != 0
    assert f"has sha256 {sha256}" in output and wrong in output
    assert list((tmp_path / "download").iterdir()) == []  # the refused copy is removed
    assert not (tmp_path / "opt" / "ollama" / "0.13.5").exists()

    rc, _, output = run_archive_tasks(tmp_path, ollama_version="0.13.5",
                                      ollama_archive_src=str(archive),
                                      ollama_archive_sha256=sha_of(sha256))
    assert rc == 0, output
    assert mirror.requests == []  # nothing downloaded
    assert os.readlink(tmp_path / "opt" / "ollama" / "current") == "0.13.5"
    assert "client version is 0.13.5" in installed_version(tmp_path / "bin" / "ollama")


TOKEN = "9b1d3f5a7c9e1b3d5f7a9c1e3b5d7f9a"  # a test value


@pytest.fixture
def token_mirror(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The project's own mirror server (orchestrator/mirror/weights.py) with a token, the
    stand-in's release under <mirror>/ollama as `orchestrate mirror` lays it out; (the
    archives' base URL, the archive's sha256)."""
    from orchestrator.mirror.weights import MirrorServer

    root = tmp_path / "mirror"
    (root / "ollama").mkdir(parents=True)
    out = subprocess.run([sys.executable, str(MAKE_RELEASE), str(root / "ollama"), "--version",
                          ROLE_DEFAULT_VERSION, "--arch", ARCH], capture_output=True, text=True,
                         check=True).stdout
    sha256 = out.split()[1]
    with MirrorServer(root, "127.0.0.1", 0, token=TOKEN) as server:
        yield f"http://127.0.0.1:{server.address[1]}/ollama", sha256


def test_a_mirror_that_asks_for_a_token_gets_it_and_the_output_never_shows_it(
        tmp_path: Path, token_mirror: tuple[str, str]) -> None:
    base, sha256 = token_mirror
    rc, stats, output = run_archive_tasks(tmp_path, ollama_archive_base_url=base,
                                          ollama_archive_sha256=sha_of(sha256))
    # Without the token: refused (401), said with the URL, nothing installed.
    assert rc != 0 and stats["failures"] == 1
    assert f"{base}/v{ROLE_DEFAULT_VERSION}/ollama-linux-{ARCH}.tar.zst" in output
    assert "HTTP 401" in output, output
    assert not (tmp_path / "opt" / "ollama" / "current").is_symlink()

    rc, _, output = run_archive_tasks(tmp_path, ollama_archive_base_url=base,
                                      ollama_archive_sha256=sha_of(sha256),
                                      ollama_archive_token=TOKEN)
    assert rc == 0, output
    assert os.readlink(tmp_path / "opt" / "ollama" / "current") == ROLE_DEFAULT_VERSION
    assert TOKEN not in output
