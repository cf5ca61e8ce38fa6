"""The fleet's secrets: an Ansible Vault-encrypted YAML file of API keys by variable name.

Ansible opens it on the hosts' behalf (`--extra-vars @FILE --vault-password-file PW`);
the probes open it here, in memory, to send each deployment's key. Nothing decrypted is
written anywhere, and a file that is not Vault-encrypted is refused: a key in plain text
beside the fleet file is the mistake this guards against.
"""

from __future__ import annotations

from pathlib import Path

from ansible.errors import AnsibleError
from ansible.parsing.dataloader import DataLoader
from ansible.parsing.vault import (
    AnsibleVaultError,
    VaultLib,
    get_file_vault_secret,
    is_encrypted,
)

from orchestrator.config.yamlsource import parse_yaml
from orchestrator.errors import ConfigError


def load_secrets(path: Path, password_file: Path | None) -> dict[str, str]:
    """The secrets file's variables; ConfigError naming the file and what to do."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the secrets file: {exc.strerror}", file=str(path),
                          key="secrets") from None
    if not is_encrypted(data):
        raise ConfigError("the secrets file is not Ansible Vault-encrypted; encrypt it with "
                          f"`ansible-vault encrypt {path}`", file=str(path), key="secrets")
    if password_file is None:
        raise ConfigError("the secrets file is Vault-encrypted: give --vault-password-file "
                          "(or set ANSIBLE_VAULT_PASSWORD_FILE)", file=str(path), key="secrets")
    try:
        secret = get_file_vault_secret(filename=str(password_file), loader=DataLoader())
        secret.load()
        plain = VaultLib([("default", secret)]).decrypt(data)
    except (AnsibleVaultError, AnsibleError) as exc:
        # The message names the file, never its content.
        raise ConfigError(f"cannot open with the vault password in {password_file}: "
                          f"{str(exc).splitlines()[0]}", file=str(path), key="secrets") from None
    try:
        loaded = parse_yaml(plain, str(path)).data
    except ConfigError as exc:
        # YAML's messages quote the text they stumble on: here, the decrypted secrets.
        raise ConfigError("the decrypted secrets file is not valid YAML (`ansible-vault edit "
                          f"{path}`)", file=str(path), line=exc.line, key="secrets") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise ConfigError("expected a mapping of variable names to values", file=str(path),
                          key="secrets")
    return {key: str(value) for key, value in loaded.items()}
