"""Facts read from a directory (`orchestrate plan --facts DIR`): <host>.json as `orchestrate
facts --json` writes it, or a saved nvidia-smi output as <host>.txt (real outputs from
tests/data/facts, SOURCES.md there)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.facts.hostfacts import HostFacts
from orchestrator.facts.offline import load_facts_dir

FACTS = Path(__file__).resolve().parents[2] / "tests" / "data" / "facts"
WHEN = dt.datetime(2026, 12, 5, 23, 50, tzinfo=dt.UTC)


def test_saved_nvidia_smi_outputs_read_as_facts_timed_by_the_file(tmp_path: Path) -> None:
    for name in ("h535.txt", "h550.txt"):
        shutil.copy(FACTS / name, tmp_path / name)
    os.utime(tmp_path / "h535.txt", (WHEN.timestamp(), WHEN.timestamp()))
    facts = load_facts_dir(tmp_path, ["h535", "h550"])
    xml = facts["h535"]
    assert xml.host == "h535" and xml.gathered_at == WHEN
    assert xml.origin == f"file {tmp_path / 'h535.txt'}"
    assert xml.nvidia is not None and xml.nvidia.driver_version == "535.86.05"
    assert [g.name for g in xml.nvidia.gpus] == ["NVIDIA GeForce RTX 4090"]
    assert xml.where() == f"found on the host (file {tmp_path / 'h535.txt'}, 2026-12-05 23:50 UTC)"
    table = facts["h550"].nvidia
    assert table is not None and table.driver_version == "550.127.05"
    assert table.driver_state == "loaded"


def test_a_json_document_reads_back_as_written(tmp_path: Path) -> None:
    doc = HostFacts(host="gpu1", gathered_at=WHEN, origin="gathered by playbooks/facts.yml",
                    memory_mib=64000,
                    disk=[{"path": "/opt/qwen-serve/env", "mount": "/", "free_mib": 1000}])
    (tmp_path / "gpu1.json").write_text(doc.model_dump_json(), encoding="utf-8")
    assert load_facts_dir(tmp_path, ["gpu1"]) == {"gpu1": doc}


def test_a_bad_json_document_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "gpu1.json"
    path.write_text('{"host": "gpu1", "gathered_at": "2026-12-05T23:50:00Z", "origin": "x", '
                    '"disk": [{"path": "/", "mount": "/", "free_mib": "lots"}]}',
                    encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_facts_dir(tmp_path, ["gpu1"])
    assert str(caught.value).startswith(f"{path}: disk[0].free_mib: not a host facts document: ")
    path.write_text(HostFacts(host="gpu9", gathered_at=WHEN, origin="x").model_dump_json(),
                    encoding="utf-8")
    with pytest.raises(ConfigError, match=r"gpu1.json: host: holds the facts of host 'gpu9', "
                                          r"not of 'gpu1'"):
        load_facts_dir(tmp_path, ["gpu1"])


def test_a_host_without_a_file_or_with_two_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_facts_dir(tmp_path, ["gpu1"])
    assert str(caught.value) == (
        f"--facts: no facts for host 'gpu1' in {tmp_path}: expected {tmp_path / 'gpu1.json'} "
        f"(`orchestrate facts --json`) or {tmp_path / 'gpu1.txt'} (a saved `nvidia-smi -q -x` "
        "or `nvidia-smi` output)")
    shutil.copy(FACTS / "h550.txt", tmp_path / "gpu1.txt")
    (tmp_path / "gpu1.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"host 'gpu1' has two facts files .*gpu1.json and "
                                          r"gpu1.txt: keep one"):
        load_facts_dir(tmp_path, ["gpu1"])
    with pytest.raises(ConfigError, match=r"facts directory .*nowhere does not exist"):
        load_facts_dir(tmp_path / "nowhere", ["gpu1"])
