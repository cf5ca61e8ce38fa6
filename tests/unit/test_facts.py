"""nvidia-smi parsing against real outputs (tests/data/nvidia-smi: copies of
shared/fixtures/nvidia-smi, kept in the repository; see its SOURCES.md).

Every fixture file has a row in EXPECTED, with values read from the file itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from orchestrator.facts.nvidia_smi import (
    GpuFacts,
    GpuInfo,
    parse_list,
    parse_nvidia_smi,
    parse_query_csv,
    parse_query_text,
    parse_table,
    parse_version,
    parse_xml,
    summarize,
)

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "nvidia-smi"

# The telegraf plugin's query (SOURCES.md) for the header-less fixture.
TELEGRAF_COLUMNS = [
    "fan.speed", "memory.total", "memory.used", "memory.free", "pstate", "temperature.gpu",
    "name", "uuid", "compute_mode", "utilization.gpu", "utilization.memory", "index",
]

H100_MASKED = "GPU-00000000-0000-0000-0000-000000000000"
A5000_UUID = "GPU-12345678-aaaa-bbbb-cccc-0123456789ab"


class Expect(NamedTuple):
    driver: str | None
    cuda: str | None
    gpus: int
    name: str | None = None  # first GPU's
    memory_mib: int | None = None
    uuid: str | None = None
    mig_mode: str | None = None
    compute_cap: str | None = None
    migs: int = 0
    error: str | None = None
    first_index: int = 0


def failed(kind: str) -> Expect:
    return Expect(None, None, 0, error=kind)


EXPECTED: dict[str, Expect] = {
    # Failures: nothing but the error.
    "error_device_handle_nospace__Tesla-P4__unknown.txt": failed("device_handle"),
    "error_driver_comm__unknown__460.x.txt": failed("driver_not_loaded"),
    "error_no_devices__RTX-5090__unknown.txt": failed("no_devices"),
    "error_version_mismatch__GT-640__470.txt": failed("version_mismatch"),
    # "NVML library version: 570.124" is the user-space library, not the driver in use.
    "error_version_mismatch_nvml-line__unknown__570.124.txt": failed("version_mismatch"),
    # -L prints neither versions, memory nor MIG mode; MIG devices follow their GPU.
    "list__Tesla-T4__535.104.05.txt": Expect(
        None, None, 1, "Tesla T4", None, "GPU-0079ab15-5b72-04e1-d928-1f3bf288393d"),
    "list_mig__H100-80GB-HBM3__590.48.01.txt": Expect(
        None, None, 1, "NVIDIA H100 80GB HBM3", None, H100_MASKED, migs=4),
    "list_mig__H200__590.48.01.txt": Expect(
        None, None, 1, "NVIDIA H200", None, H100_MASKED, migs=5),
    "list_mig_legacy-uuid__A100-PCIE-40GB__460.80.txt": Expect(
        None, None, 1, "A100-PCIE-40GB", None, "GPU-9de3d0e8-33f5-10dc-0c79-2c88a7ab0a23",
        migs=3),
    # Unrecognized on purpose: a --query-compute-apps listing (one row per process, no
    # GPU index), not --query-gpu; reading GPUs out of it would be a guess.
    "query_compute_apps_mig__H100-80GB-HBM3__590.48.01.txt": failed("unrecognized"),
    # --query-gpu has no CUDA version field.
    "query_csv__RTX-2080-SUPER__465.27.txt": Expect(
        "465.27", None, 1, "NVIDIA GeForce RTX 2080 SUPER", 7979,
        "GPU-1937b558-347d-0f30-105b-893b98985668"),
    "query_csv_allfields__H100-80GB-HBM3__590.48.01.txt": Expect(
        "590.48.01", None, 1, "NVIDIA H100 80GB HBM3", 81559, H100_MASKED, "Disabled", "9.0"),
    "query_csv_allfields_kmd__RTX-2080-SUPER__610.57.04.txt": Expect(
        "610.57.04", None, 1, "NVIDIA GeForce RTX 2080 SUPER", 8192, H100_MASKED,
        None, "7.5"),
    # Unrecognized on purpose (both loop captures): the query asked for telemetry only
    # (index, temperature, clocks...), no GPU name, so there are no GPU facts to report.
    "query_csv_loop__GTX-1650-SUPER__530.41.03.txt": failed("unrecognized"),
    "query_csv_loop__unknown-GPU__520.56.06.txt": failed("unrecognized"),
    # Parsed with TELEGRAF_COLUMNS (see test_fixture); the last field, index, is 1.
    "query_csv_noheader_nounits__GTX-1070-Ti__unknown.txt": Expect(
        None, None, 1, "GeForce GTX 1070 Ti", 8114, "GPU-d1911b8a-f5c8-5e66-057c-486561269de8",
        first_index=1),
    "query_csv_windows__RTX-2080-SUPER__466.63.txt": Expect(
        "466.63", None, 1, "NVIDIA GeForce RTX 2080 SUPER", 8192,
        "GPU-1937b558-347d-0f30-105b-893b98985668"),
    "query_text_q__TITAN-V__560.35.03.txt": Expect(
        "560.35.03", "12.6", 1, "NVIDIA TITAN V", 12288,
        "GPU-f4c353ff-b56c-c1de-bcb9-7dad861b589a"),
    # Tables print no UUIDs; truncated names are kept as printed. The "MIG devices"
    # section has no UUIDs either, so MIG tables report the mode but no devices.
    "table__A100-SXM4-40GB__570.124.06.txt": Expect(
        "570.124.06", "12.8", 1, "NVIDIA A100-SXM4-40GB", 40960, None, "Disabled"),
    "table__A10__550.127.05.txt": Expect("550.127.05", "12.4", 1, "NVIDIA A10", 23028),
    "table__GeForce-laptop-16GB__470.63.01.txt": Expect(
        "470.63.01", "11.4", 1, "NVIDIA GeForce ...", 16116),
    "table__H100-80GB-HBM3__590.48.01.txt": Expect(
        "590.48.01", "13.1", 1, "NVIDIA H100 80GB HBM3", 81559, None, "Disabled"),
    "table__RTX-2000-Ada-Laptop__550.120.txt": Expect(
        "550.120", "12.4", 1, "NVIDIA RTX 2000 Ada Gene...", 8188),
    "table__RTX-2000-Ada-Laptop__580.95.05.txt": Expect(
        "580.95.05", "13.0", 1, "NVIDIA RTX 2000 Ada Gene...", 8188),
    "table__RTX-4080-SUPER__595.71.05.txt": Expect(
        "595.71.05", "13.2", 1, "NVIDIA GeForce RTX 4080 ...", 16376),
    "table__RTX-4090__580.65.06.txt": Expect(
        "580.65.06", "13.0", 1, "NVIDIA GeForce RTX 4090", 24564),
    "table_cuda-NA__A100-PCIE-40GB__470.82.01.txt": Expect(
        "470.82.01", None, 1, "NVIDIA A100-PCI...", 40536, None, "Disabled"),
    "table_mig__A100-PCIE-40GB__460.32.03.txt": Expect(
        "460.32.03", "11.2", 1, "A100-PCIE-40GB", 40536, None, "Enabled"),
    "table_mig__H100-80GB-HBM3__590.48.01.txt": Expect(
        "590.48.01", "13.1", 1, "NVIDIA H100 80GB HBM3", 81559, None, "Enabled"),
    "table_partial-ERR__GeForce-truncated__525.125.06.txt": Expect(
        "525.125.06", "12.0", 1, "NVIDIA GeForce ...", 23028),
    "table_windows-tccwddm_partial__RTX-2080-MaxQ__537.13.txt": Expect(
        "537.13", "12.2", 1, "NVIDIA GeForce RTX 2080 ...", 8192),
    "table_windows-wddm__RTX-2080-SUPER__591.86.txt": Expect(
        "591.86", "13.1", 1, "NVIDIA GeForce RTX 2080 ...", 8192),
    # --version lists no GPUs; 610+ deprecates DRIVER/CUDA for KMD/CUDA UMD.
    "version__H100-80GB-HBM3__590.48.01.txt": Expect("590.48.01", "13.1", 0),
    "version__RTX-2080-SUPER__610.57.04.txt": Expect("610.57.04", "13.3", 0),
    "xml__2x-RTX-A5000__590.44.01.txt": Expect(
        "590.44.01", "13.1", 2, "NVIDIA RTX A5000", 24564, A5000_UUID),
    "xml__8x-V100S-PCIE-32GB__460.73.01.txt": Expect(
        "460.73.01", "11.2", 8, "Tesla V100S-PCIE-32GB", 32510,
        "GPU-76098dc1-d3bc-9a1b-7ea6-f7b48837829e"),
    "xml__GT-1030__470.74.txt": Expect(
        "470.74", "11.4", 1, "NVIDIA GeForce GT 1030", 1998,
        "GPU-857c6374-f681-cf3a-f99f-9063a87b8ac0"),
    "xml__RTX-3060__570.124.04.txt": Expect(
        "570.124.04", "12.8", 1, "NVIDIA GeForce RTX 3060", 12288,
        "GPU-d6889ff6-2523-9142-ca3c-1ca3f396a625"),
    "xml__RTX-3080__595.58.03.txt": Expect(
        "595.58.03", "13.2", 1, "NVIDIA GeForce RTX 3080", 10240,
        "GPU-19d6d965-2acc-f646-00f8-4c76979aabb4"),
    "xml__RTX-4090__535.86.05.txt": Expect(
        "535.86.05", "12.2", 1, "NVIDIA GeForce RTX 4090", 24564,
        "GPU-71d1acc2-662d-2166-bf9f-65272d2fc437"),
    "xml__Tesla-P100-PCIE-16GB__510.47.03.txt": Expect(
        "510.47.03", "11.6", 1, "Tesla P100-PCIE-16GB", 16384,
        "GPU-d3da8716-eaab-75db-efc1-60e88e1cd55e"),
    "xml__Tesla-T4__515.105.01.txt": Expect(
        "515.105.01", "11.7", 1, "Tesla T4", 15360, "GPU-d37e67a5-91dd-3774-a5cb-99096249601a"),
    # The XML's <mig_device> entries have no UUIDs: mode only, like the table.
    "xml_mig__A100-SXM4-40GB__510.47.03.txt": Expect(
        "510.47.03", "11.6", 1, "NVIDIA A100-SXM4-40GB", 40960,
        "GPU-27b94a00-ed54-5c24-b1fd-1054085de32a", "Enabled"),
    "xml_no-doctype__GTX-1660-Ti-GraphicsDevice__418.43.txt": Expect(
        "418.43", "10.1", 1, "Graphics Device", 5912, "GPU-304a277d-3545-63b8-3a36-dfde3c992989"),
    "xml_windows-wddm__RTX-3080__536.40.txt": Expect(
        "536.40", "12.2", 1, "NVIDIA GeForce RTX 3080", 10240,
        "GPU-19d6d965-2acc-f646-00f8-4c76979aabb4"),
}


def fixture_files() -> list[str]:
    return sorted(p.name for p in FIXTURES.iterdir() if p.name != "SOURCES.md")


def load(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def test_every_fixture_has_an_expectation() -> None:
    assert fixture_files() == sorted(EXPECTED)


@pytest.mark.parametrize("name", fixture_files())
def test_fixture(name: str) -> None:
    want = EXPECTED[name]
    columns = TELEGRAF_COLUMNS if "noheader" in name else None
    facts = parse_nvidia_smi(load(name), columns=columns)

    assert (facts.error.kind if facts.error else None) == want.error
    assert (facts.driver_version, facts.cuda_version) == (want.driver, want.cuda)
    assert len(facts.gpus) == want.gpus
    assert len(facts.mig_devices) == want.migs
    if facts.gpus:
        first = facts.gpus[0]
        assert first.index == want.first_index
        assert (first.name, first.memory_total_mib, first.uuid) == (
            want.name, want.memory_mib, want.uuid)
        assert (first.mig_mode, first.compute_capability) == (want.mig_mode, want.compute_cap)
    if facts.error:
        assert facts.error.message and facts.error.next_step


def test_multi_gpu_xml_keeps_index_order() -> None:
    # minor_number is 1 then 0 in this file: the index is the position, not the minor.
    facts = parse_nvidia_smi(load("xml__2x-RTX-A5000__590.44.01.txt"))
    assert [(g.index, g.uuid) for g in facts.gpus] == [
        (0, A5000_UUID), (1, "GPU-12345678-aaaa-bbbb-cccc-0123456789cd")]
    eight = parse_nvidia_smi(load("xml__8x-V100S-PCIE-32GB__460.73.01.txt"))
    assert [g.index for g in eight.gpus] == list(range(8))
    assert {g.memory_total_mib for g in eight.gpus} == {32510}


@pytest.mark.parametrize(("name", "persistence", "ecc"), [
    # XML: <persistence_mode> and <ecc_mode><current_ecc>; N/A (no ECC) reads as None.
    ("xml__8x-V100S-PCIE-32GB__460.73.01.txt", "Disabled", "Enabled"),
    ("xml__2x-RTX-A5000__590.44.01.txt", "Enabled", "Disabled"),
    ("xml__RTX-3060__570.124.04.txt", "Enabled", None),
    ("xml_windows-wddm__RTX-3080__536.40.txt", None, None),
    # --query-gpu CSV: persistence_mode and ecc.mode.current, by header name.
    ("query_csv_allfields__H100-80GB-HBM3__590.48.01.txt", "Enabled", "Enabled"),
    ("query_csv_allfields_kmd__RTX-2080-SUPER__610.57.04.txt", "Disabled", None),
    ("query_csv_windows__RTX-2080-SUPER__466.63.txt", None, None),
    # -q text: "Persistence Mode" and "ECC Mode / Current".
    ("query_text_q__TITAN-V__560.35.03.txt", "Disabled", None),
    # The table's Persistence-M column (On/Off); it shows no ECC mode, only a count.
    ("table__A10__550.127.05.txt", "Enabled", None),
    ("table_mig__A100-PCIE-40GB__460.32.03.txt", "Disabled", None),
    # Windows tables put TCC/WDDM there instead: no persistence reading.
    ("table_windows-wddm__RTX-2080-SUPER__591.86.txt", None, None),
    # -L has neither.
    ("list__Tesla-T4__535.104.05.txt", None, None),
])
def test_persistence_and_ecc_mode(name: str, persistence: str | None, ecc: str | None) -> None:
    facts = parse_nvidia_smi(load(name))
    assert facts.gpus and facts.error is None
    assert {(g.persistence_mode, g.ecc_mode) for g in facts.gpus} == {(persistence, ecc)}


def test_mig_devices_from_list() -> None:
    facts = parse_nvidia_smi(load("list_mig__H200__590.48.01.txt"))
    assert [(m.gpu_index, m.profile) for m in facts.mig_devices] == [
        (0, "1c.3g.71gb"), (0, "2c.3g.71gb"), (0, "2g.35gb"), (0, "1g.18gb"), (0, "1g.18gb")]
    assert facts.mig_devices[4].uuid == "MIG-00000004-0000-0000-0000-000000000004"
    assert parse_list(load("list_mig__H200__590.48.01.txt") + "\n\n") == facts
    legacy = parse_nvidia_smi(load("list_mig_legacy-uuid__A100-PCIE-40GB__460.80.txt"))
    assert [(m.profile, m.uuid) for m in legacy.mig_devices] == [
        ("4g.20gb", "MIG-GPU-9de3d0e8-33f5-10dc-0c79-2c88a7ab0a23/2/0"),
        ("2g.10gb", "MIG-GPU-9de3d0e8-33f5-10dc-0c79-2c88a7ab0a23/3/0"),
        ("1g.5gb", "MIG-GPU-9de3d0e8-33f5-10dc-0c79-2c88a7ab0a23/9/0"),
    ]


def test_version_mismatch_keeps_the_nvml_line_in_the_message() -> None:
    facts = parse_nvidia_smi(load("error_version_mismatch_nvml-line__unknown__570.124.txt"))
    assert facts.error is not None
    assert "NVML library version: 570.124" in facts.error.message
    assert "reboot the host, or reload the nvidia modules" in facts.error.next_step


def test_next_steps_name_the_checks() -> None:
    not_loaded = parse_nvidia_smi(load("error_driver_comm__unknown__460.x.txt")).error
    assert not_loaded is not None
    for check in ("lsmod | grep nvidia", "dkms status", "Secure Boot", "nouveau"):
        assert check in not_loaded.next_step
    no_devices = parse_nvidia_smi(load("error_no_devices__RTX-5090__unknown.txt")).error
    assert no_devices is not None and "lspci" in no_devices.next_step
    assert "passthrough" in no_devices.next_step


# A 610-series table (public log of an RTX 5090 host; no 610 table is among the
# fixtures): the banner says "KMD Version" and "CUDA UMD Version".
TABLE_610 = """\
Tue Jun 30 02:02:51 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 610.43.02              KMD Version: 610.43.02     CUDA UMD Version: 13.3     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA GeForce RTX 5090        On  |   00000000:01:00.0 Off |                  N/A |
|  0%   32C    P8             11W /  575W |       1MiB /  32607MiB |      0%      Default |
|                                         |                        |                  N/A |
+-----------------------------------------+------------------------+----------------------+
"""


def test_table_610_banner_labels() -> None:
    facts = parse_nvidia_smi(TABLE_610)
    assert (facts.driver_version, facts.cuda_version) == ("610.43.02", "13.3")
    assert facts.gpus == [GpuInfo(index=0, name="NVIDIA GeForce RTX 5090",
                                  memory_total_mib=32607, persistence_mode="Enabled")]


# Driver 418: a two-line header (no "MIG M." row) and four GPUs (public notebook
# export of the d2l multi-GPU chapter; the notebook had indented it by four spaces).
TABLE_418 = """\
    Fri Jul  5 23:40:11 2019
    +-----------------------------------------------------------------------------+
    | NVIDIA-SMI 418.67       Driver Version: 418.67       CUDA Version: 10.1     |
    |-------------------------------+----------------------+----------------------+
    | GPU  Name        Persistence-M| Bus-Id        Disp.A | Volatile Uncorr. ECC |
    | Fan  Temp  Perf  Pwr:Usage/Cap|         Memory-Usage | GPU-Util  Compute M. |
    |===============================+======================+======================|
    |   0  Tesla V100-SXM2...  Off  | 00000000:00:1B.0 Off |                    0 |
    | N/A   47C    P0    54W / 300W |      0MiB / 16130MiB |      0%      Default |
    +-------------------------------+----------------------+----------------------+
    |   1  Tesla V100-SXM2...  Off  | 00000000:00:1C.0 Off |                    0 |
    | N/A   45C    P0    55W / 300W |   2005MiB / 16130MiB |      0%      Default |
    +-------------------------------+----------------------+----------------------+
    |   2  Tesla V100-SXM2...  Off  | 00000000:00:1D.0 Off |                    0 |
    | N/A   46C    P0    58W / 300W |      0MiB / 16130MiB |      4%      Default |
    +-------------------------------+----------------------+----------------------+
    |   3  Tesla V100-SXM2...  Off  | 00000000:00:1E.0 Off |                    0 |
    | N/A   43C    P0    40W / 300W |     11MiB / 16130MiB |      0%      Default |
    +-------------------------------+----------------------+----------------------+

    +-----------------------------------------------------------------------------+
    | Processes:                                                       GPU Memory |
    |  GPU       PID   Type   Process name                             Usage      |
    |=============================================================================|
    |    1     49887      C   /home/ubuntu/miniconda3/bin/python          1001MiB |
    |    1     59096      C   /home/ubuntu/miniconda3/bin/python           993MiB |
    +-----------------------------------------------------------------------------+
"""


def test_table_418_two_line_header_and_several_gpus() -> None:
    facts = parse_nvidia_smi(TABLE_418)
    assert (facts.driver_version, facts.cuda_version, facts.error) == ("418.67", "10.1", None)
    assert facts.gpus == [GpuInfo(index=i, name="Tesla V100-SXM2...", memory_total_mib=16130,
                                  persistence_mode="Disabled")
                          for i in range(4)]


def test_table_cut_before_its_closing_rule() -> None:
    facts = parse_table(TABLE_610.rstrip().rsplit("\n", 1)[0])
    assert [g.memory_total_mib for g in facts.gpus] == [32607]


def test_table_without_known_labels_is_unrecognized() -> None:
    # A future layout that renames the GPU/Name header must not be read by position.
    changed = TABLE_610.replace("| GPU  Name    ", "| Device Model  ")
    facts = parse_nvidia_smi(changed)
    assert facts.error is not None and facts.error.kind == "unrecognized"
    assert facts.gpus == []


def test_unknown_banner_label_gives_no_version_rather_than_a_guess() -> None:
    changed = TABLE_610.replace("KMD Version:", "Kernel Build:")
    facts = parse_nvidia_smi(changed)
    assert (facts.driver_version, facts.cuda_version) == (None, "13.3")
    assert facts.error is None


def test_warning_lines_before_a_report_are_ignored() -> None:
    warning = "WARNING: infoROM is corrupted at gpu 0000:01:00.0\n"
    listed = load("list__Tesla-T4__535.104.05.txt")
    assert parse_nvidia_smi(warning + listed) == parse_nvidia_smi(listed)
    only = parse_nvidia_smi(warning)
    assert only.error is not None and only.error.kind == "unrecognized"


def test_nvml_driver_not_loaded() -> None:
    facts = parse_nvidia_smi("Failed to initialize NVML: Driver Not Loaded\n")
    assert facts.error is not None and facts.error.kind == "driver_not_loaded"


def test_device_handle_error_keeps_the_other_gpus() -> None:
    text = "Unable to determine the device handle for GPU0000:07:00.0: Unknown Error\n" + TABLE_610
    facts = parse_nvidia_smi(text)
    assert facts.error is not None and facts.error.kind == "device_handle"
    assert "GPU0000:07:00.0" in facts.error.message
    assert [g.name for g in facts.gpus] == ["NVIDIA GeForce RTX 5090"]
    assert facts.driver_version == "610.43.02"


def test_csv_without_header_given_columns() -> None:
    text = ("0, NVIDIA H100 80GB HBM3, GPU-aaaa, 81559, 9.0, Enabled, 590.48.01\n"
            "1, NVIDIA H100 80GB HBM3, GPU-bbbb, 81559, 9.0, [N/A], 590.48.01\n")
    columns = ["index", "gpu_name", "uuid", "memory.total", "compute_cap", "mig.mode.current",
               "driver_version"]
    facts = parse_nvidia_smi(text, columns=columns)
    assert facts.error is None
    assert facts.driver_version == "590.48.01"
    assert facts.gpus == [
        GpuInfo(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", memory_total_mib=81559,
                compute_capability="9.0", mig_mode="Enabled"),
        GpuInfo(index=1, name="NVIDIA H100 80GB HBM3", uuid="GPU-bbbb", memory_total_mib=81559,
                compute_capability="9.0", mig_mode=None),
    ]
    assert parse_query_csv(text, columns=columns) == facts


def test_csv_without_header_or_columns_is_unrecognized() -> None:
    facts = parse_nvidia_smi(load("query_csv_noheader_nounits__GTX-1070-Ti__unknown.txt"))
    assert facts.error is not None and facts.error.kind == "unrecognized"
    assert "columns" in facts.error.message


def test_csv_with_header_is_read_by_name_even_when_columns_are_given() -> None:
    name = "query_csv_allfields__H100-80GB-HBM3__590.48.01.txt"
    header = [f.split(" [")[0].strip() for f in load(name).splitlines()[0].split(",")]
    assert parse_nvidia_smi(load(name), columns=header) == parse_nvidia_smi(load(name))


def test_csv_header_wins_over_columns_that_used_aliases() -> None:
    # Asked as "clocks.sm"; nvidia-smi's header echoes the canonical "clocks.current.sm".
    text = "index, name, clocks.current.sm [MHz]\n0, Tesla T4, 585 MHz\n"
    facts = parse_nvidia_smi(text, columns=["index", "name", "clocks.sm"])
    assert facts.gpus == [GpuInfo(index=0, name="Tesla T4")]


def test_csv_loop_keeps_one_entry_per_gpu() -> None:
    text = "index, name, memory.total [MiB]\n0, Tesla T4, 15360 MiB\n0, Tesla T4, 15360 MiB\n"
    assert parse_nvidia_smi(text).gpus == [GpuInfo(index=0, name="Tesla T4",
                                                   memory_total_mib=15360)]


_TABLE_HEAD = "\n".join(TABLE_610.splitlines()[:7])
_TABLE_RULE = TABLE_610.splitlines()[7]


@pytest.mark.parametrize(("parse", "text"), [
    (parse_table, _TABLE_HEAD),  # header never closed by a |=== rule
    (parse_table, _TABLE_HEAD + "\n" + _TABLE_RULE + "\n\n"),  # no GPU rows
    (parse_table, TABLE_610.replace("|   0  NVIDIA", "|  --  NVIDIA")),  # no index
    (parse_table, TABLE_610.replace("NVIDIA GeForce RTX 5090        On", "On".rjust(34))),
    (parse_xml, "<?xml version='1.0' ?><nvidia_smi_log_v2/>"),
    (parse_xml, "<nvidia_smi_log><gpu><uuid>GPU-1</uuid></gpu></nvidia_smi_log>"),
    (parse_query_text, "==NVSMI LOG==\nDriver Version : 560.35.03\n"),
    (parse_query_text, "==NVSMI LOG==\nGPU 00000000:01:00.0\n    GPU UUID : GPU-1\n"),
    (parse_list, ""),
    (parse_list, "  MIG 1g.10gb     Device  0: (UUID: MIG-1)"),  # MIG line before any GPU
    (parse_version, "NVML version        : 590.48\n"),
    (parse_query_csv, ""),
    (parse_query_csv, "index, name\n"),  # header only
    (parse_query_csv, "0, Tesla T4\n"),  # no header and no columns
    (parse_query_csv, "index, name\n0, Tesla T4, 15360 MiB\n"),  # row wider than header
    (parse_query_csv, "index, name\n[N/A], Tesla T4\n"),
])
def test_per_format_parsers_refuse_to_guess(parse: Callable[[str], GpuFacts],
                                            text: str) -> None:
    facts = parse(text)
    assert facts.error is not None and facts.error.kind == "unrecognized"
    assert facts.gpus == []


@pytest.mark.parametrize("text", [
    "",
    "   \n\n",
    "hello world",
    "Segmentation fault (core dumped)",
    "Failed to initialize NVML: Unknown Error",
    "<html><body>502 Bad Gateway</body></html>",
    "<?xml version='1.0' ?><nvidia_smi_log><gpu>",
])
def test_garbage_and_empty_are_unrecognized(text: str) -> None:
    facts = parse_nvidia_smi(text)
    assert facts.error is not None and facts.error.kind == "unrecognized"
    assert facts.gpus == [] and facts.driver_version is None


@pytest.mark.parametrize("text", [
    "bash: nvidia-smi: command not found",
    "/bin/sh: 1: nvidia-smi: not found",
    "[Errno 2] No such file or directory: b'nvidia-smi'",
])
def test_command_not_found_is_not_installed(text: str) -> None:
    facts = parse_nvidia_smi(text + "\n")
    assert facts.error is not None and facts.error.kind == "not_installed"
    assert facts.error.message == text
    assert "drivers stage" in facts.error.next_step


def test_dict_shape() -> None:
    facts = parse_nvidia_smi(load("list_mig__H100-80GB-HBM3__590.48.01.txt"))
    dumped = facts.to_dict()
    assert dumped["error"] is None
    assert dumped["gpus"][0] == {
        "index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": H100_MASKED,
        "memory_total_mib": None, "compute_capability": None, "mig_mode": None,
        "persistence_mode": None, "ecc_mode": None}
    assert dumped["mig_devices"][0] == {
        "gpu_index": 0, "profile": "3g.40gb", "uuid": "MIG-00000000-0000-0000-0000-000000000000"}
    error = parse_nvidia_smi("No devices were found").to_dict()
    assert list(error) == ["driver_version", "cuda_version", "gpus", "mig_devices", "error"]
    assert list(error["error"]) == ["kind", "message", "next_step"]


def test_facts_are_frozen_and_strict() -> None:
    facts = parse_nvidia_smi(TABLE_610)
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts.gpus[0].name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        GpuFacts(driver_version="1", extra_field=1)  # type: ignore[call-arg]


def test_summarize() -> None:
    line = summarize(parse_nvidia_smi(load("table_mig__H100-80GB-HBM3__590.48.01.txt")))
    assert line == ("driver 590.48.01, CUDA 13.1, 1 GPU(s) "
                    "[0: NVIDIA H100 80GB HBM3 81559 MiB MIG Enabled]")
    listed = summarize(parse_nvidia_smi(load("list_mig__H200__590.48.01.txt")))
    assert listed.endswith("5 MIG device(s)")
    error = summarize(parse_nvidia_smi(load(
        "error_version_mismatch_nvml-line__unknown__570.124.txt")))
    assert "\n" not in error
    assert error.startswith("error version_mismatch: Failed to initialize NVML")
