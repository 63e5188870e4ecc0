"""What the benchmarks, the GPU checks and the load generator share: flag types, model presets,
environment facts, the percentile, the table and the JSON report. Standard library only at
import time, so building the command-line parser stays cheap."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LOAD_ARMS = (
    "raw",
    "load_file",
    "ours",
    "ours_nohash",
    "ours_host_hash",
    "ours_per_shard",
    "cache",
    "h2d",
    "hash",
)
SERVE_ARMS = ("naive", "static", "server", "server-fp8", "server-process")
# server-fp8: the server arm again with --quantization fp8 (asked for by name: it needs FP8 tensor
# cores on CUDA, and doubles the server's share of the run). server runs the engine as a thread
# beside HTTP (--no-engine-process), server-process in a process of its own (--engine-process,
# the default on CUDA): both pinned, so that a report says which it measured on any device.
DEFAULT_SERVE_ARMS = ("naive", "static", "server", "server-process")
CACHES = ("cold", "warm")
DECODE_CHECKS = ("verify", "prof", "fp8")
GB = 1e9  # throughput in decimal GB/s, as disks and PCIe are quoted
# Llama shapes of the generated models: bench serve (850m, 8b; tiny for tests) and the reload check
# (160m: two versions of it must fit beside each other; tiny for tests).
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "850m": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
    },
    # Llama-3-8B's shape (8.0B parameters, 16 GB in bf16): the size users run on one GPU.
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
    },
    "160m": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "max_position_embeddings": 512,
    },
}
SERVE_PRESETS = ("850m", "8b", "tiny")
RELOAD_CHECK_PRESETS = ("160m", "tiny")


def arms_type(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for a comma-separated subset of ``choices`` (kept in their order)."""

    def parse(value: str) -> tuple[str, ...]:
        wanted = [a.strip() for a in value.split(",") if a.strip()]
        unknown = [a for a in wanted if a not in choices]
        if unknown or not wanted:
            raise argparse.ArgumentTypeError(
                f"unknown arm {', '.join(map(repr, unknown)) or repr(value)}; "
                f"choose from {', '.join(choices)}"
            )
        return tuple(a for a in choices if a in wanted)

    return parse


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a positive number")
    return number


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by the **nearest-rank** method: the smallest of the values
    with at least p% of them less than or equal to it (rank ``ceil(p / 100 * n)``, at least 1).

    The one definition of the package (load generator, benchmark reports). Always one of the
    observed values, so p50 <= p99 <= max holds; with n <= 100 values p99 is the largest.
    Raises ValueError without values.
    """
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def render_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned text columns; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware of this run, for the JSON report."""
    import torch
    import transformers

    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "device_name": "cpu",
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }
    try:
        from metalserve import __version__

        info["metalserve"] = __version__
        import safetensors

        info["safetensors"] = safetensors.__version__
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    if device.startswith("cuda"):
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda_driver"] = _nvidia_driver()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def _git_commit() -> str | None:
    # Set where the sources run from a copy outside their checkout (the GPU machine).
    if given := os.environ.get("METALSERVE_GIT_COMMIT"):
        return given
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607 - git from PATH, informational only
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def filesystem_of(path: Path) -> dict[str, str]:
    """The mount holding ``path`` (type and source), from /proc/mounts: tmpfs means no cold
    reads are possible there."""
    best: tuple[str, str, str] = ("", "?", "?")
    resolved = str(path.resolve())
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return {"mount": "?", "type": "?", "source": "?"}
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        source, mount, fstype = fields[0], fields[1].replace("\\040", " "), fields[2]
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[0]):
            best = (mount, fstype, source)
    return {"mount": best[0], "type": best[1], "source": best[2]}


def write_report(doc: dict[str, Any], out: Path | None) -> str:
    """The JSON text (also written to ``out`` when given)."""
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


def log(prefix: str, message: str) -> None:
    """A progress line on stderr (stdout carries the table and the report)."""
    print(f"[{prefix}] {message}", file=sys.stderr, flush=True)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 3)


def target(value: float | None, op: str, bound: float) -> dict[str, Any]:
    """A target as the issue states it, with whether this run met it."""
    met = None
    if value is not None:
        met = value >= bound if op == ">=" else value <= bound
    return {"value": value, "target": f"{op} {bound:g}", "met": met}


def device_copy_bandwidth(
    device: str, size_bytes: int = 2 << 30, repeats: int = 10
) -> float | None:
    """The device memory's bandwidth in GB/s, measured: a device-to-device copy of
    ``size_bytes`` (random bytes, far larger than the L2), bytes read plus bytes written, the
    median of ``repeats`` copies timed with CUDA events after a warm-up. None off CUDA."""
    import torch

    if not device.startswith("cuda"):
        return None
    source = torch.randint(0, 256, (size_bytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000)
    del source, target
    torch.cuda.empty_cache()
    return round(2 * size_bytes / percentile(seconds, 50) / GB, 1)
