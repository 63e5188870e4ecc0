"""Issue 17: the decode step's projections by ``metalserve.skinny_linear``'s kernel against
cuBLAS (``torch.nn.functional.linear``), side by side, at the 8B preset's shapes (q/k/v, o_proj,
gate/up, down and the LM head; bfloat16), one product per layer on 32 layers' own weights (so
that the 50 MB L2 cache holds none of them, as in a real step), replayed as CUDA graphs.

For each shape and row count: microseconds per product, its weight bytes over that time, and
each tuning's time (``Tuning``: output block, inner block, parts, warps, stages); the worst
error against a float32 product, whether a second run gives the same bits, and whether the
residual added in the kernel gives the bits of adding it after the product. Run from the
repository root: ``python3 files/serving/bench/skinny_linear_probe.py REPORT.json``.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metalserve import graph_timing, skinny_linear
from metalserve.skinny_linear import Tuning

DEVICE = torch.device("cuda", 0)
LAYERS = 32
REPLAYS = 10
# (name, out, in) at Llama-3-8B's sizes.
SHAPES = [
    ("qkv", 6144, 4096),
    ("o_proj", 4096, 4096),
    ("gate_up", 28672, 4096),
    ("down", 4096, 14336),
    ("lm_head", 128256, 4096),
]
ROWS = (32, 8, 64)
SWEEP = [
    Tuning(block_n, block_k, split, warps, stages)
    for block_n, block_k, split, warps, stages in itertools.product(
        (32, 64, 128), (128, 256), (1, 2, 4, 8), (4,), (3, 4, 5)
    )
    if not (block_n == 128 and block_k == 256)  # more shared memory than an H200 has
]


def timed(run: Any) -> float:
    """Microseconds of one ``run`` (all layers), as a CUDA graph replayed REPLAYS times."""
    return graph_timing.graph_micros(run, REPLAYS)


def shape(name: str, out: int, inner: int) -> dict[str, Any]:
    gen = torch.Generator(device=DEVICE).manual_seed(out + inner)
    dtype = torch.bfloat16
    layers = 8 if name == "lm_head" else LAYERS  # the head is 1 GB: 8 copies miss L2 as well
    weights = [
        torch.randn(out, inner, device=DEVICE, dtype=dtype, generator=gen) * 0.02
        for _ in range(layers)
    ]
    weight_bytes = out * inner * dtype.itemsize
    result: dict[str, Any] = {"name": name, "out": out, "in": inner, "weight_bytes": weight_bytes}
    for rows in ROWS:
        x = torch.randn(rows, inner, device=DEVICE, dtype=dtype, generator=gen)
        entry: dict[str, Any] = {}

        def cublas(x: torch.Tensor = x) -> None:
            for w in weights:
                torch.nn.functional.linear(x, w)

        entry["cublas_us"] = timed(cublas) / layers
        # The whole sweep at 32 rows (the benchmark's batch), its best five at the others.
        tunings = SWEEP if rows == 32 else result["top_rows_32"]
        times: dict[str, float] = {}
        for tuning in tunings:

            def ours(tuning: Tuning = tuning, x: torch.Tensor = x) -> None:
                for w in weights:
                    skinny_linear.kernel(x, w, tuning)

            try:
                times["_".join(map(str, tuning))] = timed(ours) / layers
            except Exception as exc:  # noqa: BLE001 - a tuning that does not fit: noted
                times["_".join(map(str, tuning))] = float("nan")
                entry.setdefault("failed", []).append(f"{tuning}: {str(exc)[:200]}")
        valid = {k: v for k, v in times.items() if v == v}
        best = min(valid, key=valid.__getitem__)
        if rows == 32:
            ranked = sorted(valid, key=valid.__getitem__)[:5]
            result["top_rows_32"] = [Tuning(*map(int, name.split("_"))) for name in ranked]
        best_tuning = Tuning(*map(int, best.split("_")))
        entry["best"] = best
        entry["best_us"] = valid[best]
        entry["cublas_gb_per_s"] = weight_bytes / entry["cublas_us"] / 1e3
        entry["best_gb_per_s"] = weight_bytes / entry["best_us"] / 1e3
        entry["speedup"] = entry["cublas_us"] / entry["best_us"]
        entry["tunings_us"] = dict(sorted(valid.items(), key=lambda item: item[1])[:8])
        expected = torch.nn.functional.linear(x.float(), weights[0].float())
        for label, got in (
            ("first_candidate", skinny_linear.kernel(x, weights[0], skinny_linear.CANDIDATES[0])),
            ("best", skinny_linear.kernel(x, weights[0], best_tuning)),
            ("cublas", torch.nn.functional.linear(x, weights[0])),
        ):
            entry[f"{label}_max_abs_err"] = float((got.float() - expected).abs().max())
        # The same inputs twice: the same bits (the parts are added in a fixed order).
        again = skinny_linear.kernel(x, weights[0], best_tuning)
        first = skinny_linear.kernel(x, weights[0], best_tuning)
        entry["repeatable"] = bool(torch.equal(again, first))
        # With a residual added in the kernel: the same bits as adding it after the product.
        residual = torch.randn(rows, out, device=DEVICE, dtype=dtype, generator=gen)
        fused = skinny_linear.kernel(x, weights[0], best_tuning, residual)
        entry["residual_equals_add_after"] = bool(torch.equal(fused, residual + first))
        result[f"rows_{rows}"] = entry
        shown = {k: v for k, v in entry.items() if k not in ("tunings_us", "failed")}
        print(name, rows, shown, flush=True)
    result["top_rows_32"] = [list(t) for t in result["top_rows_32"]]
    weights.clear()
    torch.cuda.empty_cache()
    return result


def main() -> int:
    started = time.time()
    report: dict[str, Any] = {"shapes": [shape(*s) for s in SHAPES]}
    report["environment"] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "seconds": time.time() - started,
    }
    Path(sys.argv[1]).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
