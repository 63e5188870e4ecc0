"""Issue 17: decode attention over each row's own length (``metalserve.decode_attention``)
against what the decode step runs today (``scaled_dot_product_attention`` over the length
bucket with a mask), side by side, at the 8B preset's shapes (32 heads, 8 key/value heads, head
size 128, bfloat16), one call per layer on 32 layers' own caches, replayed as CUDA graphs.
Reports each variant's microseconds per step (32 layers), the key/value bytes it must read at
the rows' own lengths over that time, and the worst error against torch's attention (bfloat16
and float32). Run from the repository root:
``python3 files/serving/bench/decode_attention_probe.py REPORT.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metalserve import decode_attention, graph_timing

DEVICE = torch.device("cuda", 0)
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128
SLOTS, POSITIONS = 64, 2049
REPLAYS = 20
# (batch, shortest, longest row, length bucket): bench serve's 64-token prompts and 128 new
# tokens, and a long-context case.
CASES = [(32, 64, 192, 256), (8, 64, 192, 256), (64, 64, 192, 256), (32, 900, 1900, 2048)]
# (block, warps, stages) of the kernel; the first is its default.
TUNINGS = [(64, 4, 3), (128, 4, 3), (64, 4, 2), (32, 4, 3), (64, 8, 3)]


def timed(run: Any) -> float:
    """Microseconds of one ``run`` (all layers), as a CUDA graph replayed REPLAYS times."""
    return graph_timing.graph_micros(run, REPLAYS)


def case(batch: int, shortest: int, longest: int, length: int) -> dict[str, Any]:
    gen = torch.Generator(device=DEVICE).manual_seed(batch * longest)
    dtype = torch.bfloat16
    shape = (SLOTS + 1, KV_HEADS, POSITIONS, HEAD_DIM)
    keys = [torch.randn(shape, device=DEVICE, dtype=dtype, generator=gen) for _ in range(LAYERS)]
    values = [torch.randn(shape, device=DEVICE, dtype=dtype, generator=gen) for _ in range(LAYERS)]
    q = torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE, dtype=dtype, generator=gen)
    lengths = torch.randint(shortest, longest + 1, (batch,), device=DEVICE, generator=gen)
    scale = HEAD_DIM**-0.5
    # Today's step: the bucket's slice of the cache, masked beyond each row's position.
    visible = torch.arange(length, device=DEVICE)[None, :] < lengths[:, None]
    bias = torch.zeros(visible.shape, device=DEVICE).masked_fill(~visible, float("-inf"))
    bias = bias[:, None, None, :].to(dtype)

    def bucketed() -> None:
        for k, v in zip(keys, values, strict=True):
            torch.nn.functional.scaled_dot_product_attention(
                q.unsqueeze(2),
                k[:batch, :, :length],
                v[:batch, :, :length],
                attn_mask=bias,
                scale=scale,
                enable_gqa=True,
            )

    read = int(lengths.sum()) * KV_HEADS * HEAD_DIM * 2 * dtype.itemsize * LAYERS
    result: dict[str, Any] = {
        "batch": batch,
        "lengths": [shortest, longest],
        "bucket": length,
        "kv_bytes_at_own_lengths": read,
        "sdpa_bucket_us": timed(bucketed),
    }
    for block, warps, stages in TUNINGS:
        tuning = {"block": block, "warps": warps, "stages": stages}

        def own(tuning: dict[str, int] = tuning) -> None:
            for k, v in zip(keys, values, strict=True):
                decode_attention.kernel(q, k, v, lengths, scale, **tuning)

        name = f"kernel_b{block}_w{warps}_s{stages}"
        result[f"{name}_us"] = timed(own)
        got = decode_attention.reference(q, keys[1], values[1], lengths, scale).float()
        mine = decode_attention.kernel(q, keys[1], values[1], lengths, scale, **tuning)
        result[f"{name}_max_abs_err"] = float((mine.float() - got).abs().max())
    expected = decode_attention.reference(q, keys[0], values[0], lengths, scale).float()
    got = decode_attention.attend(q, keys[0], values[0], lengths, scale).float()
    result["bf16_max_abs_err"] = float((got - expected).abs().max())
    result["bf16_ref_max_abs"] = float(expected.abs().max())
    q32, k32, v32 = q.float(), keys[0].float(), values[0].float()
    expected = decode_attention.reference(q32, k32, v32, lengths, scale)
    result["fp32_max_abs_err"] = float(
        (decode_attention.attend(q32, k32, v32, lengths, scale) - expected).abs().max()
    )
    best = min(v for k, v in result.items() if k.startswith("kernel_") and k.endswith("_us"))
    result["best_kernel_us"] = best
    result["speedup"] = result["sdpa_bucket_us"] / best
    result["kernel_gb_per_s"] = read / best / 1e3
    keys.clear()
    values.clear()
    torch.cuda.empty_cache()
    return result


def main() -> int:
    started = time.time()
    report = {
        "cases": [case(*c) for c in CASES],
        "environment": {"device": torch.cuda.get_device_name(0), "torch": torch.__version__},
    }
    report["environment"]["seconds"] = time.time() - started
    Path(sys.argv[1]).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
