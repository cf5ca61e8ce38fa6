#!/usr/bin/env bash
# Installs what the control machine needs besides Python packages: podman and
# friends for the sandbox fleet and Molecule, the SSH client Ansible uses, and
# Python's venv module. Debian/Ubuntu only; safe to run again (apt skips what is there).
set -euo pipefail

# prometheus: promtool checks the generated monitoring config and rules; the e2e runs its binary.
packages=(podman runc slirp4netns debootstrap openssh-client iproute2 python3-venv make zstd prometheus)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
  command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
else
  SUDO=
fi
echo "installing: ${missing[*]}"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
