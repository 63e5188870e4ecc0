"""roles/common/files/metalserve_hardware.fact against fake sysfs trees.

The fact script is what gates every GPU and RDMA step (ansible_local.metalserve_hardware):
it must find NVIDIA GPUs and NVSwitches by PCI vendor and class, RDMA ports with their
state, link layer and rate, and print a valid empty report on a machine with none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from repo_helpers import REPO

SCRIPT = REPO / "roles" / "common" / "files" / "metalserve_hardware.fact"
FIXTURES = REPO / "tests" / "fixtures" / "verify_gpu"


def run_fact(root: Path | None, *, via_env: bool = False, smi: Path | None = None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("METALSERVE_SYSFS_ROOT", "METALSERVE_NVIDIA_SMI")}
    if smi is not None:
        env["METALSERVE_NVIDIA_SMI"] = str(smi)
    args = [sys.executable, str(SCRIPT)]
    if root is not None and via_env:
        env["METALSERVE_SYSFS_ROOT"] = str(root)
    elif root is not None:
        args.append(str(root))
    result = subprocess.run(args, env=env, capture_output=True, text=True, check=True, timeout=30)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def add_pci(root: Path, address: str, vendor: str, device: str, pci_class: str, numa: str = "0") -> Path:
    dev = root / "bus" / "pci" / "devices" / address
    dev.mkdir(parents=True)
    for name, value in {
        "vendor": vendor,
        "device": device,
        "class": pci_class,
        "numa_node": numa,
        "subsystem_device": "0x16c1",
    }.items():
        (dev / name).write_text(value + "\n")
    return dev


def add_rdma_port(root: Path, device: str, port: int, state: str, link_layer: str, rate: str, netdev: str = "") -> None:
    port_dir = root / "class" / "infiniband" / device / "ports" / str(port)
    port_dir.mkdir(parents=True)
    (port_dir / "state").write_text(state + "\n")
    (port_dir / "phys_state").write_text("5: LinkUp\n")
    (port_dir / "link_layer").write_text(link_layer + "\n")
    (port_dir / "rate").write_text(rate + "\n")
    if netdev:
        ndevs = port_dir / "gid_attrs" / "ndevs"
        ndevs.mkdir(parents=True)
        (ndevs / "0").write_text(netdev + "\n")
        (ndevs / "1").write_text(netdev + "\n")
    (root / "class" / "infiniband" / device / "fw_ver").write_text("28.39.1002\n")


def test_script_is_executable_python() -> None:
    assert os.access(SCRIPT, os.X_OK), "facts.d runs the script: it must be executable in git"
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


def test_no_sysfs_gives_an_empty_report(tmp_path: Path) -> None:
    for root in (tmp_path, tmp_path / "does-not-exist"):
        fact = run_fact(root)
        assert fact["gpu_count"] == 0
        assert fact["nvswitch_count"] == 0
        assert fact["rdma_device_count"] == 0
        assert fact["gpus"] == []
        assert fact["nvswitches"] == []
        assert fact["rdma_devices"] == []
        assert fact["has_gpu"] is False
        assert fact["has_rdma"] is False
        assert fact["has_nvswitch"] is False
        assert fact["schema"] == 1


def test_hgx_node_gpus_switches_and_rdma(tmp_path: Path) -> None:
    for i in range(8):
        add_pci(tmp_path, f"0000:{0x18 + i:02x}:00.0", "0x10de", "0x2330", "0x030200", numa=str(i // 4))
    for i in range(4):
        add_pci(tmp_path, f"0000:{0x05 + i:02x}:00.0", "0x10de", "0x22a3", "0x068000")
    # Not counted: an NVIDIA audio function, a non-NVIDIA bridge, a VGA card of another vendor.
    add_pci(tmp_path, "0000:18:00.1", "0x10de", "0x22ba", "0x040300")
    add_pci(tmp_path, "0000:00:00.0", "0x8086", "0x0d57", "0x068000")
    add_pci(tmp_path, "0000:03:00.0", "0x1a03", "0x2000", "0x030000")
    add_rdma_port(tmp_path, "mlx5_0", 1, "4: ACTIVE", "InfiniBand", "400 Gb/sec (4X NDR)")
    add_rdma_port(tmp_path, "mlx5_1", 1, "1: DOWN", "Ethernet", "200 Gb/sec (4X HDR)", netdev="ens1f0np0")

    fact = run_fact(tmp_path, via_env=True, smi=fake_smi(tmp_path, HGX_TOPOLOGY))

    assert fact["gpu_count"] == 8
    # NVSwitches: every GPU has NVLink to every other.
    assert fact["gpu_nvlink_peers"] == [[j for j in range(8) if j != i] for i in range(8)]
    assert fact["gpu_device_ids"] == ["0x2330"]
    assert [g["pci_address"] for g in fact["gpus"]][:2] == ["0000:18:00.0", "0000:19:00.0"]
    assert fact["gpus"][4]["numa_node"] == 1
    assert fact["nvswitch_count"] == 4
    assert fact["nvswitch_device_ids"] == ["0x22a3"]
    assert fact["has_gpu"]
    assert fact["has_nvswitch"]
    assert fact["has_rdma"]
    assert fact["rdma_device_count"] == 2
    assert fact["roce_port_count"] == 1
    ib, roce = fact["rdma_devices"]
    assert ib["name"] == "mlx5_0"
    assert ib["fw_ver"] == "28.39.1002"
    assert ib["ports"] == [
        {
            "port": 1,
            "state": "ACTIVE",
            "state_code": 4,
            "phys_state": "LinkUp",
            "link_layer": "InfiniBand",
            "rate": "400 Gb/sec (4X NDR)",
            "rate_gbps": 400.0,
            "netdevs": [],
        }
    ]
    assert roce["ports"][0]["state"] == "DOWN"
    assert roce["ports"][0]["link_layer"] == "Ethernet"
    assert roce["ports"][0]["rate_gbps"] == 200.0
    assert roce["ports"][0]["netdevs"] == ["ens1f0np0"]


def test_argument_overrides_nothing_else_needed(tmp_path: Path) -> None:
    add_pci(tmp_path, "0000:41:00.0", "0x10de", "0x2335", "0x030200")
    assert run_fact(tmp_path)["gpu_device_ids"] == ["0x2335"]


def test_real_h100_pci_listing_matches_the_device_report(tmp_path: Path) -> None:
    """The PCI devices read on the H100 machine (pci.txt), rebuilt as a tree, give the
    report the script printed there (hardware-fact.json)."""
    for line in (FIXTURES / "h100-2026-11-21-pci.txt").read_text().splitlines():
        address, vendor, device, pci_class = line.split()
        add_pci(tmp_path, address, vendor, device, pci_class, numa="-1")
    expected = json.loads((FIXTURES / "h100-2026-11-21-hardware-fact.json").read_text())
    fact = run_fact(tmp_path)
    # gpu_nvlink_peers came after that capture (and needs nvidia-smi, which the tree lacks).
    ignore = {"sysfs_root", "gpus", "gpu_nvlink_peers"}
    assert {k: v for k, v in fact.items() if k not in ignore} == {k: v for k, v in expected.items() if k not in ignore}
    # The tree has no driver links; everything else of each GPU matches.
    assert [{**g, "driver": None} for g in fact["gpus"]] == [{**g, "driver": None} for g in expected["gpus"]]


# `nvidia-smi topo -m` of an 8-GPU HGX H100 (NVSwitches) and of a PCIe box with NVLink bridges
# across cards 0-2 and 1-3 (driver 535-580 layout: GPU columns, then NICs and affinities).
# The header underlined with terminal escapes, as nvidia-smi prints it even into a pipe.
HGX_TOPOLOGY = "\t\x1b[4m" + "\t".join(f"GPU{i}" for i in range(8))
HGX_TOPOLOGY += "\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
HGX_TOPOLOGY += "".join(
    f"GPU{i}\t" + "\t".join(" X " if j == i else "NV18" for j in range(8)) + f"\tPXB\t0-55\t{i // 4}\t\tN/A\n"
    for i in range(8)
)
HGX_TOPOLOGY += "NIC0\t" + "\t".join(["PXB"] * 8) + "\t X \n\nLegend:\n\n  X    = Self\n"
HGX_TOPOLOGY += "  NV#  = Connection traversing a bonded set of # NVLinks\n"
BRIDGED_TOPOLOGY = """\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tSYS\tNV4\tSYS\t0-15\t0\t\tN/A
GPU1\tSYS\t X \tSYS\tNV4\t16-31\t1\t\tN/A
GPU2\tNV4\tSYS\t X \tSYS\t0-15\t0\t\tN/A
GPU3\tSYS\tNV4\tSYS\t X \t16-31\t1\t\tN/A

Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  NV#  = Connection traversing a bonded set of # NVLinks
"""


# What the H200 machine's nvidia-smi printed (driver 580.159.04, one GPU).
H200_TOPOLOGY = (FIXTURES / "h200-2026-12-04-nvidia-smi-topo.txt").read_text()


def fake_smi(tmp_path: Path, topology: str, code: int = 0) -> Path:
    """An nvidia-smi that prints ``topology`` for `topo -m`."""
    (tmp_path / "topo.txt").write_text(topology)
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\n[ "$1 $2" = "topo -m" ] || exit 9\ncat {tmp_path / "topo.txt"}\nexit {code}\n')
    smi.chmod(0o755)
    return smi


def test_nvlink_bridges_are_read_from_nvidia_smi(tmp_path: Path) -> None:
    for i in range(4):
        add_pci(tmp_path, f"0000:{0x18 + i:02x}:00.0", "0x10de", "0x2330", "0x030200", numa=str(i % 2))
    assert run_fact(tmp_path, smi=fake_smi(tmp_path, BRIDGED_TOPOLOGY))["gpu_nvlink_peers"] == [[2], [3], [0], [1]]
    # Unknown, never guessed: no nvidia-smi, a failing one, or one that counts other GPUs than PCI.
    assert run_fact(tmp_path)["gpu_nvlink_peers"] is None
    assert run_fact(tmp_path, smi=fake_smi(tmp_path, BRIDGED_TOPOLOGY, code=1))["gpu_nvlink_peers"] is None
    assert run_fact(tmp_path, smi=fake_smi(tmp_path, HGX_TOPOLOGY))["gpu_nvlink_peers"] is None


def test_the_h200_machines_topology_is_read(tmp_path: Path) -> None:
    add_pci(tmp_path, "0000:00:06.0", "0x10de", "0x2335", "0x030200", numa="-1")
    assert run_fact(tmp_path, smi=fake_smi(tmp_path, H200_TOPOLOGY))["gpu_nvlink_peers"] == [[]]
