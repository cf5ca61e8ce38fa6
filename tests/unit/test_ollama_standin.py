"""The Ollama STAND-IN (orchestrator/sandbox/ollama_standin.py) behaves as the role and the
probes expect of Ollama: its CLI talks to its server, models land under OLLAMA_MODELS in Ollama's
layout, and it refuses to start where Ollama does (an OLLAMA_MODELS it cannot write)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

STANDIN = Path(__file__).resolve().parents[2] / "orchestrator" / "sandbox" / "ollama_standin.py"
GGUF_HEADER = b"GGUF" + (3).to_bytes(4, "little") + bytes(16)  # version 3, no tensors, no keys
TEMPLATE = '{{- if .Messages }}\n# Tools\n{{ range .Messages }}{{ .Content }}{{ end }}{{ end }}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.models = tmp_path / "models"
        self.env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{self.port}",
                    "OLLAMA_MODELS": str(self.models), "HOME": str(tmp_path / "home")}
        self.proc = subprocess.Popen([sys.executable, str(STANDIN), "serve"], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self.get("/api/version")
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.communicate()[0]
                time.sleep(0.1)
        raise AssertionError("the stand-in did not answer /api/version")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=5) as answer:
            return json.loads(answer.read())

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(),
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(STANDIN), *args], env=self.env,
                              capture_output=True, text=True, check=False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path)
    yield running
    running.proc.terminate()
    running.proc.wait(timeout=10)


def test_version_list_and_pull_through_the_cli(server: Server) -> None:
    assert server.cli("--version").stdout.strip() == "ollama version is 0.32.7"
    assert server.cli("list").stdout.split() == ["NAME", "ID", "SIZE", "MODIFIED"]

    pulled = server.cli("pull", "qwen2.5:7b")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.splitlines()[-1] == "success"
    assert [m["name"] for m in server.get("/api/tags")["models"]] == ["qwen2.5:7b"]
    assert (server.models / "manifests" / "registry.ollama.ai" / "library" / "qwen2.5"
            / "7b").is_file()
    assert "qwen2.5:7b" in server.cli("list").stdout


def test_create_imports_a_gguf_with_its_modelfile(server: Server, tmp_path: Path) -> None:
    (tmp_path / "qwen.gguf").write_bytes(GGUF_HEADER)
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(
        "# written by the role\n"
        f"FROM {tmp_path / 'qwen.gguf'}\n"
        f'TEMPLATE """{TEMPLATE}"""\n'
        'SYSTEM """You are Qwen, created by Alibaba Cloud. You are a helpful assistant."""\n'
        "PARAMETER temperature 0.7\n"
        'PARAMETER stop "<|im_start|>"\n'
        'PARAMETER stop "<|im_end|>"\n')

    created = server.cli("create", "qwen-local", "-f", str(modelfile))
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines()[-1] == "success"
    assert [m["name"] for m in server.get("/api/tags")["models"]] == ["qwen-local:latest"]
    status, shown = server.post("/api/show", {"model": "qwen-local"})
    assert status == 200
    assert shown["template"] == TEMPLATE  # the "# Tools" line inside is not a comment
    assert shown["system"].startswith("You are Qwen")
    assert shown["parameters"].splitlines() == [
        "temperature 0.7", 'stop "<|im_start|>"', 'stop "<|im_end|>"']


def test_create_refuses_a_file_that_is_not_gguf(server: Server, tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file")
    (tmp_path / "Modelfile").write_text(f"FROM {tmp_path / 'x.gguf'}\n")
    created = server.cli("create", "broken", "-f", str(tmp_path / "Modelfile"))
    assert created.returncode == 1
    assert "invalid file magic" in created.stderr
    assert server.get("/api/tags")["models"] == []


def test_answers_are_canned_and_deterministic(server: Server) -> None:
    server.cli("pull", "qwen2.5:0.5b")
    body = {"model": "qwen2.5:0.5b", "messages": [{"role": "user", "content": "Say hello."}],
            "stream": False}
    first, second = server.post("/api/chat", body), server.post("/api/chat", body)
    assert first[0] == 200
    assert first[1]["message"] == second[1]["message"]
    assert "Stand-in answer" in first[1]["message"]["content"]
    status, completion = server.post("/v1/chat/completions", body)
    assert status == 200
    assert completion["choices"][0]["message"]["content"] == first[1]["message"]["content"]
    status, error = server.post("/api/generate", {"model": "qwen2.5:72b", "prompt": "hi"})
    assert status == 404
    assert error["error"] == 'model "qwen2.5:72b" not found, try pulling it first'


def test_cli_without_a_server(tmp_path: Path) -> None:
    env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{free_port()}"}
    run = [sys.executable, str(STANDIN)]
    version = subprocess.run([*run, "-v"], env=env, capture_output=True, text=True, check=True)
    assert version.stdout.splitlines() == [
        "Warning: could not connect to a running Ollama instance",
        "Warning: client version is 0.32.7"]
    listing = subprocess.run([*run, "list"], env=env, capture_output=True, text=True, check=False)
    assert listing.returncode == 1
    assert listing.stderr.startswith("Error: could not connect to ollama server")


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is under root's 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="ollama-standin-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.mark.skipif(os.geteuid() != 0 or SYSTEM_PYTHON is None,
                    reason="runs the server as another user (nobody) with the system's python3")
@pytest.mark.parametrize(("parent_mode", "message"), [
    # The data disk's mount point is root's and closed: the service user cannot pass it.
    (0o700, "Error: mkdir {models}/blobs: permission denied"),
    # OLLAMA_MODELS exists but is root's: Ollama fails at the first pull, the stand-in at start.
    (0o755, "Error: open {models}/blobs: permission denied"),
])
def test_refuses_to_start_without_a_writable_models_directory(
        world_readable_dir: Path, parent_mode: int, message: str) -> None:
    nobody = pwd.getpwnam("nobody")
    disk = world_readable_dir / "disk"
    models = disk / "ollama" / "models"
    for sub in ("blobs", "manifests"):
        (models / sub).mkdir(parents=True)
    disk.chmod(parent_mode)
    home = world_readable_dir / "home"
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    env = {"PATH": "/usr/bin:/bin", "OLLAMA_HOST": f"127.0.0.1:{free_port()}",
           "OLLAMA_MODELS": str(models), "HOME": str(home)}
    serve = [str(SYSTEM_PYTHON), str(STANDIN), "serve"]
    proc = subprocess.run(serve, env=env, user="nobody", capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == message.format(models=models)

    # The control: the same layout owned by the service user starts and answers.
    disk.chmod(0o755)
    for path in (disk / "ollama", models, models / "blobs", models / "manifests"):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    started = subprocess.Popen(serve, env=env, user="nobody", stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline and started.poll() is None, "did not start"
            try:
                with urllib.request.urlopen(f"http://{env['OLLAMA_HOST']}/api/version",
                                            timeout=2) as answer:
                    assert json.loads(answer.read()) == {"version": "0.32.7"}
                    break
            except OSError:
                time.sleep(0.1)
    finally:
        started.terminate()
        started.wait(timeout=10)
    assert (home / ".ollama" / "id_ed25519").stat().st_uid == nobody.pw_uid
