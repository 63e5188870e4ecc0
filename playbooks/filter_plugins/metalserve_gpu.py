"""Filters for playbooks/verify_gpu.yml: parse nvidia-smi output into a GPU health report.

Pure functions over text, typed, importable without Ansible (tests/test_verify_gpu.py
imports this file directly). Ansible finds it because it lies in filter_plugins/ next
to the playbook.

    metalserve_gpu_report(xml, nvlink=..., kernel_log=..., kernel_log_source=..., host=...)
        -> the report of one host (dict, JSON-serialisable)
    metalserve_gpu_thresholds(raw) -> typed thresholds (clear error when malformed)
    metalserve_gpu_problems(report, thresholds) -> list of human-readable problems
    metalserve_gpu_summary(report, problems) -> list of summary lines
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

NA_VALUES = {"", "n/a", "[n/a]", "not supported", "[not supported]", "unknown", "[unknown error]"}
XID_RE = re.compile(r"NVRM: Xid \(PCI:(?P<pci>[0-9A-Fa-f:.]+)\): (?P<xid>\d+),\s*(?P<detail>.*)")
NVLINK_GPU_RE = re.compile(r"^GPU (?P<index>\d+): (?P<name>.*?) \(UUID: (?P<uuid>[^)]+)\)")
NVLINK_LINK_RE = re.compile(r"^\s*Link (?P<link>\d+): (?P<value>.*)$")
SPEED_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*GB/s")
MISMATCH = "Driver/library version mismatch"


class GpuReportError(ValueError):
    """nvidia-smi output that cannot be parsed."""


def _text(elem: ET.Element | None, path: str) -> str | None:
    """Text at path below elem; None when missing or N/A."""
    if elem is None:
        return None
    found = elem.find(path)
    if found is None or found.text is None:
        return None
    value = found.text.strip()
    return None if value.lower() in NA_VALUES else value


def _int(value: str | None) -> int | None:
    """Leading integer of a value ('16x' -> 16, '81559 MiB' -> 81559); None when absent."""
    if value is None:
        return None
    match = re.match(r"\s*(-?\d+)", value)
    return int(match.group(1)) if match else None


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    match = re.match(r"\s*(-?\d+(?:\.\d+)?)", value)
    return float(match.group(1)) if match else None


def _yes(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() in {"yes", "true", "enabled", "1"}


def _sum_counters(elem: ET.Element | None, keep: Callable[[str], bool]) -> int | None:
    """Sum of the integer children whose tag passes keep(); None when none is numeric."""
    if elem is None:
        return None
    total: int | None = None
    for child in elem.iter():
        if child is elem or len(child) > 0 or not keep(child.tag):
            continue
        number = _int(_text(child, "."))
        if number is not None:
            total = (total or 0) + number
    return total


def _is_uncorrected(tag: str) -> bool:
    return "uncorrectable" in tag or "double_bit" in tag


def _is_corrected(tag: str) -> bool:
    return (("correctable" in tag and "uncorrectable" not in tag) or "single_bit" in tag) and "threshold" not in tag


def _ecc(gpu: ET.Element) -> dict[str, dict[str, int | None]]:
    errors = gpu.find("ecc_errors")
    result: dict[str, dict[str, int | None]] = {}
    for scope in ("volatile", "aggregate"):
        node = errors.find(scope) if errors is not None else None
        result[scope] = {
            "corrected": _sum_counters(node, _is_corrected),
            "uncorrected": _sum_counters(node, _is_uncorrected),
        }
    return result


def _retired_pages(gpu: ET.Element) -> dict[str, Any]:
    node = gpu.find("retired_pages")
    single = _int(_text(node, "multiple_single_bit_retirement/retired_count"))
    double = _int(_text(node, "double_bit_retirement/retired_count"))
    total = None if single is None and double is None else (single or 0) + (double or 0)
    pending = _text(node, "pending_retirement") or _text(node, "pending_blacklist")
    return {"single_bit": single, "double_bit": double, "total": total, "pending": _yes(pending)}


def _remapped_rows(gpu: ET.Element) -> dict[str, Any]:
    node = gpu.find("remapped_rows")
    return {
        "correctable": _int(_text(node, "remapped_row_corr")),
        "uncorrectable": _int(_text(node, "remapped_row_unc")),
        "pending": _yes(_text(node, "remapped_row_pending")),
        "failure": _yes(_text(node, "remapped_row_failure")),
    }


def _pcie(gpu: ET.Element) -> dict[str, int | None]:
    link = gpu.find("pci/pci_gpu_link_info")
    return {
        "gen_current": _int(_text(link, "pcie_gen/current_link_gen")),
        "gen_max": _int(_text(link, "pcie_gen/max_link_gen")),
        "gen_device_max": _int(_text(link, "pcie_gen/max_device_link_gen")),
        "gen_host_max": _int(_text(link, "pcie_gen/max_host_link_gen")),
        "width_current": _int(_text(link, "link_widths/current_link_width")),
        "width_max": _int(_text(link, "link_widths/max_link_width")),
    }


def _power_draw(gpu: ET.Element) -> float | None:
    """Watts: instant_power_draw (R535+) or power_draw (older), under either block name."""
    for path in (
        "gpu_power_readings/instant_power_draw",
        "gpu_power_readings/power_draw",
        "power_readings/instant_power_draw",
        "power_readings/power_draw",
    ):
        value = _float(_text(gpu, path))
        if value is not None:
            return value
    return None


def normalize_pci(address: str) -> str:
    """'00000000:18:00.0' and '0000:18:00' both -> '18:00' (bus:device, lower case)."""
    parts = address.lower().split(":")
    if len(parts) >= 2:
        bus, device = parts[-2], parts[-1].split(".")[0]
        return f"{int(bus, 16):02x}:{int(device, 16):02x}"
    return address.lower()


def parse_nvidia_smi_xml(xml: str) -> dict[str, Any]:
    """The fields of `nvidia-smi -q -x` the report needs, per GPU."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - local nvidia-smi output, not untrusted input
    except ET.ParseError as exc:
        raise GpuReportError(f"nvidia-smi -q -x printed no valid XML: {exc}") from exc
    if root.tag != "nvidia_smi_log":
        raise GpuReportError(f"nvidia-smi -q -x printed <{root.tag}>, not <nvidia_smi_log>")
    gpus: list[dict[str, Any]] = []
    for index, gpu in enumerate(root.findall("gpu")):
        gpus.append(
            {
                "index": _int(_text(gpu, "minor_number")) if _text(gpu, "minor_number") else index,
                "pci_bus_id": gpu.get("id") or _text(gpu, "pci/pci_bus_id"),
                "name": _text(gpu, "product_name"),
                "architecture": _text(gpu, "product_architecture"),
                "uuid": _text(gpu, "uuid"),
                "serial": _text(gpu, "serial"),
                "vbios_version": _text(gpu, "vbios_version"),
                "persistence_mode": _text(gpu, "persistence_mode"),
                "mig_mode": {
                    "current": _text(gpu, "mig_mode/current_mig"),
                    "pending": _text(gpu, "mig_mode/pending_mig"),
                },
                "ecc_mode": {
                    "current": _text(gpu, "ecc_mode/current_ecc"),
                    "pending": _text(gpu, "ecc_mode/pending_ecc"),
                },
                "ecc_errors": _ecc(gpu),
                "retired_pages": _retired_pages(gpu),
                "remapped_rows": _remapped_rows(gpu),
                "pcie": _pcie(gpu),
                "memory_total_mib": _int(_text(gpu, "fb_memory_usage/total")),
                "temperature_c": _int(_text(gpu, "temperature/gpu_temp")),
                "power_draw_w": _power_draw(gpu),
            }
        )
    return {
        "timestamp": _text(root, "timestamp"),
        "driver_version": _text(root, "driver_version"),
        "cuda_version": _text(root, "cuda_version"),
        "attached_gpus": _int(_text(root, "attached_gpus")),
        "gpus": gpus,
    }


def parse_nvlink_status(text: str) -> dict[int, dict[str, Any]]:
    """`nvidia-smi nvlink --status` -> {gpu index: {links, active, inactive}}."""
    result: dict[int, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        gpu_match = NVLINK_GPU_RE.match(line.strip())
        if gpu_match:
            current = {"links": [], "active": 0, "inactive": 0}
            result[int(gpu_match.group("index"))] = current
            continue
        link_match = NVLINK_LINK_RE.match(line)
        if link_match and current is not None:
            value = link_match.group("value").strip()
            speed = SPEED_RE.search(value)
            active = speed is not None and "inactive" not in value.lower()
            current["links"].append(
                {
                    "link": int(link_match.group("link")),
                    "active": active,
                    "speed_gbytes_per_s": float(speed.group(1)) if speed else None,
                    "raw": value,
                }
            )
            current["active" if active else "inactive"] += 1
    return result


def parse_xid_log(text: str) -> list[dict[str, Any]]:
    """Xid events ('NVRM: Xid (PCI:0000:18:00): 79, pid=...') from a kernel log."""
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        match = XID_RE.search(line)
        if match:
            events.append(
                {
                    "pci": normalize_pci(match.group("pci")),
                    "xid": int(match.group("xid")),
                    "detail": match.group("detail").strip(),
                    "line": line.strip(),
                }
            )
    return events


def gpu_report(
    xml: str,
    nvlink: str = "",
    kernel_log: str = "",
    kernel_log_source: str = "unreadable",
    host: str = "",
    nvidia_smi_error: str = "",
) -> dict[str, Any]:
    """One host's report. With nvidia_smi_error set (nvidia-smi failed), a report
    that says so and carries the fix where the cause is known."""
    report: dict[str, Any] = {
        "host": host,
        "nvidia_smi_ok": not nvidia_smi_error,
        "nvidia_smi_error": nvidia_smi_error.strip() or None,
        "driver_version": None,
        "driver_branch": None,
        "cuda_version": None,
        "gpu_count": 0,
        "gpus": [],
        "kernel_log_source": kernel_log_source,
        "xid_events": parse_xid_log(kernel_log) if kernel_log_source != "unreadable" else [],
    }
    if nvidia_smi_error:
        if MISMATCH in nvidia_smi_error:
            report["fix"] = (
                "The loaded kernel module and the installed NVIDIA libraries differ (driver "
                "updated "
                "without a reboot): reboot the host, or stop every GPU user and reload the modules "
                "(rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia; modprobe nvidia)."
            )
        return report
    parsed = parse_nvidia_smi_xml(xml)
    links = parse_nvlink_status(nvlink)
    for gpu in parsed["gpus"]:
        status = links.get(gpu["index"], {"links": [], "active": 0, "inactive": 0})
        gpu["nvlink"] = {
            "active": status["active"],
            "inactive": status["inactive"],
            "links": status["links"],
        }
        pci = normalize_pci(gpu["pci_bus_id"]) if gpu["pci_bus_id"] else None
        gpu["xid_events"] = [e for e in report["xid_events"] if e["pci"] == pci]
    driver = parsed["driver_version"]
    report.update(
        {
            "driver_version": driver,
            "driver_branch": driver.split(".")[0] if driver else None,
            "cuda_version": parsed["cuda_version"],
            "gpu_count": len(parsed["gpus"]),
            "gpus": parsed["gpus"],
            "nvidia_smi_timestamp": parsed["timestamp"],
        }
    )
    return report


INT_THRESHOLDS = (
    "expected_count",
    "max_ecc_uncorrected_volatile",
    "max_ecc_corrected_volatile",
    "max_ecc_uncorrected_aggregate",
    "max_retired_pages",
    "max_remapped_rows_uncorrectable",
    "pcie_gen",
    "pcie_width",
    "max_xid_events",
)
BOOL_THRESHOLDS = (
    "fail_on_pending_retirement",
    "fail_on_remap_pending",
    "fail_on_remap_failure",
    "nvlink_all_active",
)
MODE_THRESHOLDS = ("persistence_mode", "mig_mode")


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "yes", "1", "on"}:
        return True
    if text in {"false", "no", "0", "off"}:
        return False
    raise GpuReportError(f"verify_gpu_{key} must be true or false, not {value!r}")


def thresholds(raw: dict[str, Any]) -> dict[str, Any]:
    """Typed thresholds from the playbook's variables (extra vars arrive as strings).
    None, '' and 'null' switch a check off; anything malformed is a clear error."""
    result: dict[str, Any] = {}
    for key, value in raw.items():
        off = value is None or (isinstance(value, str) and value.strip().lower() in {"", "null", "none"})
        if key in INT_THRESHOLDS:
            if off:
                result[key] = None
                continue
            try:
                number = int(str(value).strip())
            except ValueError:
                raise GpuReportError(f"verify_gpu_{key} must be a whole number or null, not {value!r}") from None
            if number < 0 or (key == "expected_count" and number == 0):
                raise GpuReportError(f"verify_gpu_{key} must be positive, not {value!r}")
            result[key] = number
        elif key in BOOL_THRESHOLDS:
            result[key] = False if off else _as_bool(key, value)
        elif key in MODE_THRESHOLDS:
            if not off and str(value) not in ("Enabled", "Disabled"):
                raise GpuReportError(f"verify_gpu_{key} must be Enabled, Disabled or null, not {value!r}")
            result[key] = None if off else str(value)
        elif key == "driver_branch":
            result[key] = None if off else str(value)
        elif key == "ignored_xids":
            if off:
                result[key] = []
                continue
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise GpuReportError(f"verify_gpu_ignored_xids must be a list of Xid codes, not {value!r}")
            try:
                result[key] = sorted(int(x) for x in value)
            except (TypeError, ValueError):
                raise GpuReportError(f"verify_gpu_ignored_xids must hold whole numbers, not {value!r}") from None
        else:
            raise GpuReportError(f"unknown GPU threshold {key!r}")
    return result


def _over(value: int | None, limit: int | None) -> bool:
    return limit is not None and value is not None and value > limit


def gpu_problems(report: dict[str, Any], limits: dict[str, Any] | None = None) -> list[str]:
    """What in the report breaks a threshold; [] when healthy. A threshold set to
    None (null) is not checked. Keys: see verify_gpu.yml's __verify_gpu_thresholds."""
    t = limits or {}
    if not report.get("nvidia_smi_ok", False):
        message = f"nvidia-smi failed: {report.get('nvidia_smi_error') or 'no output'}"
        if report.get("fix"):
            message += f" - fix: {report['fix']}"
        return [message]
    problems: list[str] = []
    expected = t.get("expected_count")
    if expected is not None and report["gpu_count"] != int(expected):
        problems.append(f"GPU count is {report['gpu_count']}, expected {expected}")
    branch = t.get("driver_branch")
    if branch is not None and str(report["driver_branch"]) != str(branch):
        problems.append(f"driver {report['driver_version']} is not on branch {branch}")
    ignored = {int(x) for x in t.get("ignored_xids") or []}
    xids = [e for e in report["xid_events"] if e["xid"] not in ignored]
    if _over(len(xids), t.get("max_xid_events")):
        codes = sorted({e["xid"] for e in xids})
        problems.append(f"{len(xids)} Xid event(s) in the kernel log (Xid {', '.join(map(str, codes))})")
    for gpu in report["gpus"]:
        label = f"GPU {gpu['index']} ({gpu['pci_bus_id']})"
        want_pm = t.get("persistence_mode")
        if want_pm is not None and gpu["persistence_mode"] != want_pm:
            problems.append(f"{label}: persistence mode is {gpu['persistence_mode']}, expected {want_pm}")
        want_mig = t.get("mig_mode")
        if want_mig is not None and gpu["mig_mode"]["current"] not in (want_mig, None):
            problems.append(f"{label}: MIG mode is {gpu['mig_mode']['current']}, expected {want_mig}")
        ecc = gpu["ecc_errors"]
        for scope, kind, key in (
            ("volatile", "uncorrected", "max_ecc_uncorrected_volatile"),
            ("volatile", "corrected", "max_ecc_corrected_volatile"),
            ("aggregate", "uncorrected", "max_ecc_uncorrected_aggregate"),
        ):
            if _over(ecc[scope][kind], t.get(key)):
                problems.append(f"{label}: {ecc[scope][kind]} {kind} ECC errors ({scope}), limit {t.get(key)}")
        pages = gpu["retired_pages"]
        if _over(pages["total"], t.get("max_retired_pages")):
            problems.append(f"{label}: {pages['total']} retired pages, limit {t.get('max_retired_pages')}")
        if t.get("fail_on_pending_retirement", True) and pages["pending"]:
            problems.append(f"{label}: a page retirement is pending (reset the GPU or reboot)")
        rows = gpu["remapped_rows"]
        if t.get("fail_on_remap_pending", True) and rows["pending"]:
            problems.append(f"{label}: a row remapping is pending (reset the GPU or reboot)")
        if t.get("fail_on_remap_failure", True) and rows["failure"]:
            problems.append(f"{label}: row remapping failed: the GPU needs service")
        if _over(rows["uncorrectable"], t.get("max_remapped_rows_uncorrectable")):
            problems.append(f"{label}: {rows['uncorrectable']} rows remapped for uncorrectable errors")
        pcie = gpu["pcie"]
        want_gen = t.get("pcie_gen")
        if want_gen is not None and (pcie["gen_max"] or 0) < int(want_gen):
            problems.append(f"{label}: PCIe link reaches gen {pcie['gen_max']}, expected gen {want_gen}")
        want_width = t.get("pcie_width")
        if want_width is not None and (pcie["width_current"] or 0) < int(want_width):
            problems.append(f"{label}: PCIe link is x{pcie['width_current']}, expected x{want_width}")
        if t.get("nvlink_all_active", False) and (gpu["nvlink"]["inactive"] or not gpu["nvlink"]["active"]):
            problems.append(
                f"{label}: {gpu['nvlink']['inactive']} NVLink link(s) inactive, {gpu['nvlink']['active']} active"
            )
    return problems


def gpu_summary(report: dict[str, Any], problems: list[str]) -> list[str]:
    """A few lines for the play's output."""
    if not report.get("nvidia_smi_ok", False):
        return [f"{report['host']}: nvidia-smi failed", *problems]
    names = sorted({str(g["name"]) for g in report["gpus"]})
    lines = [
        (
            f"{report['host']}: {report['gpu_count']} x {', '.join(names) or 'no GPU'}, "
            f"driver {report['driver_version']}, CUDA {report['cuda_version']}"
        ),
        f"kernel log: {report['kernel_log_source']}, {len(report['xid_events'])} Xid event(s)",
    ]
    for gpu in report["gpus"]:
        pcie = gpu["pcie"]
        ecc = gpu["ecc_errors"]["volatile"]
        lines.append(
            f"GPU {gpu['index']} {gpu['pci_bus_id']}: persistence {gpu['persistence_mode']}, "
            f"MIG {gpu['mig_mode']['current']}, ECC {gpu['ecc_mode']['current']} "
            f"(volatile corrected {ecc['corrected']}, uncorrected {ecc['uncorrected']}), "
            f"remap pending {gpu['remapped_rows']['pending']}, "
            f"PCIe gen {pcie['gen_current']}/{pcie['gen_max']} "
            f"x{pcie['width_current']}/{pcie['width_max']}, "
            f"NVLink {gpu['nvlink']['active']} active / {gpu['nvlink']['inactive']} inactive"
        )
    lines.append("healthy" if not problems else f"{len(problems)} problem(s)")
    return lines + problems


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {
            "metalserve_gpu_report": gpu_report,
            "metalserve_gpu_problems": gpu_problems,
            "metalserve_gpu_thresholds": thresholds,
            "metalserve_gpu_summary": gpu_summary,
        }
