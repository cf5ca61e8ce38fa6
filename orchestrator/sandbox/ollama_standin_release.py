"""Pack the Ollama STAND-IN (ollama_standin.py) as an Ollama Linux release archive.

The real Ollama cannot be downloaded on the machines this project is developed and
tested on, so the sandbox and the tests install this stand-in through the ollama
role's real archive path instead. make_release() writes
OUT_DIR/v<version>/ollama-linux-<arch>.tar.zst and its sha256sum.txt, laid out like
https://github.com/ollama/ollama/releases/download/v<version>/. The archive has the
release's layout (./bin/ollama, ./lib/ollama/) and is zstd compressed like the
releases since 0.14.0 (gzip, .tgz, for older versions); it is byte-for-byte
reproducible (fixed owners and times), so its checksum only changes with its content.

Standard library only (and the zstd command): tests/data/ollama_standin/make_release.py
runs it under a plain python3 for the Molecule scenario.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import platform
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

STANDIN = Path(__file__).resolve().with_name("ollama_standin.py")
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "amd64": "amd64"}
# 2026-01-01T00:00:00Z: a fixed time keeps the archive reproducible.
MTIME = 1767225600
LIB_README = (b"Ollama STAND-IN: the real release keeps its runtime libraries here (CUDA, "
              b"ROCm, Vulkan backends); the stand-in needs none.\n")


def standin_version() -> str:
    match = re.search(r'^VERSION = "([^"]+)"$', STANDIN.read_text(), re.MULTILINE)
    if not match:
        raise SystemExit(f"{STANDIN}: no VERSION line")
    return match[1]


def machine_arch() -> str:
    """This machine's architecture as Ollama names its archives (amd64, arm64)."""
    return ARCHES.get(platform.machine(), platform.machine())


def tar_bytes(version: str) -> bytes:
    source = re.sub(r'^VERSION = "[^"]+"$', f'VERSION = "{version}"', STANDIN.read_text(),
                    count=1, flags=re.MULTILINE)
    buffer = io.BytesIO()
    entries: tuple[tuple[str | None, bytes | None], ...] = (
        (None, None), ("./bin", None), ("./bin/ollama", source.encode()),
        ("./lib", None), ("./lib/ollama", None), ("./lib/ollama/STAND-IN.txt", LIB_README))
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name or ".")
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "root", "root"
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o755 if name == "./bin/ollama" else 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def compress(data: bytes, ext: str) -> bytes:
    if ext == "tgz":
        return gzip.compress(data, mtime=MTIME)
    zstd = shutil.which("zstd")
    if zstd is None:
        raise SystemExit("zstd not found: install the zstd package (Ollama's archives are "
                         ".tar.zst)")
    return subprocess.run([zstd, "-q", "-19", "-c"], input=data, capture_output=True,
                          check=True).stdout


def make_release(out_dir: Path, version: str, arch: str) -> tuple[Path, str]:
    """Write the archive and sha256sum.txt; return the archive's path and sha256."""
    major, minor = (int(part) for part in version.split(".")[:2])
    ext = "tgz" if (major, minor) < (0, 14) else "tar.zst"
    release = out_dir / f"v{version}"
    release.mkdir(parents=True, exist_ok=True)
    archive = release / f"ollama-linux-{arch}.{ext}"
    compressed = compress(tar_bytes(version), ext)
    archive.write_bytes(compressed)
    sha256 = hashlib.sha256(compressed).hexdigest()
    (release / "sha256sum.txt").write_text(f"{sha256}  {archive.name}\n")
    return archive, sha256


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Pack the Ollama STAND-IN as an Ollama Linux release archive; prints the "
                    "archive's path and sha256.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--version", default=None, help="default: the stand-in's VERSION")
    parser.add_argument("--arch", default=machine_arch(), choices=sorted(set(ARCHES.values())))
    args = parser.parse_args(argv)
    archive, sha256 = make_release(args.out_dir, args.version or standin_version(), args.arch)
    print(f"{archive} {sha256}")


if __name__ == "__main__":
    main()
