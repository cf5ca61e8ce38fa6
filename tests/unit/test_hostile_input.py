"""Hostile fleet and secrets files, through the real `orchestrate` command: each is refused
quickly with exit 2 and one line, never a traceback, a MemoryError or a RecursionError."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")

HOSTS = "groups:\n  g:\n    hosts:\n      h: {address: 192.0.2.1}\n"


def _limited() -> None:
    # The old loader expanded an alias bomb into tens of gigabytes: fail fast instead.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def run(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.perf_counter()
    proc = subprocess.run([ORCHESTRATE, *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=120, preexec_fn=_limited)
    return proc, time.perf_counter() - start


def refused(tmp_path: Path, fleet: str, *args: str) -> str:
    (tmp_path / "fleet.yml").write_text(fleet, encoding="utf-8")
    proc, seconds = run(tmp_path, *(args or ("plan", "--hosts", "g", "--no-gather")))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert seconds < 15  # the command's start-up is most of it
    return proc.stderr


def test_alias_bomb_of_eight_levels(tmp_path: Path) -> None:
    bomb = 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))
    stderr = refused(tmp_path, HOSTS + bomb)
    assert "fleet.yml:" in stderr and "aliases expand this value to more than" in stderr


def test_alias_bomb_through_merge_keys(tmp_path: Path) -> None:
    bomb = "b0: &b0 {k0: 1, k1: 1, k2: 1, k3: 1, k4: 1, k5: 1, k6: 1, k7: 1, k8: 1}\n" + "".join(
        f"b{i}: &b{i} {{<<: [{', '.join([f'*b{i - 1}'] * 9)}]}}\n" for i in range(1, 9))
    stderr = refused(tmp_path, HOSTS + bomb)
    assert "aliases expand this value to more than" in stderr


def test_five_thousand_nested_brackets(tmp_path: Path) -> None:
    stderr = refused(tmp_path, HOSTS + "x: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "fleet.yml:5: invalid YAML: nested deeper than 100 levels" in stderr


def test_nesting_built_from_aliases(tmp_path: Path) -> None:
    """Each level within the limit, the aliases stacking them beyond it."""
    stderr = refused(tmp_path, HOSTS + "x: &x " + "[" * 60 + "1" + "]" * 60 + "\n"
                     "y: " + "[" * 60 + "*x" + "]" * 60 + "\n")
    assert "fleet.yml:6: invalid YAML: aliases nest this value deeper than 100 levels" in stderr


def test_an_alias_inside_its_own_anchor(tmp_path: Path) -> None:
    stderr = refused(tmp_path, HOSTS + "x: &x [1, *x]\n")
    assert "fleet.yml:5: invalid YAML: an alias refers to the value that contains it" in stderr


def test_control_characters_in_a_key_stay_on_one_line(tmp_path: Path) -> None:
    stderr = refused(tmp_path, HOSTS + '"x\\n\\e[2Jy": 1\n')
    assert "\x1b" not in stderr
    assert "fleet.yml:5: x\\n\\x1b[2Jy: unknown key" in stderr


def test_a_newline_in_a_model_name(tmp_path: Path) -> None:
    stderr = refused(tmp_path, HOSTS + "deployments:\n  - name: d\n    model: \"m\\n"
                     "ansible_become_exe: /tmp/x\"\n    engine: vllm\n    hosts: g\n"
                     "    port: 8000\n")
    assert "fleet.yml:7: deployments[0].model: character U+000A is not allowed" in stderr


@pytest.mark.parametrize("text", ["vault_api_key: s3cret: more\n", "vault_api_key: *s3cret\n"])
def test_secrets_that_decrypt_but_are_not_yaml(tmp_path: Path, text: str) -> None:
    (tmp_path / "secrets.yml").write_text(text)
    (tmp_path / "vault-pass").write_text("pw\n")
    subprocess.run([str(Path(sys.executable).parent / "ansible-vault"), "encrypt",
                    "secrets.yml", "--vault-password-file", "vault-pass"], cwd=tmp_path,
                   check=True, capture_output=True)
    stderr = refused(tmp_path, "secrets: secrets.yml\n" + HOSTS, "up", "--hosts", "g",
                     "--no-gather", "--vault-password-file", "vault-pass")
    assert "secrets.yml:1: secrets: the decrypted secrets file is not valid YAML" in stderr
    assert "s3cret" not in stderr
    assert not (tmp_path / ".orchestrate" / "runs").exists()  # refused before any run
