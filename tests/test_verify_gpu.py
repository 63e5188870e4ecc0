"""playbooks/verify_gpu.yml: report parsing and thresholds, on real nvidia-smi output.

The fixture tests/fixtures/verify_gpu/h100-2026-11-21-* was captured on a lent H100
machine (driver 580.159.04, CUDA 13.0) by capture.sh beside it: the raw `nvidia-smi -q -x`
and `nvidia-smi nvlink --status` output, the driver's kernel log lines, and the JSON
report verify_gpu.yml wrote there with connection: local.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from repo_helpers import BIN, REPO

sys.path.insert(0, str(REPO / "playbooks" / "filter_plugins"))
import metalserve_gpu as mg

FIXTURES = REPO / "tests" / "fixtures" / "verify_gpu"
NAME = "h100-2026-11-21"
XML = (FIXTURES / f"{NAME}-nvidia-smi-q.xml").read_text()
NVLINK = (FIXTURES / f"{NAME}-nvlink-status.txt").read_text()
KLOG = (FIXTURES / f"{NAME}-kernel-log.txt").read_text()
DEVICE_REPORT: dict[str, Any] = json.loads((FIXTURES / f"{NAME}.json").read_text())

# The defaults of verify_gpu.yml, as its __verify_gpu_thresholds builds them.
DEFAULTS: dict[str, Any] = {
    "expected_count": None,
    "driver_branch": "580",
    "persistence_mode": "Enabled",
    "mig_mode": "Disabled",
    "max_ecc_uncorrected_volatile": 0,
    "max_ecc_corrected_volatile": None,
    "max_ecc_uncorrected_aggregate": None,
    "max_retired_pages": None,
    "max_remapped_rows_uncorrectable": None,
    "fail_on_pending_retirement": True,
    "fail_on_remap_pending": True,
    "fail_on_remap_failure": True,
    "pcie_gen": None,
    "pcie_width": None,
    "nvlink_all_active": False,
    "max_xid_events": 0,
    "ignored_xids": [],
}

XID_LOG = """\
[ 1201.551] NVRM: Xid (PCI:0000:00:06): 79, pid='<unknown>', name=<unknown>, GPU has fallen off
[ 1305.002] NVRM: Xid (PCI:0000:00:06): 13, pid=4242, name=python3, Graphics SM Warp Exception
[ 1400.000] NVRM: Xid (PCI:0000:3b:00): 31, pid=1, name=x, MMU Fault
"""

NVLINK_8GPU = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)
\t Link 0: 26.562 GB/s
\t Link 1: 26.562 GB/s
\t Link 2: <inactive>
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)
\t Link 0: 26.562 GB/s
"""


def report() -> dict[str, Any]:
    return mg.gpu_report(XML, nvlink=NVLINK, kernel_log=KLOG, kernel_log_source="dmesg", host="localhost")


# Parsing ######################################################################


def test_parse_real_h100_output() -> None:
    parsed = mg.parse_nvidia_smi_xml(XML)
    assert parsed["driver_version"] == "580.159.04"
    assert parsed["cuda_version"] == "13.0"
    assert parsed["attached_gpus"] == 1
    (gpu,) = parsed["gpus"]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"
    assert gpu["architecture"] == "Hopper"
    assert gpu["pci_bus_id"] == "00000000:00:06.0"
    assert gpu["uuid"].startswith("GPU-")
    assert gpu["persistence_mode"] == "Enabled"
    assert gpu["mig_mode"] == {"current": "Disabled", "pending": "Disabled"}
    assert gpu["ecc_mode"]["current"] == "Enabled"
    assert gpu["ecc_errors"]["volatile"] == {"corrected": 0, "uncorrected": 0}
    assert gpu["ecc_errors"]["aggregate"] == {"corrected": 0, "uncorrected": 0}
    # Hopper replaced page retirement by row remapping: retired pages are N/A there.
    assert gpu["retired_pages"] == {
        "single_bit": None,
        "double_bit": None,
        "total": None,
        "pending": None,
    }
    assert gpu["remapped_rows"] == {
        "correctable": 0,
        "uncorrectable": 0,
        "pending": False,
        "failure": False,
    }
    assert gpu["pcie"]["gen_max"] == 5
    assert gpu["pcie"]["width_current"] == 16
    assert gpu["pcie"]["gen_host_max"] is None  # N/A inside the VM
    assert gpu["memory_total_mib"] == 81559
    assert gpu["power_draw_w"] == pytest.approx(73.34)


def test_report_reproduces_the_device_report() -> None:
    """Parsing the raw fixture gives what the playbook wrote on the H100 machine
    (power_draw_w was added to the parser after the capture)."""
    ours = report()
    theirs = DEVICE_REPORT["hosts"]["localhost"]
    # The XML was captured by its own nvidia-smi call, seconds apart.
    ours.pop("nvidia_smi_timestamp")
    theirs.pop("nvidia_smi_timestamp")
    for gpu in ours["gpus"]:
        gpu.pop("power_draw_w")
    for gpu in theirs["gpus"]:
        gpu.pop("power_draw_w")
    assert ours == theirs
    assert DEVICE_REPORT["problems"] == {"localhost": []}


def test_kernel_log_without_xid_and_single_gpu_without_nvlink() -> None:
    rep = report()
    assert "NVRM" in KLOG
    assert rep["xid_events"] == []
    assert NVLINK.strip() == ""  # one PCIe-attached H100 in a VM: no NVLink to list
    assert rep["gpus"][0]["nvlink"] == {"active": 0, "inactive": 0, "links": []}


def test_xid_lines_are_parsed_and_attributed_to_their_gpu() -> None:
    rep = mg.gpu_report(XML, kernel_log=XID_LOG, kernel_log_source="journal", host="h")
    assert [e["xid"] for e in rep["xid_events"]] == [79, 13, 31]
    assert rep["xid_events"][0]["pci"] == "00:06"
    # The GPU at 00000000:00:06.0 gets its two events; the third is another device's.
    assert [e["xid"] for e in rep["gpus"][0]["xid_events"]] == [79, 13]


def test_nvlink_status_parse() -> None:
    links = mg.parse_nvlink_status(NVLINK_8GPU)
    assert links[0]["active"] == 2
    assert links[0]["inactive"] == 1
    assert links[0]["links"][0]["speed_gbytes_per_s"] == pytest.approx(26.562)
    assert links[1]["active"] == 1


def test_bad_xml_is_a_clear_error() -> None:
    with pytest.raises(mg.GpuReportError, match="no valid XML"):
        mg.parse_nvidia_smi_xml("NVIDIA-SMI has failed")


# Thresholds ###################################################################


def test_healthy_fixture_passes_the_defaults_and_its_own_count() -> None:
    assert mg.gpu_problems(report(), DEFAULTS) == []
    assert mg.gpu_problems(report(), {**DEFAULTS, "expected_count": 1, "pcie_gen": 5, "pcie_width": 16}) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"expected_count": 8}, "GPU count is 1, expected 8"),
        ({"driver_branch": "570"}, "driver 580.159.04 is not on branch 570"),
        ({"persistence_mode": "Disabled"}, "persistence mode is Enabled, expected Disabled"),
        ({"mig_mode": "Enabled"}, "MIG mode is Disabled, expected Enabled"),
        ({"pcie_gen": 6}, "PCIe link reaches gen 5, expected gen 6"),
        ({"pcie_width": 32}, "PCIe link is x16, expected x32"),
        ({"nvlink_all_active": True}, "0 NVLink link(s) inactive, 0 active"),
    ],
)
def test_each_threshold_names_the_problem(override: dict[str, Any], message: str) -> None:
    problems = mg.gpu_problems(report(), {**DEFAULTS, **override})
    assert len(problems) == 1
    assert message in problems[0]


def test_error_counters_against_limits() -> None:
    rep = report()
    gpu = rep["gpus"][0]
    gpu["ecc_errors"]["volatile"] = {"corrected": 12, "uncorrected": 1}
    gpu["remapped_rows"].update({"pending": True, "failure": True, "uncorrectable": 3})
    gpu["retired_pages"].update({"total": 5, "pending": True})
    problems = mg.gpu_problems(rep, DEFAULTS)
    text = "\n".join(problems)
    assert "1 uncorrected ECC errors (volatile), limit 0" in text
    assert "corrected ECC" not in text.replace("uncorrected ECC", "")  # no limit by default
    assert "row remapping is pending" in text
    assert "row remapping failed" in text
    assert "page retirement is pending" in text
    strict = mg.gpu_problems(
        rep,
        {
            **DEFAULTS,
            "max_ecc_corrected_volatile": 10,
            "max_retired_pages": 0,
            "max_remapped_rows_uncorrectable": 0,
        },
    )
    assert len(strict) == len(problems) + 3
    relaxed = {
        **DEFAULTS,
        "max_ecc_uncorrected_volatile": None,
        "fail_on_remap_pending": False,
        "fail_on_remap_failure": False,
        "fail_on_pending_retirement": False,
    }
    assert mg.gpu_problems(rep, relaxed) == []


def test_xid_threshold_and_ignored_codes() -> None:
    rep = mg.gpu_report(XML, kernel_log=XID_LOG, kernel_log_source="journal", host="h")
    problems = mg.gpu_problems(rep, DEFAULTS)
    assert problems == ["3 Xid event(s) in the kernel log (Xid 13, 31, 79)"]
    assert mg.gpu_problems(rep, {**DEFAULTS, "max_xid_events": 3}) == []
    assert mg.gpu_problems(rep, {**DEFAULTS, "ignored_xids": [13, 31, 79]}) == []


def test_thresholds_are_typed_and_checked() -> None:
    typed = mg.thresholds({**DEFAULTS, "expected_count": "8", "nvlink_all_active": "true", "pcie_gen": ""})
    assert typed["expected_count"] == 8
    assert typed["nvlink_all_active"] is True
    assert typed["pcie_gen"] is None
    assert mg.thresholds(DEFAULTS) == DEFAULTS
    for bad, message in (
        ({"expected_count": "eight"}, "verify_gpu_expected_count must be a whole number"),
        ({"expected_count": 0}, "verify_gpu_expected_count must be positive"),
        ({"mig_mode": "on"}, "verify_gpu_mig_mode must be Enabled, Disabled or null"),
        ({"ignored_xids": "79"}, "verify_gpu_ignored_xids must be a list"),
        ({"nvlink_all_active": "maybe"}, "verify_gpu_nvlink_all_active must be true or false"),
        ({"max_temp": 80}, "unknown GPU threshold 'max_temp'"),
    ):
        with pytest.raises(mg.GpuReportError, match=message):
            mg.thresholds({**DEFAULTS, **bad})


def test_unreadable_kernel_log_counts_nothing() -> None:
    rep = mg.gpu_report(XML, kernel_log=XID_LOG, kernel_log_source="unreadable", host="h")
    assert rep["xid_events"] == []


def test_driver_library_mismatch_is_reported_with_its_fix() -> None:
    rep = mg.gpu_report(
        "",
        nvidia_smi_error=("Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 580.95"),
        host="gpu-a01",
    )
    (problem,) = mg.gpu_problems(rep, DEFAULTS)
    assert "Driver/library version mismatch" in problem
    assert "reboot the host" in problem
    assert "modprobe nvidia" in problem
    assert mg.gpu_summary(rep, [problem])[0] == "gpu-a01: nvidia-smi failed"


def test_summary_lines() -> None:
    lines = mg.gpu_summary(report(), [])
    assert lines[0] == "localhost: 1 x NVIDIA H100 80GB HBM3, driver 580.159.04, CUDA 13.0"
    assert "PCIe gen 5/5 x16/16" in lines[2]
    assert lines[-1] == "healthy"


def test_report_is_json_serialisable() -> None:
    rep = copy.deepcopy(report())
    assert json.loads(json.dumps(rep)) == rep


# The playbook end to end, with a stand-in nvidia-smi printing the fixture #######


def run_verify_gpu(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        f'case "$1" in -q) cat "{FIXTURES / (NAME + "-nvidia-smi-q.xml")}" ;;'
        f' nvlink) cat "{FIXTURES / (NAME + "-nvlink-status.txt")}" ;; *) exit 1 ;; esac\n'
    )
    smi.chmod(0o755)
    report_path = tmp_path / "out" / "report.json"
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    env["PATH"] = f"{fake}{os.pathsep}{BIN}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            str(FIXTURES / "inventory.yml"),
            str(REPO / "playbooks" / "verify_gpu.yml"),
            "-e",
            f"verify_gpu_report_path={report_path}",
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return result, report_path


def test_playbook_writes_the_report_and_passes(tmp_path: Path) -> None:
    result, path = run_verify_gpu(tmp_path, "--check", "-e", "verify_gpu_expected_count=1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "changed=0" in result.stdout
    written = json.loads(path.read_text())
    assert written["problems"] == {"localhost": []}
    assert written["hosts"]["localhost"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert written["thresholds"]["expected_count"] == 1
    assert "every GPU check passed" in result.stdout


def test_playbook_rejects_a_malformed_threshold_before_probing(tmp_path: Path) -> None:
    result, path = run_verify_gpu(tmp_path, "-e", "verify_gpu_mig_mode=off")
    assert result.returncode != 0
    assert "verify_gpu_mig_mode must be Enabled, Disabled or null" in result.stdout
    assert not path.exists()


def test_playbook_fails_on_a_threshold_and_names_it(tmp_path: Path) -> None:
    result, path = run_verify_gpu(tmp_path, "-e", "verify_gpu_expected_count=8")
    assert result.returncode != 0
    assert "GPU count is 1, expected 8" in result.stdout
    # The report is written before the hosts are failed.
    assert json.loads(path.read_text())["problems"]["localhost"] == ["GPU count is 1, expected 8"]
