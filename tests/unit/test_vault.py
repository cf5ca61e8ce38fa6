"""The fleet's Vault-encrypted secrets, opened with the real ansible-vault library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config.vault import load_secrets
from orchestrator.errors import ConfigError


def _vault(tmp_path: Path, text: str, password: str = "pw") -> tuple[Path, Path]:
    secrets = tmp_path / "secrets.yml"
    secrets.write_text(text)
    password_file = tmp_path / "vault-pass"
    password_file.write_text(password + "\n")
    vault = Path(sys.executable).parent / "ansible-vault"
    subprocess.run([str(vault), "encrypt", str(secrets), "--vault-password-file",
                    str(password_file)], check=True, capture_output=True)
    return secrets, password_file


def test_opens_with_the_password(tmp_path: Path) -> None:
    secrets, password = _vault(tmp_path, "vault_api_key: s3cret\nport: 8000\n")
    assert b"s3cret" not in secrets.read_bytes()
    assert load_secrets(secrets, password) == {"vault_api_key": "s3cret", "port": "8000"}


def test_wrong_password_names_the_file_not_the_content(tmp_path: Path) -> None:
    secrets, password = _vault(tmp_path, "vault_api_key: s3cret\n")
    password.write_text("other\n")
    with pytest.raises(ConfigError, match="cannot open with the vault password") as info:
        load_secrets(secrets, password)
    assert str(secrets) in str(info.value) and "s3cret" not in str(info.value)


def test_plain_text_secrets_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "secrets.yml"
    plain.write_text("vault_api_key: s3cret\n")
    with pytest.raises(ConfigError, match=r"not Ansible Vault-encrypted.*ansible-vault encrypt"):
        load_secrets(plain, None)


def test_a_password_is_required(tmp_path: Path) -> None:
    secrets, _ = _vault(tmp_path, "vault_api_key: s3cret\n")
    with pytest.raises(ConfigError, match="give --vault-password-file"):
        load_secrets(secrets, None)


@pytest.mark.parametrize(("text", "line"), [
    ("port: 8000\nvault_api_key: s3cret: more\n", 2),
    # YAML's own message would quote the alias, here the secret.
    ("vault_api_key: *s3cret\n", 1),
    ("vault_api_key: [s3cret\nport: 1\n", 2),
])
def test_decrypted_but_not_yaml_names_file_and_line_only(tmp_path: Path, text: str,
                                                         line: int) -> None:
    secrets, password = _vault(tmp_path, text)
    with pytest.raises(ConfigError, match="decrypted secrets file is not valid YAML") as info:
        load_secrets(secrets, password)
    assert (info.value.file, info.value.line) == (str(secrets), line)
    assert "s3cret" not in str(info.value)
    # Nothing that a traceback would print holds the decrypted text either.
    assert info.value.__cause__ is None and info.value.__suppress_context__
