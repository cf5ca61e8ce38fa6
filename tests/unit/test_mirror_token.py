"""The mirror's optional token (mirror.token_var): the server answers 401 without it, the plan
carries it only as a reference to the fleet's Vault secrets, and its value reaches no file of
a run directory."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from orchestrator.config.fleet import load_fleet
from orchestrator.errors import ConfigError
from orchestrator.knowledge.catalog import load_knowledge
from orchestrator.knowledge.compat import load_cuda_compat
from orchestrator.mirror.weights import MirrorServer, Request
from orchestrator.plan.planner import make_plan
from orchestrator.run.render import render
from orchestrator.workflows.mirror import mirror_token

TOKEN = "3f9c1e0d7b2a4c6e8f1a3b5d7c9e0f2a4b6c8d0e1f3a5b7c9d1e3f5a7b9c1d3e"  # a test value
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.fixture
def mirror_dir(tmp_path: Path) -> Path:
    files = tmp_path / "mirror" / "models" / "m" / "files"
    files.mkdir(parents=True)
    (files / "w.bin").write_bytes(b"w" * 100)
    (tmp_path / "mirror" / "wheels").mkdir()
    return tmp_path / "mirror"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("authorization, status", [
    (None, 401),
    (f"Bearer {TOKEN[:-1]}x", 401),
    (f"Bearer {TOKEN}x", 401),
    (f"Token {TOKEN}", 401),
    (basic("mirror", "wrong"), 401),
    ("Basic not-base64!", 401),
    (f"Bearer {TOKEN}", 200),
    (f"bearer  {TOKEN}", 200),
    (basic("mirror", TOKEN), 200),  # pip: the find-links URL's password
])
def test_with_a_token_the_server_answers_only_requests_that_carry_it(
        mirror_dir: Path, authorization: str | None, status: int) -> None:
    seen: list[Request] = []
    with MirrorServer(mirror_dir, "127.0.0.1", 0, token=TOKEN, on_request=seen.append) as srv:
        base = f"http://127.0.0.1:{srv.address[1]}"
        headers = {"Authorization": authorization} if authorization else {}
        for path in ("/models/m/files/w.bin", "/wheels/", "/models/absent"):
            answer = httpx.get(base + path, headers=headers)
            expected = 404 if status == 200 and path == "/models/absent" else status
            assert answer.status_code == expected, path
            if status == 401:
                # Nothing about the mirror without the token: not even what is absent.
                assert answer.content == b""
                assert "Basic" in answer.headers["WWW-Authenticate"]
        assert httpx.head(base + "/models/m/files/w.bin", headers=headers).status_code == status
    assert {r.status for r in seen} <= {status, 404}


def test_without_a_token_nothing_changes(mirror_dir: Path) -> None:
    with MirrorServer(mirror_dir, "127.0.0.1", 0) as srv:
        base = f"http://127.0.0.1:{srv.address[1]}"
        assert httpx.get(base + "/models/m/files/w.bin").content == b"w" * 100
        assert httpx.get(base + "/models/m/files/w.bin",
                         headers={"Authorization": "Bearer anything"}).status_code == 200
        assert httpx.get(base + "/models/").status_code == 404  # still no listing
        assert httpx.get(base + "/models/m/files/../../../.state/x").status_code == 404


def write_fleet(tmp_path: Path, *, secrets: bool = True, **mirror: Any) -> Path:
    path = tmp_path / "fleet.yml"
    path.write_text(yaml.safe_dump({
        **({"secrets": "secrets.vault.yml"} if secrets else {}),
        "mirror": {"url": "http://ctl:8090", "token_var": "mirror_token", **mirror},
        "groups": {"gpu": {"profile": "cpu", "pip": {"find_links": "http://ctl:8090/wheels/",
                                                      "no_index": True},
                           "hosts": {"h": {"address": "10.0.0.1"}}},
                   "other": {"profile": "cpu", "pip": {"find_links": "https://pypi.lan/w/"},
                             "hosts": {"o": {"address": "10.0.0.2"}}}},
        "deployments": [{"name": "q", "model": MODEL, "engine": "vllm", "hosts": "gpu",
                         "port": 8000, "options": {"open": True}},
                        {"name": "p", "model": MODEL, "engine": "vllm", "hosts": "other",
                         "port": 8000, "options": {"open": True}}]}), encoding="utf-8")
    return path


def test_token_var_is_a_variable_name(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yml"
    path.write_text("mirror: {url: 'http://ctl:8090', "
                    "token_var: '{{ lookup(\"pipe\", \"id\") }}'}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"mirror\.token_var: String should match pattern"):
        load_fleet(path)


def test_the_plan_references_the_token_only_where_mirror_downloads_go(tmp_path: Path) -> None:
    loaded = load_fleet(write_fleet(tmp_path))
    gpu = make_plan(loaded, "gpu", load_knowledge(), load_cuda_compat()).hosts[0].vars
    assert gpu["model_weights_mirror_token"] == "{{ mirror_token }}"
    assert gpu["python_env_pip_find_links"] == "http://ctl:8090/wheels/"
    assert gpu["python_env_pip_find_links_password"] == "{{ mirror_token }}"
    # Wheels from elsewhere: the mirror's token is not sent there.
    other = make_plan(loaded, "other", load_knowledge(), load_cuda_compat()).hosts[0].vars
    assert "python_env_pip_find_links_password" not in other
    assert other["model_weights_mirror_token"] == "{{ mirror_token }}"
    plain = load_fleet(write_fleet(tmp_path, token_var=None))
    assert not {"model_weights_mirror_token", "python_env_pip_find_links_password"} & set(
        make_plan(plain, "gpu", load_knowledge(), load_cuda_compat()).hosts[0].vars)


def test_ollama_archives_from_the_mirror_get_the_token_and_from_elsewhere_not(
        tmp_path: Path) -> None:
    path = write_fleet(tmp_path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["groups"]["gpu"]["vars"] = {"ollama_archive_base_url": "http://ctl:8090/ollama"}
    data["groups"]["other"]["vars"] = {"ollama_archive_base_url": "https://ctl:8090.evil/o"}
    data["deployments"] = [{"name": f"o-{group}", "model": MODEL, "engine": "ollama",
                            "hosts": group, "port": 11434} for group in ("gpu", "other")]
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    loaded = load_fleet(path)
    gpu = make_plan(loaded, "gpu", load_knowledge(), load_cuda_compat())
    assert gpu.hosts[0].vars["ollama_archive_token"] == "{{ mirror_token }}"
    other = make_plan(loaded, "other", load_knowledge(), load_cuda_compat()).hosts[0].vars
    assert "ollama_archive_token" not in other
    # GitHub's release downloads (the role's default) never get it.
    del data["groups"]["gpu"]["vars"]
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    plain = make_plan(load_fleet(path), "gpu", load_knowledge(), load_cuda_compat())
    assert "ollama_archive_token" not in plain.hosts[0].vars
    # Rendered as the reference Ansible resolves from the secrets, not as data.
    run = render(gpu, tmp_path / "runs", "r1")
    host_vars = (run.path / "inventory" / "host_vars" / "h.yml").read_text(encoding="utf-8")
    assert "ollama_archive_token: '{{ mirror_token }}'" in host_vars


def test_the_token_reaches_no_file_of_a_run_directory(tmp_path: Path) -> None:
    loaded = load_fleet(write_fleet(tmp_path))
    plan = make_plan(loaded, "gpu", load_knowledge(), load_cuda_compat())
    run = render(plan, tmp_path / "runs", "r1")
    texts = {p.relative_to(run.path).as_posix(): p.read_text(encoding="utf-8")
             for p in run.path.rglob("*") if p.is_file()}
    assert texts and not [name for name, text in texts.items() if TOKEN in text]
    # The reference stays a template (resolved by Ansible from the secrets file), not data.
    host_vars = texts["inventory/host_vars/h.yml"]
    assert "model_weights_mirror_token: '{{ mirror_token }}'" in host_vars
    assert "python_env_pip_find_links_password: '{{ mirror_token }}'" in host_vars
    # The command line names the secrets file, never a value.
    assert "@" + str(tmp_path / "secrets.vault.yml") in texts["command.txt"]


def test_the_token_comes_from_the_secrets_and_errors_name_no_value(tmp_path: Path) -> None:
    loaded = load_fleet(write_fleet(tmp_path))
    assert mirror_token(loaded, {"mirror_token": TOKEN}) == TOKEN
    with pytest.raises(ConfigError, match=r"secrets\.vault\.yml: mirror\.token_var: no secret "
                                          r"'mirror_token'") as caught:
        mirror_token(loaded, {"other": TOKEN})
    assert TOKEN not in str(caught.value)
    with pytest.raises(ConfigError, match=r"needs the fleet's Vault-encrypted secrets file"):
        mirror_token(load_fleet(write_fleet(tmp_path, secrets=False)), {})
    assert mirror_token(load_fleet(write_fleet(tmp_path, token_var=None)), {}) is None


def test_serve_command_refuses_a_token_it_cannot_open(tmp_path: Path) -> None:
    write_fleet(tmp_path)
    (tmp_path / "secrets.vault.yml").write_text("mirror_token: plain\n", encoding="utf-8")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "orchestrate"), "mirror", "--hosts", "gpu",
         "--serve", "--no-wheels", "--no-ollama"],
        cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "not Ansible Vault-encrypted" in proc.stderr and "plain" not in proc.stderr


def test_model_weights_role_sends_the_token_and_logs_it_nowhere(tmp_path: Path,
                                                                mirror_dir: Path) -> None:
    """The model_weights role's `mirror` source on this machine (local connection), one
    inventory host per case, against a MirrorServer asking for the token."""
    import hashlib
    import json
    import os
    import pwd

    repo = Path(__file__).resolve().parents[2]
    model = mirror_dir / "models" / "m"
    (model / "manifest.json").write_text(json.dumps({"files": {"w.bin": {
        "size": 100, "sha256": hashlib.sha256(b"w" * 100).hexdigest()}}}))
    user = pwd.getpwuid(os.getuid()).pw_name
    bindir = Path(sys.executable).parent
    with MirrorServer(mirror_dir, "127.0.0.1", 0, token=TOKEN) as server:
        base = f"http://127.0.0.1:{server.address[1]}/models/m"
        cases = {"with": TOKEN, "wrong": "not-the-token", "without": ""}
        inventory = {"all": {"vars": {
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "model_weights_owner": user, "model_weights_group": user,
            "model_weights_download_retries": 0, "model_weights_free_space_margin_mib": 1},
            "hosts": {name: {
                "model_weights_root": str(tmp_path / name),
                "model_weights_mirror_token": token,
                "model_weights_models": [{
                    "name": "m", "dest": str(tmp_path / name / "m"), "source": "mirror",
                    "url": f"{base}/files/", "manifest_url": f"{base}/manifest.json"}]}
                for name, token in cases.items()}}}
        (tmp_path / "inventory.json").write_text(json.dumps(inventory))
        proc = subprocess.run(
            [str(bindir / "ansible-playbook"), "-v", "-i", str(tmp_path / "inventory.json"),
             str(repo / "tests" / "data" / "model-weights-playbook.yml")],
            env={**os.environ, "ANSIBLE_CONFIG": str(repo / "ansible.cfg"),
                 "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")},
            cwd=repo, capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert (tmp_path / "with" / "m" / "w.bin").read_bytes() == b"w" * 100, output
    for name in ("wrong", "without"):
        assert not (tmp_path / name / "m" / "w.bin").exists()
    said = " ".join(output.split())
    for name in ("wrong", "without"):
        assert f"fatal: [{name}]" in said, output
    assert said.count("manifest.json: HTTP 401. The mirror asks for a token") >= 2, output
    assert TOKEN not in output


def test_pip_authenticates_through_the_roles_pip_conf(tmp_path: Path,
                                                       mirror_dir: Path) -> None:
    """python_env's pip.conf (its template, rendered by Ansible's template module as the
    role does) carries the token as the find-links URL's password: pip, reading only that
    file, takes a wheel from a MirrorServer asking for the token; the command line has none."""
    import os
    import zipfile

    info = "tinypkg-0.1.dist-info"
    with zipfile.ZipFile(mirror_dir / "wheels" / "tinypkg-0.1-py3-none-any.whl", "w") as w:
        w.writestr("tinypkg/__init__.py", "")
        w.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n")
        w.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        w.writestr(f"{info}/RECORD", "")
    repo = Path(__file__).resolve().parents[2]
    bindir = Path(sys.executable).parent
    with MirrorServer(mirror_dir, "127.0.0.1", 0, token=TOKEN) as server:
        links = f"http://127.0.0.1:{server.address[1]}/wheels/"
        results = {}
        for name, password in (("with", TOKEN), ("without", None)):
            conf = tmp_path / f"{name}.conf"
            extra = {"python_env_path": str(tmp_path), "python_env_pip_index_url": None,
                     "python_env_pip_extra_index_urls": [], "python_env_pip_find_links": links,
                     "python_env_pip_find_links_password": password,
                     "python_env_pip_no_index": True, "python_env_pip_trusted_hosts": []}
            (tmp_path / f"{name}.json").write_text(json.dumps(extra))
            rendered = subprocess.run(
                [str(bindir / "ansible"), "localhost", "-c", "local", "-m",
                 "ansible.builtin.template", "-a",
                 f"src={repo}/roles/python_env/templates/pip.conf.j2 dest={conf}",
                 "-e", f"@{tmp_path / f'{name}.json'}"],
                capture_output=True, text=True, check=False, cwd=tmp_path,
                env={**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")})
            assert rendered.returncode == 0, rendered.stdout + rendered.stderr
            (tmp_path / "constraints.txt").write_text("")
            results[name] = subprocess.run(
                [sys.executable, "-m", "pip", "download", "tinypkg==0.1", "--dest",
                 str(tmp_path / name)], capture_output=True, text=True, check=False,
                # Only that file: no PIP_* of this machine's environment.
                env={**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
                     "PIP_CONFIG_FILE": str(conf)})
    assert f"mirror:{TOKEN}@127.0.0.1" in (tmp_path / "with.conf").read_text()
    assert results["with"].returncode == 0, results["with"].stderr
    assert (tmp_path / "with" / "tinypkg-0.1-py3-none-any.whl").exists()
    assert TOKEN not in results["with"].stdout + results["with"].stderr  # pip redacts it
    assert results["without"].returncode != 0
    assert "mirror:" not in (tmp_path / "without.conf").read_text()
